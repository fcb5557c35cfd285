# SPDX-License-Identifier: Apache-2.0
"""What a user sees when bitsandbytes cannot be used: one clear sentence.

Each case runs `LLM(...)` on a pre-quantized checkpoint in a fresh process,
as a user would, with the environment changed from outside: `VLLM_PLUGINS`,
or a stand-in `bitsandbytes` package placed ahead of the real one.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import fork

SCRIPT = """
import sys
if __name__ == "__main__":
    from vllm import LLM
    try:
        LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256)
    except Exception as error:
        print("ERROR", str(error).replace(chr(10), " | "))
        sys.exit(3)
    print("LOADED")
"""


def run_llm(model: Path, env_changes: dict[str, str]) -> tuple[int, str]:
    env = {**fork().env(), **env_changes}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in result.stdout.splitlines() if x.startswith(("ERROR", "LOADED"))]
    return result.returncode, lines[-1] if lines else result.stderr[-3000:]


def stand_in_bitsandbytes(directory: Path, body: str) -> Path:
    package = directory / "bitsandbytes"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    return directory


@pytest.mark.engine
def test_plugin_disabled_names_the_plugin():
    code, message = run_llm(
        get_checkpoint("llama-bnb-nf4"), {"VLLM_PLUGINS": "lora_filesystem_resolver"}
    )
    assert code == 3
    assert "provided by the plugin 'bitsandbytes'" in message
    assert "add 'bitsandbytes' to VLLM_PLUGINS" in message


@pytest.mark.engine
def test_missing_bitsandbytes_says_how_to_install(tmp_path):
    shadow = stand_in_bitsandbytes(
        tmp_path, "raise ModuleNotFoundError(\"No module named 'bitsandbytes'\")\n"
    )
    code, message = run_llm(
        get_checkpoint("llama-bnb-nf4"), {"PYTHONPATH": str(shadow)}
    )
    assert code == 3
    assert "pip install 'bitsandbytes>=" in message


@pytest.mark.engine
def test_old_bitsandbytes_says_how_to_upgrade(tmp_path):
    shadow = stand_in_bitsandbytes(tmp_path, '__version__ = "0.45.0"\n')
    code, message = run_llm(
        get_checkpoint("llama-bnb-nf4"), {"PYTHONPATH": str(shadow)}
    )
    assert code == 3
    assert "0.45.0 is too old" in message and "pip install -U" in message
