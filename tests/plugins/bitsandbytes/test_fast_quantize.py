# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The plugin's fast 4-bit quantizer matches bitsandbytes byte for byte.

The oracle is `bitsandbytes.functional.quantize_4bit` itself, run on the same
tensor: the packed data and every `QuantState` tensor must have identical
bytes and every other field must be equal. Inputs aim at the places where a
reimplementation could round differently: values on and next to the code
midpoints, ties for the absolute maximum, zero and subnormal blocks, the
dtype's extremes, partial last blocks and odd value counts.
"""

import math

import bitsandbytes.functional as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.plugins.bitsandbytes.quantize import quantize_4bit
from vllm.utils.torch_utils import set_default_torch_dtype

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
KINDS = ("normal", "uniform", "zeros", "ties", "midpoints", "extreme", "nonfinite")
MAX_VALUES = 6000


def _midpoint_values(count: int, quant_type: str, gen: torch.Generator) -> torch.Tensor:
    """Code midpoints (and their float32 neighbours) times a power of two.

    With a power-of-two absolute maximum the scaled float32 values land on
    the midpoints exactly, where the tie-breaking of the search shows.
    """
    code = bnb.get_4bit_type(quant_type, device="cpu").float().sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    candidates = torch.cat(
        [
            midpoints,
            torch.nextafter(midpoints, torch.tensor(2.0)),
            torch.nextafter(midpoints, torch.tensor(-2.0)),
            code,
            torch.tensor([1.0, -1.0, 0.0, -0.0]),
        ]
    )
    picks = torch.randint(0, candidates.numel(), (count,), generator=gen)
    scale = 2.0 ** torch.randint(-20, 20, (1,), generator=gen).item()
    return candidates[picks] * scale


def _extreme_values(
    count: int, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Values near the dtype's largest, smallest normal and subnormal magnitudes."""
    info = torch.finfo(dtype)
    magnitudes = torch.tensor(
        [info.max, info.max / 3, info.tiny, info.tiny / 8, info.tiny * 3, 1.0, 0.0],
        dtype=torch.float64,
    )
    picks = torch.randint(0, magnitudes.numel(), (count,), generator=gen)
    signs = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
    return magnitudes[picks] * signs


def make_values(
    kind: str, count: int, dtype: torch.dtype, quant_type: str, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-4, 4, (1,), generator=gen).item()
    if kind == "normal":
        values = torch.randn(count, generator=gen, dtype=torch.float64) * scale
    elif kind == "uniform":
        values = (torch.rand(count, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    elif kind == "zeros":
        values = torch.randn(count, generator=gen, dtype=torch.float64)
        values[torch.rand(count, generator=gen) < 0.5] = 0.0
        values[: count // 2] = 0.0
    elif kind == "ties":
        values = torch.randint(-4, 5, (count,), generator=gen).double() * scale
    elif kind == "midpoints":
        values = _midpoint_values(count, quant_type, gen).double()
    elif kind == "extreme":
        values = _extreme_values(count, dtype, gen)
    else:
        values = torch.randn(count, generator=gen, dtype=torch.float64)
        special = torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64)
        spots = torch.randint(0, count, (3,), generator=gen)
        values[spots] = special[torch.randint(0, 3, (3,), generator=gen)]
    return values.to(dtype)


def assert_same_bytes(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype, what
    assert ours.shape == theirs.shape, what
    assert ours.device == theirs.device, what
    ours_bytes = ours.contiguous().reshape(-1).view(torch.uint8)
    theirs_bytes = theirs.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(ours_bytes, theirs_bytes), what


def assert_same_state(ours, theirs) -> None:
    for field in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert_same_bytes(ours.absmax, theirs.absmax, "absmax")
    assert_same_bytes(ours.code, theirs.code, "code")
    if not theirs.nested:
        assert ours.offset is None and ours.state2 is None
        return
    assert_same_bytes(ours.offset, theirs.offset, "offset")
    nested, their_nested = ours.state2, theirs.state2
    for field in ("blocksize", "dtype", "quant_type", "nested", "offset", "shape"):
        assert getattr(nested, field) == getattr(their_nested, field), field
    assert_same_bytes(nested.absmax, their_nested.absmax, "nested absmax")
    assert_same_bytes(nested.code, their_nested.code, "nested code")


@st.composite
def shapes(draw) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(1, MAX_VALUES)),)
    rows = draw(st.integers(1, 64))
    return (rows, draw(st.integers(1, MAX_VALUES // rows)))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(KINDS),
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(QUANT_TYPES),
    blocksize=st.sampled_from(BLOCKSIZES),
    compress_statistics=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_quantizer_matches_bitsandbytes(
    kind, shape, dtype, quant_type, blocksize, compress_statistics, seed
):
    values = make_values(kind, math.prod(shape), dtype, quant_type, seed).reshape(shape)
    with set_default_torch_dtype(torch.float32):
        ours_packed, ours_state = quantize_4bit(
            values,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
        )
        theirs_packed, theirs_state = bnb.quantize_4bit(
            values,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
        )
    assert_same_bytes(ours_packed, theirs_packed, "packed")
    assert_same_state(ours_state, theirs_state)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_every_float32_high_half_is_searched_like_bitsandbytes(quant_type):
    """Both ends of every table interval get the code bitsandbytes gives them.

    All float32 values of magnitude at most 1 whose low half is all zeros or
    all ones, in blocks led by a 1 so that scaling leaves them unchanged,
    exercise every table entry.
    """
    high = torch.arange(1 << 15, dtype=torch.int64) << 16
    ends = torch.cat([high, high | 0xFFFF, high | (1 << 31), high | 0xFFFF | (1 << 31)])
    values = ends.to(torch.int32).view(torch.float32)
    values = values[values.abs() <= 1]
    per_block = BLOCKSIZES[-1] - 1
    values = torch.cat([values, values.new_zeros(-values.numel() % per_block)])
    blocks = values.reshape(-1, per_block)
    values = torch.cat([blocks.new_ones(blocks.shape[0], 1), blocks], dim=1)
    with set_default_torch_dtype(torch.float32):
        ours_packed, _ = quantize_4bit(
            values, blocksize=BLOCKSIZES[-1], quant_type=quant_type
        )
        theirs_packed, _ = bnb.quantize_4bit(
            values, blocksize=BLOCKSIZES[-1], quant_type=quant_type
        )
    assert_same_bytes(ours_packed, theirs_packed, "packed")
