# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""How in-flight quantization cuts a checkpoint weight per tensor-parallel rank.

Expected parts come from `torch.chunk`, i.e. the plain definition of an even
split, applied to the whole weight or to each section of a weight fused on
disk.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.plugins.bitsandbytes.layout import (
    BY_COLUMNS,
    BY_ROWS,
    REPLICATED,
    RankSplit,
)

world_sizes = st.sampled_from([1, 2, 4, 8])


def weight(rows: int, columns: int) -> torch.Tensor:
    return torch.arange(rows * columns, dtype=torch.float32).reshape(rows, columns)


@settings(max_examples=100, deadline=None)
@given(world_size=world_sizes, rows=st.integers(1, 16), columns=st.integers(1, 16))
def test_rows_and_columns_split_evenly(world_size, rows, columns):
    tensor = weight(rows * world_size, columns * world_size)
    for rank in range(world_size):
        assert torch.equal(
            BY_ROWS.take(tensor, rank, world_size),
            tensor.chunk(world_size, dim=0)[rank],
        )
        assert torch.equal(
            BY_COLUMNS.take(tensor, rank, world_size),
            tensor.chunk(world_size, dim=-1)[rank],
        )


@settings(max_examples=100, deadline=None)
@given(
    world_size=world_sizes,
    section_rows=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    columns=st.integers(1, 8),
)
def test_fused_sections_split_one_by_one(world_size, section_rows, columns):
    sections = tuple(rows * world_size for rows in section_rows)
    tensor = weight(sum(sections), columns)
    split = RankSplit(dim=0, sections=sections)
    for rank in range(world_size):
        expected = torch.cat(
            [
                section.chunk(world_size, dim=0)[rank]
                for section in tensor.split(list(sections), dim=0)
            ]
        )
        assert torch.equal(split.take(tensor, rank, world_size), expected)


def test_replicated_weight_is_whole_on_every_rank():
    tensor = weight(8, 4)
    assert all(REPLICATED.take(tensor, rank, 4) is tensor for rank in range(4))


def test_fused_weight_with_unexpected_rows_is_refused():
    with pytest.raises(ValueError, match="sections"):
        RankSplit(dim=0, sections=(4, 2)).take(weight(8, 4), 0, 2)


def kv_heads_of_rank(kv_heads: int, rank: int, world_size: int) -> list[int]:
    """The key/value heads vLLM's QKVParallelLinear gives a rank.

    With fewer heads than ranks each head is replicated on
    `world_size // kv_heads` consecutive ranks (`shard_rank = tp_rank //
    num_kv_head_replicas`); otherwise each rank holds `kv_heads // world_size`.
    """
    if world_size >= kv_heads:
        return [rank // (world_size // kv_heads)]
    per_rank = kv_heads // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))


@settings(max_examples=100, deadline=None)
@given(
    world_size=world_sizes,
    kv_heads=st.sampled_from([1, 2, 4, 8]),
    head_size=st.integers(1, 4),
    columns=st.integers(1, 4),
)
def test_replicated_key_value_heads_follow_vllms_rule(
    world_size, kv_heads, head_size, columns
):
    q_heads = 8
    replicas = max(1, world_size // kv_heads)
    rows = (q_heads * head_size, kv_heads * head_size, kv_heads * head_size)
    fused = weight(sum(rows), columns)
    q, k, v = fused.split(list(rows))
    split = RankSplit(dim=0, sections=rows, replicas=(1, replicas, replicas))
    by_heads = RankSplit(dim=0, replicas=(replicas,))
    for rank in range(world_size):
        heads = kv_heads_of_rank(kv_heads, rank, world_size)
        expected_k = torch.cat([k.chunk(kv_heads)[head] for head in heads])
        expected_v = torch.cat([v.chunk(kv_heads)[head] for head in heads])
        assert torch.equal(by_heads.take(k, rank, world_size), expected_k)
        expected = torch.cat([q.chunk(world_size)[rank], expected_k, expected_v])
        assert torch.equal(split.take(fused, rank, world_size), expected)
