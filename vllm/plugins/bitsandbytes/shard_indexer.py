# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Where a run of logical rows lives inside a flat, packed bitsandbytes weight.

bitsandbytes stores a 4-bit `[rows, cols]` matrix as `rows * cols / 2` bytes
in one column, row after row. A merged layer's shards (q/k/v, gate/up, w1/w3)
are stacked along the rows, so each shard occupies the same fraction of the
bytes as of the logical rows, and its byte range follows by proportion.
"""

# Two 4-bit values share each byte of the uint8 storage. A fact of the storage
# format, so that code cutting packed bytes (`reshard`) need not import the
# linear method, which registers its custom op on import.
VALUES_PER_PACKED_BYTE = 2


class ProportionalShardIndexer:
    """`shard_indexer` (vLLM's `ShardIndexer`) for row-major packed storage.

    Core passes the rows of a shard as it computed them for the layer, and
    the logical rows of the tensor indexed; the storage holds the same
    rows, packed, in `storage_size` elements.
    """

    __slots__ = ("storage_size",)

    def __init__(self, storage_size: int) -> None:
        # Extent of the storage along its packed dimension: the packed length
        # of the weight (of one expert, for MoE).
        self.storage_size = storage_size

    def __call__(self, offset: int, size: int, total: int) -> tuple[int, int]:
        return (
            offset * self.storage_size // total,
            size * self.storage_size // total,
        )

    def __repr__(self) -> str:
        return f"ProportionalShardIndexer(storage_size={self.storage_size})"
