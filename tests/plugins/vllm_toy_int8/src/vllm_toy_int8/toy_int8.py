# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 with one float32 scale per output row, quantized in flight.

The method exists to show that a quantization method whose storage is *not*
the logical `[out, in]` matrix can be loaded by core's unmodified weight
loaders through the `shard_indexer` hook, with core doing the tensor-parallel
narrowing (the parameter is packed, `packed_dim == output_dim == 0`, and not
`is_sharded_weight`).

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
A weight fused on disk is packed shard by shard, each shard's blocks for all
ranks together, and core's fused path cuts the shards out of it with the
same indexer, called with all ranks' rows.

The checkpoint carries no quantization config and the method reads no config
file, so vLLM builds `ToyInt8Config()`, which quantizes while loading. Its one
setting, `skip_modules`, comes from `--quantization-config`. Beyond the
weight layout, the method needs what vllm-bnb-plugin patches `EngineArgs` for
on pristine vLLM, and takes it from the config hooks: its own model loader
(`get_required_load_format`, the loader registered by name in `register()`)
and eager execution (`verify_and_update_model_config`).
"""

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn import Module, Parameter

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.utils import set_weight_attrs

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = init_logger(__name__)

# The method's name and its load format (the loader `register()` names).
NAME = "toy_int8"
SCALE_BYTES = torch.finfo(torch.float32).bits // 8
# Shard ids of a QKV layer, in the order of its `output_partition_sizes`.
QKV_SHARD_IDS = ("q", "k", "v")


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
    """`shard_indexer`: each shard is followed by its scale rows in storage.

    Built once per layer from this rank's logical shard sizes, so that a
    shard's placement is a dictionary look-up: it starts at its logical
    offset plus the scale rows of the shards before it.
    """

    def __init__(self, shard_rows: list[int], width: int) -> None:
        self.width = width
        self.rows = sum(shard_rows)
        # First logical row of each shard on this rank -> storage rows taken
        # by the scales of the shards before it.
        self.scale_rows_before: dict[int, int] = {}
        offset = scales = 0
        for rows in shard_rows:
            self.scale_rows_before[offset] = scales
            offset += rows
            scales += scale_rows(rows, width)

    def __call__(self, offset: int, size: int, total: int) -> tuple[int, int]:
        # `total` is this rank's rows, or all ranks' rows for a weight fused
        # on disk. `QuantizingWeightLoader` packs a fused weight shard by
        # shard, each as one block per rank, so there every offset and size
        # is the rank's one times the number of ranks.
        ranks = total // self.rows
        offset //= ranks
        size //= ranks
        return (
            ranks * (offset + self.scale_rows_before[offset]),
            ranks * (size + scale_rows(size, self.width)),
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
        self, core_loader: Callable[..., None], shard_rows: list[int], tp_size: int
    ) -> None:
        self.core_loader = core_loader
        # This rank's rows of each logical shard, in `QKV_SHARD_IDS` order
        # for a QKV layer.
        self.shard_rows = shard_rows
        self.tp_size = tp_size

    def __call__(
        self,
        param: Parameter,
        loaded_weight: torch.Tensor,
        shard_id: str | int | None = None,
    ) -> None:
        width = param.shape[1]
        if shard_id is not None:
            index = (
                QKV_SHARD_IDS.index(shard_id) if isinstance(shard_id, str) else shard_id
            )
            packed = pack(loaded_weight, self.shard_rows[index], width)
            self.core_loader(param, packed, shard_id)
        elif len(self.shard_rows) == 1:
            self.core_loader(param, pack(loaded_weight, self.shard_rows[0], width))
        else:
            self.core_loader(param, self.pack_fused(loaded_weight, width))

    def pack_fused(self, loaded_weight: torch.Tensor, width: int) -> torch.Tensor:
        """Pack a weight fused on disk (Phi-3 qkv_proj, gate_up_proj).

        Each shard is packed into one block per rank, shard after shard:
        core's fused loader cuts out each shard where the indexer says and
        loads it like an unfused one.
        """
        sizes = [rows * self.tp_size for rows in self.shard_rows]
        if sum(sizes) != loaded_weight.shape[0]:
            raise ValueError(
                f"toy_int8 cannot split a fused weight of {loaded_weight.shape[0]}"
                f" rows into shards of {sizes} rows (replicated KV heads are "
                "not supported); load an unfused checkpoint instead."
            )
        parts = loaded_weight.split(sizes)
        return torch.cat(
            [
                pack(part, rows, width)
                for part, rows in zip(parts, self.shard_rows, strict=True)
            ]
        )


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
                # Packed along the output rows: core's merged and QKV loaders
                # then place shards with the indexer.
                "packed_dim": 0,
                "shard_indexer": ScaleRowsIndexer(self.block_rows, width),
                "weight_loader": QuantizingWeightLoader(
                    core_loader, self.block_rows, layer.tp_size
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
    """Quantizes the linear layers of an unquantized checkpoint while loading.

    Layers named in `skip_modules` (any dot-separated part of their prefix,
    e.g. "o_proj") stay unquantized.
    """

    def __init__(self, skip_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.skip_modules = frozenset(skip_modules)

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
        # None: vLLM then uses `ToyInt8Config()` for unquantized checkpoints.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ToyInt8Config":
        """The settings given as `--quantization-config`."""
        skip_modules = config.get("skip_modules", [])
        if config.keys() - {"skip_modules"} or not (
            isinstance(skip_modules, list)
            and all(isinstance(name, str) for name in skip_modules)
        ):
            raise ValueError(
                "toy_int8's --quantization-config takes only 'skip_modules', a "
                f"list of layer names to leave unquantized, not {config}; fix "
                "it or drop --quantization-config."
            )
        return cls(skip_modules)

    @classmethod
    def get_required_load_format(cls) -> str:
        return NAME

    @classmethod
    def takes_quantization_config_arg(cls) -> bool:
        return True

    @classmethod
    def verify_and_update_model_config(cls, model_config: "ModelConfig") -> None:
        """Check the settings before any worker starts; always run eagerly.

        `apply` rebuilds the weight from its int8 storage on every call: a
        reference computation written for eager execution, never tested under
        torch.compile or CUDA graphs.
        """
        settings = getattr(model_config.quantization_config, "method_settings", None)
        if settings is not None:
            cls.from_config(settings)
        if not model_config.enforce_eager:
            logger.warning("toy_int8 runs only eagerly; setting enforce_eager.")
            model_config.enforce_eager = True

    def get_weight_byte_size(self) -> float:
        return 1.0

    def supports_any_weight_shape(self) -> bool:
        return True

    def get_quant_method(self, layer: Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        if self.skip_modules.isdisjoint(prefix.split(".")):
            return ToyInt8LinearMethod()
        return UnquantizedLinearMethod()
