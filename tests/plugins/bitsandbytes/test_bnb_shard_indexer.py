# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The bitsandbytes `shard_indexer` against the packed layout it describes.

A merged 4-bit weight is stored as the packed bytes of each logical shard,
one after another; a shard of `rows x columns` 4-bit values takes
`rows * columns / 2` bytes. The expected byte ranges below are computed from
that layout (and, for real tensors, from what bitsandbytes produces), never
from the indexer's own proportion formula.
"""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.model_executor.parameter import ShardPlacement
from vllm.plugins.bitsandbytes.shard_indexer import ProportionalShardIndexer

shard_rows = st.lists(st.integers(1, 512), min_size=1, max_size=4)
even_columns = st.integers(1, 256).map(lambda half: 2 * half)
tp = st.integers(1, 8).flatmap(
    lambda size: st.tuples(st.integers(0, size - 1), st.just(size))
)
Table = dict[str | int, tuple[int, int]]


def shard_table(rows: list[int], keys: list[str | int]) -> Table:
    """A layer's logical table: each shard's (first row, row count)."""
    starts = list(itertools.accumulate(rows, initial=0))[:-1]
    return {
        key: (start, count)
        for key, start, count in zip(keys, starts, rows, strict=True)
    }


def byte_ranges(rows: list[int], columns: int) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each shard in the packed storage."""
    sizes = [count * columns // 2 for count in rows]
    offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
    return list(zip(offsets, sizes, strict=True))


@settings(max_examples=300, deadline=None)
@given(rows=shard_rows, columns=even_columns, rank_and_size=tp)
def test_each_shard_maps_to_its_packed_bytes(rows, columns, rank_and_size):
    keys = list(range(len(rows)))
    table = shard_table(rows, keys)
    storage = sum(count * columns for count in rows) // 2
    indexer = ProportionalShardIndexer(storage)
    for key, (offset, size) in zip(keys, byte_ranges(rows, columns), strict=True):
        placement = indexer(table, key, *rank_and_size)
        assert isinstance(placement, ShardPlacement)
        assert (placement.offset, placement.size) == (offset, size)
        assert placement.loaded_is_sharded


@settings(max_examples=200, deadline=None)
@given(rows=shard_rows, columns=even_columns)
def test_shards_tile_the_storage(rows, columns):
    keys = ["q", "k", "v", "x"][: len(rows)]
    storage = sum(count * columns for count in rows) // 2
    indexer = ProportionalShardIndexer(storage)
    placements = [indexer(shard_table(rows, keys), key, 0, 1) for key in keys]
    end = 0
    for placement in placements:
        assert placement.offset == end
        end += placement.size
    assert end == storage


@given(storage=st.integers(1, 10**9), rank_and_size=tp)
def test_unmerged_layer_gets_the_whole_storage(storage, rank_and_size):
    placement = ProportionalShardIndexer(storage)(None, None, *rank_and_size)
    assert placement == ShardPlacement(0, storage, True)
    # A fused-MoE w2 passes its shard id but no table.
    assert ProportionalShardIndexer(storage)(None, "w2", 0, 1) == placement


@given(intermediate=st.integers(1, 128), hidden=st.integers(1, 64))
def test_moe_w13_halves(intermediate, hidden):
    # One expert's w13 storage: w1 rows then w3 rows, `hidden` columns each.
    storage = 2 * intermediate * (2 * hidden) // 2
    table = {"w1": (0, intermediate), "w3": (intermediate, intermediate)}
    indexer = ProportionalShardIndexer(storage)
    half = intermediate * hidden
    assert indexer(table, "w1", 0, 1) == ShardPlacement(0, half, True)
    assert indexer(table, "w3", 0, 1) == ShardPlacement(half, half, True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_placements_match_bitsandbytes_packing(quant_type):
    """q/k/v quantized separately by bitsandbytes land where the indexer says."""
    from bitsandbytes.functional import quantize_4bit

    generator = torch.Generator().manual_seed(0)
    columns = 192
    rows = {"q": 256, "k": 64, "v": 64}
    packed = {
        key: quantize_4bit(
            torch.randn(count, columns, generator=generator, dtype=torch.bfloat16),
            quant_type=quant_type,
        )[0]
        for key, count in rows.items()
    }
    storage = torch.cat(list(packed.values()))
    indexer = ProportionalShardIndexer(storage.shape[0])
    table = shard_table(list(rows.values()), list(rows))
    for key in rows:
        offset, size, _ = indexer(table, key, 0, 1)
        assert torch.equal(storage[offset : offset + size], packed[key])
