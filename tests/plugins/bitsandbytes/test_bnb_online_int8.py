# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Online LLM.int8() quantization equals what transformers produces.

The fixture `llama-bnb-int8` is the `llama` checkpoint loaded by transformers
with `load_in_8bit=True` and saved, i.e. quantized by `bitsandbytes.nn.
Int8Params`; quantizing `llama` while loading must give the same int8 bytes
and scales, and each tensor-parallel rank exactly its slice of the scales (all
of them for a row-parallel layer).
"""

from pathlib import Path

import bitsandbytes  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.checkpoints import get_checkpoint
from vllm.plugins.bitsandbytes.layout import BY_COLUMNS, BY_ROWS
from vllm.plugins.bitsandbytes.online import quantize_online_int8

# Llama's row-parallel projections; the other linear layers split by rows.
ROW_PARALLEL = ("o_proj", "down_proj")


def read(name: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(get_checkpoint(name)).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


class Layout:
    """The layout questions the stream asks, answered for Llama by name."""

    def checkpoint_name(self, name: str) -> str:
        return name

    def split_of(self, name: str):
        if ".layers." not in name or not name.endswith("_proj.weight"):
            return None
        return BY_COLUMNS if any(p in name for p in ROW_PARALLEL) else BY_ROWS


@pytest.fixture(scope="module")
def checkpoints() -> tuple[dict, dict]:
    return read("llama"), read("llama-bnb-int8")


def stream(unquantized: dict, tp_rank: int, tp_size: int) -> tuple[dict, dict]:
    states: dict = {}
    weights = dict(
        quantize_online_int8(
            iter(list(unquantized.items())), Layout(), states, tp_rank, tp_size
        )
    )
    return weights, states


@pytest.mark.parametrize("tp_size", [1, 2])
def test_in_flight_int8_equals_transformers(checkpoints, tp_size):
    unquantized, saved = checkpoints
    layout = Layout()
    targets = [name for name in unquantized if layout.split_of(name)]
    assert len(targets) == 14
    for rank in range(tp_size):
        weights, states = stream(unquantized, rank, tp_size)
        assert set(states) == set(targets)
        for name in targets:
            module = name.removesuffix(".weight")
            quantized, scales = saved[name], saved[module + ".SCB"]
            if layout.split_of(name) is BY_ROWS:
                scales = scales.chunk(tp_size)[rank]
            # Core's weight loader cuts the int8 matrix itself.
            assert weights[name].dtype == torch.int8
            assert torch.equal(weights[name], quantized), name
            assert torch.equal(states[name], scales), name
        for name in unquantized.keys() - set(targets):
            assert weights[name] is unquantized[name]


def test_quantized_checkpoint_is_not_quantized_again(checkpoints):
    _, saved = checkpoints
    with pytest.raises(ValueError, match="already quantized"):
        stream(saved, 0, 1)
