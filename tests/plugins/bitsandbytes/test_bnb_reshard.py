# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Cutting pre-quantized weights into tensor-parallel parts, exactly.

Each weight is quantized by bitsandbytes itself; the reference for a rank is
the matching slice (`torch.chunk` per section) of the whole weight
dequantized by bitsandbytes, and a rank's re-sharded data dequantized with
its re-sharded state must equal it bit for bit. Whether a cut is possible is
decided here from the plain block arithmetic, not from the code under test.
"""

import copy
import math

import bitsandbytes.functional as F
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.plugins.bitsandbytes.layout import BY_COLUMNS, BY_ROWS, RankSplit
from vllm.plugins.bitsandbytes.reshard import reshard_4bit, reshard_int8_scales
from vllm.plugins.bitsandbytes.states import flatten_double_quant

world_sizes = st.sampled_from([2, 4])
block_sizes = st.sampled_from([64, 128, 256])
quant_types = st.sampled_from(["nf4", "fp4"])
dtypes = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])


def random_weight(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator).to(dtype)


def quantize(weight: torch.Tensor, blocksize: int, quant_type: str, nested: bool):
    """bitsandbytes' packed bytes and the state, as a checkpoint stores them."""
    return F.quantize_4bit(
        weight,
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=nested,
    )


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of the flat value sequence, reshaped.

    Blocks run over the flat row-major values. bitsandbytes' CPU kernel
    assumes they restart at every row, which only holds when the row length
    is a multiple of the block size, so it is asked for one long row.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size((1, math.prod(state.shape)))
    return F.dequantize_4bit(packed, flat).reshape(state.shape)


def expected_parts(
    whole: torch.Tensor, split: RankSplit, world_size: int
) -> list[torch.Tensor]:
    """Every rank's slice of `whole`, from the plain definition of the split."""
    if split.dim != 0:
        return list(whole.chunk(world_size, dim=-1))
    sections = whole.split(list(split.sections or (whole.shape[0],)), dim=0)
    chunks = [section.chunk(world_size, dim=0) for section in sections]
    return [torch.cat([c[rank] for c in chunks]) for rank in range(world_size)]


def check_4bit(weight, split, world_size, blocksize, quant_type, nested):
    packed, state = quantize(weight, blocksize, quant_type, nested)
    whole = dequantize(packed, state)
    flatten_double_quant(state)
    for rank, expected in enumerate(expected_parts(whole, split, world_size)):
        part, part_state = reshard_4bit(
            "layer.weight", packed, state, split, rank, world_size
        )
        assert tuple(part_state.shape) == tuple(expected.shape)
        got = dequantize(part, part_state)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    world_size=world_sizes,
    blocksize=block_sizes,
    quant_type=quant_types,
    nested=st.booleans(),
    dtype=dtypes,
    rows_per_rank=st.integers(1, 6),
    cols=st.integers(1, 96).map(lambda half: 2 * half),
    seed=st.integers(0, 2**16),
)
def test_row_split_is_exact_or_refused(
    world_size, blocksize, quant_type, nested, dtype, rows_per_rank, cols, seed
):
    weight = random_weight(world_size * rows_per_rank, cols, dtype, seed)
    # Rank boundaries fall at multiples of rows_per_rank * cols values.
    if (rows_per_rank * cols) % blocksize == 0:
        check_4bit(weight, BY_ROWS, world_size, blocksize, quant_type, nested)
        return
    packed, state = quantize(weight, blocksize, quant_type, nested)
    flatten_double_quant(state)
    with pytest.raises(ValueError, match=rf"layer\.weight \(\d+x{cols}, blocks of"):
        reshard_4bit("layer.weight", packed, state, BY_ROWS, 0, world_size)


@settings(max_examples=60, deadline=None)
@given(
    world_size=world_sizes,
    blocksize=block_sizes,
    quant_type=quant_types,
    nested=st.booleans(),
    dtype=dtypes,
    rows=st.integers(1, 6),
    cols_per_rank=st.integers(1, 8).map(lambda n: 32 * n),
    seed=st.integers(0, 2**16),
)
def test_column_split_is_exact_or_refused(
    world_size, blocksize, quant_type, nested, dtype, rows, cols_per_rank, seed
):
    weight = random_weight(rows, world_size * cols_per_rank, dtype, seed)
    # Every rank's column range must be whole blocks of every row.
    if cols_per_rank % blocksize == 0:
        check_4bit(weight, BY_COLUMNS, world_size, blocksize, quant_type, nested)
        return
    packed, state = quantize(weight, blocksize, quant_type, nested)
    flatten_double_quant(state)
    with pytest.raises(ValueError, match="by columns across"):
        reshard_4bit("layer.weight", packed, state, BY_COLUMNS, 1, world_size)


@settings(max_examples=30, deadline=None)
@given(
    world_size=world_sizes,
    blocksize=block_sizes,
    quant_type=quant_types,
    nested=st.booleans(),
    section_blocks=st.lists(st.integers(1, 3), min_size=2, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fused_sections_split_exactly(
    world_size, blocksize, quant_type, nested, section_blocks, seed
):
    # A weight fused on disk (Phi-3 qkv_proj): each section is cut on its
    # own; one row of `blocksize` columns is one block.
    sections = tuple(world_size * n for n in section_blocks)
    weight = random_weight(sum(sections), blocksize, torch.bfloat16, seed)
    split = RankSplit(dim=0, sections=sections)
    check_4bit(weight, split, world_size, blocksize, quant_type, nested)


@settings(max_examples=40, deadline=None)
@given(
    world_size=world_sizes,
    rows_per_rank=st.integers(1, 6),
    cols_per_rank=st.integers(1, 40),
    split=st.sampled_from([BY_ROWS, BY_COLUMNS]),
    seed=st.integers(0, 2**16),
)
def test_int8_scales_follow_the_rows(
    world_size, rows_per_rank, cols_per_rank, split, seed
):
    # Core narrows the int8 matrix like an unquantized weight; the rank's
    # scales must dequantize that part exactly as the whole is dequantized.
    weight = random_weight(
        world_size * rows_per_rank, world_size * cols_per_rank, torch.float16, seed
    )
    quantized, scales, _ = F.int8_vectorwise_quant(weight)

    def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return q.float() * (s.float().unsqueeze(1) / 127)

    whole = dequantize(quantized, scales)
    parts = expected_parts(quantized, split, world_size)
    for rank, expected in enumerate(expected_parts(whole, split, world_size)):
        part_scales = reshard_int8_scales(scales, split, rank, world_size)
        assert torch.equal(dequantize(parts[rank], part_scales), expected)
