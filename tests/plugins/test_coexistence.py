# SPDX-License-Identifier: Apache-2.0
"""The fork next to the real `vllm-bnb-plugin`: exactly one bitsandbytes.

Both distributions declare a `vllm.general_plugins` entry point named
`bitsandbytes`. Core keeps one per name (patch "Load one plugin per name"):
the out-of-tree package unless `VLLM_PLUGINS` names `<distribution>:<name>`.
Each check runs in a fresh interpreter with vllm-bnb-plugin 0.0.3 (the
unpacked wheel, its dist-info included) on `PYTHONPATH`, so
`importlib.metadata` discovers it exactly as if it were installed. The
choice is a warning, read from each process's real output: plugins load
before vLLM configures its logging, when Python prints warnings only.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import BNB_PLUGIN_DIR, fork, free_port

PROBE = r"""
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
loader = _LOAD_FORMAT_TO_MODEL_LOADER["bitsandbytes"]
print(json.dumps({
    "config_module": get_quantization_config("bitsandbytes").__module__,
    "loader": loader if isinstance(loader, str) else loader.__module__,
    "imported": sorted(
        m for m in sys.modules
        if m.startswith(("vllm_bnb_plugin", "vllm.plugins.bitsandbytes"))
    ),
}))
"""
# What a user reads when both packages are installed.
CHOICE = "Plugin 'bitsandbytes' (group vllm.general_plugins) is provided by"
DEFAULT_CHOICE = "loading the one from vllm-bnb-plugin"
LLM_SCRIPT = """
import sys
if __name__ == "__main__":
    from vllm import LLM
    LLM(model=sys.argv[1], enforce_eager=True, max_model_len=64)
    print("LOADED")
"""


def side_by_side_env(vllm_plugins: str | None = None) -> dict[str, str]:
    """The fork's environment with vllm-bnb-plugin discoverable as if
    installed, and vLLM's logging left at its defaults."""
    if not (BNB_PLUGIN_DIR / "vllm_bnb_plugin").is_dir():
        pytest.fail(
            f"no vllm-bnb-plugin at {BNB_PLUGIN_DIR}; run tools/fork.py oracles"
        )
    env = {**fork().env(), "PYTHONPATH": str(BNB_PLUGIN_DIR)}
    for name in ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING"):
        env.pop(name, None)
    if vllm_plugins is not None:
        env["VLLM_PLUGINS"] = vllm_plugins
    return env


def choice_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if CHOICE in line]


def _probe(vllm_plugins: str | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=side_by_side_env(vllm_plugins),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    result["choice_logs"] = choice_lines(out.stderr)
    return result


def test_out_of_tree_package_wins_by_default_and_says_so() -> None:
    result = _probe(None)
    assert result["config_module"].startswith("vllm_bnb_plugin")
    assert result["loader"].startswith("vllm_bnb_plugin")
    # The in-tree plugin was not even imported.
    imported = result["imported"]
    assert not any(m.startswith("vllm.plugins.bitsandbytes") for m in imported)
    (line,) = result["choice_logs"]
    assert DEFAULT_CHOICE in line
    assert "VLLM_PLUGINS=vllm:bitsandbytes" in line


def test_vllm_plugins_selects_the_in_tree_plugin() -> None:
    result = _probe("vllm:bitsandbytes")
    assert result["config_module"] == "vllm.plugins.bitsandbytes.config"
    assert result["loader"] == (
        "vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader"
    )
    assert not any(m.startswith("vllm_bnb_plugin") for m in result["imported"])
    (line,) = result["choice_logs"]
    assert "loading the one from vllm." in line
    assert "VLLM_PLUGINS=vllm-bnb-plugin:bitsandbytes" in line


def test_plain_name_keeps_one_deterministic_choice() -> None:
    """`VLLM_PLUGINS=bitsandbytes` allows both; the default rule still picks."""
    assert _probe("bitsandbytes")["config_module"].startswith("vllm_bnb_plugin")


@pytest.mark.engine
def test_a_real_llm_run_warns_which_plugin_it_loads() -> None:
    """`LLM(model=<nf4 checkpoint>)` as a user writes it: the choice is on
    stderr although vLLM configures its logging only later."""
    run = subprocess.run(
        [sys.executable, "-c", LLM_SCRIPT, str(get_checkpoint("llama-bnb-nf4"))],
        env=side_by_side_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "LOADED" in run.stdout, run.stderr[-3000:]
    lines = choice_lines(run.stderr)
    assert lines, run.stderr[-3000:]
    assert all(DEFAULT_CHOICE in line for line in lines)


@pytest.mark.engine
def test_vllm_serve_warns_which_plugin_it_loads(tmp_path: Path) -> None:
    """`vllm serve` with default settings prints the choice while starting;
    the server is stopped once it has."""
    env = side_by_side_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server as users run it
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "vllm"), "serve",
                str(get_checkpoint("llama-bnb-nf4")),
                "--host", "127.0.0.1", "--port", str(free_port()),
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not choice_lines(log_path.read_text()):
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    (first, *_) = choice_lines(log_path.read_text())
    assert DEFAULT_CHOICE in first
    assert "VLLM_PLUGINS=vllm:bitsandbytes" in first
