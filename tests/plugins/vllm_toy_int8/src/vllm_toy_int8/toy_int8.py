# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 with one float32 scale per output row, quantized in flight.

The method exists to show that a quantization method whose storage is *not*
the logical `[out, in]` matrix can be loaded by core's unmodified weight
loaders through the `shard_indexer` hook, with core doing the tensor-parallel
narrowing (`loaded_is_sharded=False`).

Quantization of a row `w` (bf16 from the checkpoint, computed in float32)::

    scale = max(|w|) / 127            (1.0 for an all-zero row)
    q     = clamp(round(w / scale), -127, 127) as int8
    w'    = (q * scale) as the activation dtype       # what `apply` multiplies

Storage: each linear layer has ONE int8 parameter `weight` of width
`input_size_per_partition` (W). Each logical shard of R output rows on this
rank (q/k/v of a QKV layer, gate/up of a merged one, or the whole layer) is
one block of `R + ceil(4 R / W)` rows: the R int8 weight rows, followed by the
R float32 scales as raw bytes, row-major, zero padded::

    block(q) | block(k) | block(v)       block = [q rows (R x W) ; scales]

Since scale rows follow every shard, shard k starts at its logical offset plus
the scale rows of the shards before it: core's default offsets are wrong and
the `ScaleRowsIndexer` places the shards instead. The parameter's
`weight_loader` quantizes the whole (unsharded) checkpoint tensor into a
sequence of such blocks, one per TP rank, and hands it to core's loader,
which cuts out this rank's block and copies it to the indexer's placement.
"""

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn import Module, Parameter

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.parameter import ShardPlacement
from vllm.model_executor.utils import set_weight_attrs

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = init_logger(__name__)

NAME = "toy_int8"
SCALE_BYTES = torch.finfo(torch.float32).bits // 8


def scale_rows(rows: int, width: int) -> int:
    """Storage rows that hold `rows` float32 scales in int8 rows of `width`."""
    return -(-rows * SCALE_BYTES // width)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization: (int8 rows, float32 scales)."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack(weight: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Quantize a checkpoint tensor into storage blocks of `rows` x `width`.

    The result holds one block per chunk of `rows` rows; its scale rows are
    repeated across the column chunks of `width`, so narrowing the result to
    any rank's rows (column parallel) or columns (row parallel) yields exactly
    that rank's storage.
    """
    q, scale = quantize(weight)
    column_chunks = q.shape[1] // width
    padded_bytes = scale_rows(rows, width) * width
    blocks = []
    for start in range(0, q.shape[0], rows):
        scale_bytes = scale[start : start + rows].view(torch.int8)
        scale_block = F.pad(scale_bytes, (0, padded_bytes - scale_bytes.numel()))
        blocks += [
            q[start : start + rows],
            scale_block.view(-1, width).repeat(1, column_chunks),
        ]
    return torch.cat(blocks)


def dequantize(storage: torch.Tensor, block_rows: list[int]) -> torch.Tensor:
    """The float32 `[sum(block_rows), width]` weight a storage tensor holds."""
    width = storage.shape[1]
    parts, offset = [], 0
    for rows in block_rows:
        end = offset + rows + scale_rows(rows, width)
        scale_bytes = storage[offset + rows : end].flatten()[: rows * SCALE_BYTES]
        scale = scale_bytes.clone().view(torch.float32)
        parts.append(storage[offset : offset + rows].float() * scale[:, None])
        offset = end
    return torch.cat(parts)


class ScaleRowsIndexer:
    """`shard_indexer`: each shard is followed by its scale rows in storage."""

    def __init__(self, width: int, storage_rows: int) -> None:
        self.width = width
        self.storage_rows = storage_rows

    def __call__(
        self,
        shard_table: Mapping[str | int, tuple[int, int]] | None,
        shard_id: str | int | None,
        tp_rank: int,
        tp_size: int,
    ) -> ShardPlacement:
        if shard_table is None or shard_id is None:
            return ShardPlacement(0, self.storage_rows, False)
        offset, rows = shard_table[shard_id]
        scale_rows_before = sum(
            scale_rows(size, self.width)
            for other_offset, size in shard_table.values()
            if other_offset < offset
        )
        return ShardPlacement(
            offset + scale_rows_before, rows + scale_rows(rows, self.width), False
        )


