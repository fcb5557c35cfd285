# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The bitsandbytes `shard_indexer` against the packed layout it describes.

A merged 4-bit weight is stored as the packed bytes of each logical shard,
one after another; a shard of `rows x columns` 4-bit values takes
`rows * columns / 2` bytes. The expected byte ranges below are computed from
that layout (and, for real tensors, from what bitsandbytes produces), never
from the indexer's own proportion formula.

Core calls the indexer with logical rows `(offset, size, total)`: rows of
this rank's partition when it loads one shard, or rows of the whole fused
tensor when a weight is fused on disk. A pre-quantized checkpoint holds each
rank's part as one blob, so in both cases the answer is a range of that
rank's bytes.
"""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.plugins.bitsandbytes.shard_indexer import ProportionalShardIndexer

shard_rows = st.lists(st.integers(1, 512), min_size=1, max_size=4)
even_columns = st.integers(1, 256).map(lambda half: 2 * half)
tp_sizes = st.integers(1, 8)


def row_ranges(rows: list[int]) -> list[tuple[int, int]]:
    """(first row, row count) of each shard stacked along the rows."""
    starts = list(itertools.accumulate(rows, initial=0))[:-1]
    return list(zip(starts, rows, strict=True))


def byte_ranges(rows: list[int], columns: int) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each shard in the packed storage."""
    sizes = [count * columns // 2 for count in rows]
    offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
    return list(zip(offsets, sizes, strict=True))


@settings(max_examples=300, deadline=None)
@given(rows=shard_rows, columns=even_columns)
def test_each_shard_maps_to_its_packed_bytes(rows, columns):
    """One shard of this rank's partition (core's one-shard loader call)."""
    indexer = ProportionalShardIndexer(sum(rows) * columns // 2)
    expected = byte_ranges(rows, columns)
    actual = [indexer(*shard, sum(rows)) for shard in row_ranges(rows)]
    assert actual == expected


@given(storage=st.integers(1, 10**9), rows=st.integers(1, 10**6))
def test_whole_tensor_maps_to_the_whole_storage(storage, rows):
    assert ProportionalShardIndexer(storage)(0, rows, rows) == (0, storage)


@settings(max_examples=300, deadline=None)
@given(rank_rows=shard_rows, columns=even_columns, tp_size=tp_sizes)
def test_fused_on_disk_rows_map_onto_the_rank_blob(rank_rows, columns, tp_size):
    """Global rows of a fused tensor land on the rank's part of each shard.

    Each of the `tp_size` ranks holds `rank_rows[i]` of shard i's
    `tp_size * rank_rows[i]` rows, so the i-th global shard must map to the
    i-th shard of the rank's blob.
    """
    global_rows = [count * tp_size for count in rank_rows]
    indexer = ProportionalShardIndexer(sum(rank_rows) * columns // 2)
    expected = byte_ranges(rank_rows, columns)
    actual = [indexer(*shard, sum(global_rows)) for shard in row_ranges(global_rows)]
    assert actual == expected


@given(intermediate=st.integers(1, 128), hidden=st.integers(1, 64))
def test_moe_w13_halves(intermediate, hidden):
    """w1 then w3 in one expert's w13 storage, as the fused-MoE loader asks."""
    columns = 2 * hidden
    w1, w3 = byte_ranges([intermediate, intermediate], columns)
    indexer = ProportionalShardIndexer(2 * intermediate * columns // 2)
    assert indexer(0, intermediate, 2 * intermediate) == w1
    assert indexer(intermediate, intermediate, 2 * intermediate) == w3


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_placements_match_bitsandbytes_packing(quant_type, tp_size):
    """Each rank's q/k/v parts, quantized by bitsandbytes, are where it says.

    A rank's blob is its part of q, k and v quantized separately and
    concatenated; the rows core passes for one shard (this rank's rows) and
    for a weight fused on disk (all ranks' rows) must both select it.
    """
    from bitsandbytes.functional import quantize_4bit

    generator = torch.Generator().manual_seed(0)
    columns = 192
    weights = {
        key: torch.randn(count, columns, generator=generator, dtype=torch.bfloat16)
        for key, count in {"q": 256, "k": 64, "v": 64}.items()
    }
    global_ranges = row_ranges([w.shape[0] for w in weights.values()])
    global_total = sum(w.shape[0] for w in weights.values())
    for rank in range(tp_size):
        packed = {
            key: quantize_4bit(w.chunk(tp_size)[rank], quant_type=quant_type)[0]
            for key, w in weights.items()
        }
        blob = torch.cat(list(packed.values()))
        indexer = ProportionalShardIndexer(blob.shape[0])
        local_ranges = row_ranges([w.shape[0] // tp_size for w in weights.values()])
        local_total = global_total // tp_size
        for key, local, fused in zip(packed, local_ranges, global_ranges, strict=True):
            for rows, total in ((local, local_total), (fused, global_total)):
                offset, size = indexer(*rows, total)
                assert torch.equal(blob.narrow(0, offset, size), packed[key])
