# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Reading bitsandbytes checkpoints and preparing their quantization states.

Checkpoint entries are produced the way transformers saves them, from
bitsandbytes' own `QuantState.as_dict(packed=True)`; expected values come
from bitsandbytes' quantize/dequantize functions, not from the plugin.
"""

from collections.abc import Iterator

import bitsandbytes.functional as bnb
import pytest
import torch

from vllm.plugins.bitsandbytes.checkpoint import (
    read_prequantized_4bit,
    read_prequantized_int8,
)
from vllm.plugins.bitsandbytes.layout import BY_ROWS, ExpertGroup, ExpertShard
from vllm.plugins.bitsandbytes.online import quantize_online_4bit
from vllm.plugins.bitsandbytes.states import (
    _fuse_expert_states,
    flatten_double_quant,
)

WEIGHT = "layers.0.proj.weight"


class Layout:
    """The two questions the streams ask a `ModelLayout`, for one module."""

    def __init__(self, quantized_weight: str = WEIGHT) -> None:
        self.quantized_weight = quantized_weight

    def checkpoint_name(self, name: str) -> str:
        return name

    def split_of(self, name: str):
        return BY_ROWS if name == self.quantized_weight else None


def random_weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator, dtype=torch.bfloat16)


def quantize(weight: torch.Tensor, **kwargs):
    # The loader computes quantization statistics in float32, as vLLM always did.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return bnb.quantize_4bit(weight.contiguous(), **kwargs)
    finally:
        torch.set_default_dtype(default)


def saved_4bit(quant_type: str, double_quant: bool) -> tuple[dict, object]:
    packed, state = quantize(
        random_weight(64, 128), quant_type=quant_type, compress_statistics=double_quant
    )
    checkpoint = {WEIGHT: packed, "norm.weight": torch.ones(128)}
    for key, value in state.as_dict(packed=True).items():
        checkpoint[f"{WEIGHT}.{key}"] = value
    return checkpoint, state


def stream(checkpoint: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(list(checkpoint.items()))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_prequantized_4bit_state_round_trips(quant_type, double_quant):
    checkpoint, saved_state = saved_4bit(quant_type, double_quant)
    states: dict = {}
    streamed = dict(read_prequantized_4bit(stream(checkpoint), Layout(), states))
    # The weight waits for its state components, saved after it.
    assert list(streamed) == ["norm.weight", WEIGHT]
    assert streamed[WEIGHT] is checkpoint[WEIGHT]
    state = states[WEIGHT]
    assert (state.quant_type, state.nested) == (quant_type, double_quant)
    assert torch.equal(
        bnb.dequantize_4bit(checkpoint[WEIGHT], state),
        bnb.dequantize_4bit(checkpoint[WEIGHT], saved_state),
    )


@pytest.mark.parametrize("weight_first", [True, False])
def test_prequantized_4bit_weight_and_state_in_either_order(weight_first):
    """One pass: a weight waits for its state components, or they for it."""
    checkpoint, saved_state = saved_4bit("nf4", True)
    weight = checkpoint.pop(WEIGHT)
    state_entries = [item for item in checkpoint.items() if item[0] != "norm.weight"]
    ordered = (
        [(WEIGHT, weight), *state_entries]
        if weight_first
        else [*reversed(state_entries), (WEIGHT, weight)]
    )
    ordered.append(("norm.weight", checkpoint["norm.weight"]))
    states: dict = {}
    streamed = list(read_prequantized_4bit(iter(ordered), Layout(), states))
    assert [name for name, _ in streamed] == [WEIGHT, "norm.weight"]
    assert torch.equal(
        bnb.dequantize_4bit(streamed[0][1], states[WEIGHT]),
        bnb.dequantize_4bit(weight, saved_state),
    )


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_bytes_stored_as_another_type_are_read_as_bytes(storage):
    """FSDP-QLoRA stores the packed bytes typed like the other parameters."""
    checkpoint, _ = saved_4bit("nf4", False)
    packed = checkpoint[WEIGHT]
    checkpoint[WEIGHT] = packed.view(-1).view(storage).reshape(-1, 1)
    states: dict = {}
    streamed = dict(
        read_prequantized_4bit(stream(checkpoint), Layout(), states, storage=storage)
    )
    assert streamed[WEIGHT].dtype == torch.uint8
    assert torch.equal(streamed[WEIGHT], packed)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_weight_of_an_unquantized_layer_is_dequantized(double_quant):
    """transformers 4.x quantized MoE routers, which vLLM keeps unquantized."""
    checkpoint, saved_state = saved_4bit("nf4", double_quant)
    states: dict = {}
    layout = Layout(quantized_weight="another.weight")
    streamed = dict(read_prequantized_4bit(stream(checkpoint), layout, states))
    assert list(streamed) == ["norm.weight", WEIGHT]
    assert states == {}
    expected = bnb.dequantize_4bit(checkpoint[WEIGHT], saved_state)
    assert streamed[WEIGHT].dtype == torch.bfloat16
    assert torch.equal(streamed[WEIGHT], expected)


def test_unquantized_column_weight_without_state_passes_through():
    """A weight merely shaped like packed codes is the model's own."""
    column = torch.arange(8, dtype=torch.uint8).reshape(8, 1)
    streamed = dict(
        read_prequantized_4bit(stream({"scale.weight": column}), Layout(), {})
    )
    assert streamed["scale.weight"] is column


