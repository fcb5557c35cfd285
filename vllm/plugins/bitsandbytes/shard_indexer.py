# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Where a logical shard lives inside a flat, packed bitsandbytes weight.

bitsandbytes stores a 4-bit `[rows, cols]` matrix as `rows * cols / 2` bytes
in one column, row after row. A merged layer's shards (q/k/v, gate/up, w1/w3)
are stacked along the rows, so each shard occupies the same fraction of the
bytes as of the logical rows, and its byte range follows by proportion.
"""

from collections.abc import Mapping

from vllm.model_executor.parameter import ShardPlacement


class ProportionalShardIndexer:
    """`shard_indexer` for storage that is a row-major packing of the rows.

    The loader quantizes each rank's part of a weight itself, so loaded
    tensors are always already sharded for this rank.
    """

    __slots__ = ("storage_size",)

    def __init__(self, storage_size: int) -> None:
        # Extent of the parameter's storage along the dimension shards stack
        # on: the packed length of the weight (of one expert, for MoE).
        self.storage_size = storage_size

    def __call__(
        self,
        shard_table: Mapping[str | int, tuple[int, int]] | None,
        shard_id: str | int | None,
        tp_rank: int,
        tp_size: int,
    ) -> ShardPlacement:
        if shard_table is None or shard_id is None:
            return ShardPlacement(0, self.storage_size, True)
        logical_offset, logical_size = shard_table[shard_id]
        logical_total = sum(size for _, size in shard_table.values())
        return ShardPlacement(
            logical_offset * self.storage_size // logical_total,
            logical_size * self.storage_size // logical_total,
            True,
        )

    def __repr__(self) -> str:
        return f"ProportionalShardIndexer(storage_size={self.storage_size})"