class QuantizingWeightLoader:
    """`weight_loader` of the storage: quantize, then let core place the shard.

    The checkpoint tensor arrives whole (all TP ranks' rows and columns);
    it is packed per rank so that core's loader, narrowing by this rank and
    the indexer's placement, copies exactly this rank's block. (Every rank
    quantizes the whole tensor: wasteful, but it leaves the TP narrowing to
    core, which is what this toy is for.)
    """

    def __init__(
        self, layer: Module, core_loader: Callable[..., None], logical_rows: int
    ) -> None:
        self.layer = layer
        self.core_loader = core_loader
        # Output rows of this rank's whole partition (used by unmerged layers).
        self.logical_rows = logical_rows

    def __call__(
        self,
        param: Parameter,
        loaded_weight: torch.Tensor,
        shard_id: str | int | None = None,
    ) -> None:
        shard_table = getattr(self.layer, "logical_shard_table", None)
        if shard_table is not None and shard_id is None:
            # Fused on disk (Phi-3 qkv_proj, gate_up_proj): load shard by shard.
            # Core's own fused path cuts the loaded tensor at this rank's
            # storage placements, which only fits already sharded tensors.
            sizes = [size * self.layer.tp_size for _, size in shard_table.values()]
            if sum(sizes) != loaded_weight.shape[0]:
                raise ValueError(
                    f"toy_int8 cannot split a fused weight of {loaded_weight.shape[0]}"
                    f" rows into shards of {sizes} rows (replicated KV heads are "
                    "not supported); load an unfused checkpoint instead."
                )
            parts = loaded_weight.split(sizes)
            for part_id, part in zip(shard_table, parts, strict=True):
                self(param, part, part_id)
            return
        rows = self.logical_rows if shard_table is None else shard_table[shard_id][1]
        packed = pack(loaded_weight, rows, param.shape[1])
        if shard_id is None:
            self.core_loader(param, packed)
        else:
            self.core_loader(param, packed, shard_id)


class ToyInt8LinearMethod(LinearMethodBase):
    """Creates the packed storage and multiplies by its dequantized weight."""

    def create_weights(
        self,
        layer: Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        width = input_size_per_partition
        self.block_rows = list(output_partition_sizes)
        storage_rows = sum(rows + scale_rows(rows, width) for rows in self.block_rows)
        weight = Parameter(
            torch.empty(storage_rows, width, dtype=torch.int8), requires_grad=False
        )
        core_loader = extra_weight_attrs.pop("weight_loader")
        set_weight_attrs(
            weight,
            {
                "input_dim": 1,
                "output_dim": 0,
                "shard_indexer": ScaleRowsIndexer(width, storage_rows),
                "weight_loader": QuantizingWeightLoader(
                    layer, core_loader, sum(self.block_rows)
                ),
                **extra_weight_attrs,
            },
        )
        layer.register_parameter("weight", weight)

    def apply(
        self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = dequantize(layer.weight, self.block_rows).to(x.dtype)
        return F.linear(x, weight, bias)


class ToyInt8Config(QuantizationConfig):
    """Quantizes every linear layer of an unquantized checkpoint while loading."""

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Plain torch ops: any device vLLM runs on.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ToyInt8Config":
        return cls()

    @classmethod
    def from_model_config(cls, model_config: "ModelConfig") -> "ToyInt8Config":
        # The checkpoint is unquantized: quantize it while loading.
        logger.info("Quantizing %s to %s while loading.", model_config.model, NAME)
        return cls()

    def get_weight_byte_size(self) -> float:
        return 1.0

    def supports_any_weight_shape(self) -> bool:
        return True

    def get_quant_method(self, layer: Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return ToyInt8LinearMethod()
        return None
