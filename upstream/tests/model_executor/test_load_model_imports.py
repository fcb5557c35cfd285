# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""An unquantized `load_model` does not import the online quantization methods.

Observed in a fresh interpreter, so nothing this process imported earlier
hides the import. A tiny local Llama with dummy weights, CPU only, one
tensor-parallel rank over gloo; run
`pytest tests/model_executor/test_load_model_imports.py`.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import LlamaConfig

ONLINE = "vllm.model_executor.layers.quantization.online"

LOAD = """
import json, sys, tempfile

import torch

from vllm.config import set_current_vllm_config
from vllm.distributed.parallel_state import (
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader import get_model_loader

if not torch.accelerator.is_available():
    # What vLLM's CPU worker does before loading.
    torch.accelerator.empty_cache = lambda: None
config = EngineArgs(
    model=sys.argv[1], skip_tokenizer_init=True, load_format="dummy",
    enforce_eager=True,
).create_engine_config()
with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(config):
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0,
        distributed_init_method=f"file://{tmp}/init", backend="gloo",
    )
    ensure_model_parallel_initialized(1, 1)
    loader = get_model_loader(config.load_config)
    before = set(sys.modules)
    loader.load_model(vllm_config=config, model_config=config.model_config)
    print(json.dumps({
        "before": sorted(before), "after": sorted(sys.modules),
        "quantization": config.model_config.quantization,
    }))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory holding only a tiny Llama config."""
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        torch_dtype="float32",
    ).save_pretrained(path)
    return path


def test_unquantized_load_imports_no_online_quantization_method(model_dir: Path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD), str(model_dir)],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
    )
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert modules["quantization"] is None
    assert not any(m.startswith(ONLINE) for m in modules["before"])
    imported = [m for m in modules["after"] if m.startswith(ONLINE)]
    assert imported == [], f"load_model imported {imported}"
