# SPDX-License-Identifier: Apache-2.0
"""The worst malformed checkpoints, as a user meets them: `LLM(...)` and
`vllm serve` stop with the plugin's one-line message and a non-zero exit.

The in-process fuzz (`tests/fuzz`) covers the many variants; these three
engine starts show the message survives the engine's process boundaries.
"""

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes  # noqa: F401
import pytest

from tests.fuzz.bnb_fuzz import Mutation, write_case
from tests.oracle.harness import free_port

pytestmark = pytest.mark.engine

ENV = {
    **os.environ,
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
START_TIMEOUT_S = 300
LLM_SCRIPT = """
import sys
from vllm import LLM
LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256)
print("LOADED")
"""
NAN_ABSMAX = Mutation(
    "llama-bnb-fp4",
    "tensor",
    "model.layers.1.self_attn.q_proj.weight.absmax",
    ("nonfinite", "nan"),
)
ZERO_BLOCKSIZE = Mutation(
    "llama-bnb-nf4",
    "state_field",
    "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
    ("set", "blocksize", 0),
)
TRUNCATED_FILE = Mutation("llama-bnb-int8", "header", "", ("truncate", 0.5))


def _checkpoint(mutation: Mutation, directory: Path) -> Path:
    directory.mkdir()
    write_case(mutation, directory)
    return directory


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            NAN_ABSMAX,
            "model.layers.1.self_attn.q_proj.weight is corrupt: absmax holds NaN",
        ),
        (TRUNCATED_FILE, "model.safetensors is truncated"),
    ],
    ids=["nan-absmax", "truncated-safetensors"],
)
def test_llm_refuses_with_one_clear_line(
    mutation: Mutation, expected: str, tmp_path: Path
) -> None:
    model = _checkpoint(mutation, tmp_path / "model")
    result = subprocess.run(
        [sys.executable, "-c", LLM_SCRIPT, str(model)],
        env={**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert result.returncode != 0
    assert "LOADED" not in result.stdout
    assert "BitsAndBytesCheckpointError: " in result.stderr
    assert expected in result.stderr


def test_serve_exits_non_zero_before_serving(tmp_path: Path) -> None:
    model = _checkpoint(ZERO_BLOCKSIZE, tmp_path / "model")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model)),
            *("--host", "127.0.0.1", "--port", str(free_port())),
            *("--enforce-eager", "--max-model-len", "256"),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = server.communicate(timeout=START_TIMEOUT_S)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
    assert server.returncode != 0
    assert "blocksize 0 is not one of" in output
    assert "model.layers.0.mlp.up_proj.weight" in output
    assert "Application startup complete" not in output