def consume_4bit(checkpoint: dict) -> None:
    list(read_prequantized_4bit(stream(checkpoint), Layout(), {}))


def test_unquantized_weight_of_a_quantized_layer_is_reported():
    checkpoint = {WEIGHT: random_weight(64, 128)}
    with pytest.raises(ValueError, match="without a bitsandbytes quant_state"):
        consume_4bit(checkpoint)


def test_prequantized_int8_collects_row_scales():
    weight = torch.randint(-127, 128, (64, 128), dtype=torch.int8)
    scales = torch.rand(64)
    checkpoint = {
        WEIGHT: weight,
        "layers.0.proj.SCB": scales,
        "layers.0.proj.weight_format": torch.tensor(0, dtype=torch.uint8),
        "norm.weight": torch.ones(128),
    }
    states: dict = {}
    streamed = dict(read_prequantized_int8(stream(checkpoint), Layout(), states))
    assert list(streamed) == [WEIGHT, "norm.weight"]
    assert list(states) == [WEIGHT] and torch.equal(states[WEIGHT], scales)

    # A weight stored before its scales waits for them.
    states = {}
    reordered = {"layers.0.proj.SCB": scales, **checkpoint}
    reordered = {WEIGHT: weight, **reordered}
    streamed = dict(read_prequantized_int8(stream(reordered), Layout(), states))
    assert list(streamed) == [WEIGHT, "norm.weight"]
    assert streamed[WEIGHT] is weight and torch.equal(states[WEIGHT], scales)

    del checkpoint["layers.0.proj.SCB"]
    with pytest.raises(ValueError, match="without its int8 scales"):
        list(read_prequantized_int8(stream(checkpoint), Layout(), {}))


def test_online_4bit_quantizes_only_this_ranks_rows():
    weight = random_weight(128, 64)
    checkpoint = {WEIGHT: weight, "norm.weight": torch.ones(64)}
    states: dict = {}
    streamed = dict(
        quantize_online_4bit(stream(checkpoint), Layout(), states, tp_rank=1, tp_size=2)
    )
    expected_packed, expected_state = quantize(
        weight.chunk(2)[1], quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(streamed[WEIGHT], expected_packed)
    assert streamed["norm.weight"] is checkpoint["norm.weight"]
    assert torch.equal(states[WEIGHT].absmax, expected_state.absmax)
    assert torch.equal(
        bnb.dequantize_4bit(streamed[WEIGHT], states[WEIGHT]),
        bnb.dequantize_4bit(expected_packed, expected_state),
    )


def test_double_quant_is_flattened_without_changing_values():
    packed, state = quantize(
        random_weight(64, 256), quant_type="nf4", compress_statistics=True
    )
    expected = bnb.dequantize_4bit(packed, state)
    flat = flatten_double_quant(state)
    assert not flat.nested and flat.state2 is None and flat.offset is None
    assert flat.absmax.dtype == torch.float32
    assert torch.equal(bnb.dequantize_4bit(packed, flat), expected)
    scales = torch.rand(4)
    assert flatten_double_quant(scales) is scales


def test_expert_states_fuse_in_storage_order():
    hidden, intermediate = 64, 128
    shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden)}
    shapes["w2"] = (hidden, intermediate)
    group = ExpertGroup(module_name="layers.0.experts.routed_experts")
    states, packed, dense = {}, {}, {}
    for expert in range(3):
        for shard_id, shape in shapes.items():
            name = f"layers.0.experts.{expert}.{shard_id}.weight"
            group.shards.append(ExpertShard(name, expert, shard_id))
            packed[name], states[name] = quantize(
                random_weight(*shape, seed=len(states)),
                quant_type="nf4",
                compress_statistics=True,
            )
            dense[name] = bnb.dequantize_4bit(packed[name], states[name])

    fused = _fuse_expert_states(group, states)
    assert states == {}, "fused expert states are consumed"
    order = {
        "w13_weight": [(e, s) for e in range(3) for s in ("w1", "w3")],
        "w2_weight": [(e, "w2") for e in range(3)],
    }
    for param, parts in order.items():
        names = [f"layers.0.experts.{e}.{s}.weight" for e, s in parts]
        storage = torch.cat([packed[name] for name in names])
        assert torch.equal(
            bnb.dequantize_4bit(storage, fused[f"{group.module_name}.{param}"]),
            torch.cat([dense[name] for name in names]),
        )


def test_expert_blocks_straddling_experts_are_refused():
    group = ExpertGroup(module_name="experts")
    states = {}
    for expert in range(2):
        for shard_id in ("w1", "w2", "w3"):
            name = f"experts.{expert}.{shard_id}.weight"
            group.shards.append(ExpertShard(name, expert, shard_id))
            # 3 x 10 values: not a whole number of 64-value blocks
            states[name] = quantize(random_weight(3, 10), quant_type="nf4")[1]
    with pytest.raises(ValueError, match="straddle"):
        _fuse_expert_states(group, states)
