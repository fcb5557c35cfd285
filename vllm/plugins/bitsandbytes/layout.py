# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Which checkpoint tensors a model quantizes with bitsandbytes, and how.

A quantized weight can only be cut into tensor-parallel parts before it is
quantized, so the loader must know, per checkpoint tensor, which logical cut
the layer that receives it expects. `ModelLayout` derives that once from the
built model: the quantized checkpoint modules with their `RankSplit`, the
experts whose states get fused, and how checkpoint names map to parameters.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm.logger import init_logger
from vllm.model_executor.layers import linear as vllm_linear
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.models import is_pooling_model
from vllm.model_executor.utils import get_moe_expert_mapping, get_packed_modules_mapping
from vllm.plugins.bitsandbytes.linear import BitsAndBytesLinearMethod
from vllm.plugins.bitsandbytes.moe import BitsAndBytesMoEMethod

logger = init_logger(__name__)

WEIGHT_SUFFIX = ".weight"


class PackedModules:
    """A model's `packed_modules_mapping`, looked up both ways.

    `by_packed` maps a merged layer (`qkv_proj`) to the checkpoint modules it
    is loaded from (`q_proj`, `k_proj`, `v_proj`); `by_part` maps each of those
    to the merged layer and its position in it. A layer packed only from
    itself (`{"W_pack": ["W_pack"]}`) has no parts.
    """

    def __init__(self, mapping: dict[str, list[str]]) -> None:
        self.by_packed = mapping
        self.by_part = {
            part: (packed, index)
            for packed, parts in mapping.items()
            if parts != [packed]
            for index, part in enumerate(parts)
        }

    def parts_of(self, module_name: str) -> tuple[str, list[str]] | None:
        """The merged layer name `module_name` ends with, and its parts."""
        for packed, parts in self.by_packed.items():
            if module_name.endswith(packed):
                return packed, parts
        return None


@dataclass(frozen=True)
class RankSplit:
    """How a checkpoint weight is cut into tensor-parallel parts.

    `dim` is the dimension to cut, None for a weight every rank holds whole.
    `sections` lists the row counts of weights fused on disk (Phi-3's
    `qkv_proj`): each section is cut on its own and the parts concatenated.
    `replicas` says how many consecutive ranks hold the same part, for the
    weight or per section: with fewer key/value heads than ranks, each head
    is replicated (QKVParallelLinear's `num_kv_head_replicas`).
    """

    dim: int | None
    sections: tuple[int, ...] = ()
    replicas: tuple[int, ...] = ()

    def take(self, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """This rank's part of `tensor`."""
        if self.dim is None:
            return tensor
        if not self.sections:
            (replicas,) = self.replicas or (1,)
            return _part(tensor, self.dim, rank, world_size, replicas)
        if tensor.shape[0] != sum(self.sections):
            raise ValueError(
                f"A fused checkpoint weight has {tensor.shape[0]} rows but the "
                f"layer expects sections {list(self.sections)}; check that the "
                "checkpoint matches the model config."
            )
        replicas = self.replicas or (1,) * len(self.sections)
        return torch.cat(
            [
                _part(section, 0, rank, world_size, section_replicas)
                for section, section_replicas in zip(
                    tensor.split(self.sections), replicas, strict=True
                )
            ]
        )


def _part(
    tensor: torch.Tensor, dim: int, rank: int, world_size: int, replicas: int
) -> torch.Tensor:
    """Part `rank // replicas` of `world_size // replicas` equal parts."""
    parts = world_size // replicas
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, size * (rank // replicas), size)


REPLICATED = RankSplit(dim=None)
# Column-parallel layers hold a slice of the output rows.
BY_ROWS = RankSplit(dim=0)
# Row-parallel layers hold a slice of the input columns.
BY_COLUMNS = RankSplit(dim=-1)


@dataclass(frozen=True)
class ExpertShard:
    """One expert projection as stored in the checkpoint."""

    weight_name: str  # checkpoint name (after name mapping)
    expert_id: int
    shard_id: str  # "w1", "w2" or "w3"


@dataclass
class ExpertGroup:
    """The routed experts of one MoE layer, whose states are fused on load."""

    module_name: str
    shards: list[ExpertShard] = field(default_factory=list)


class ModelLayout:
    """The quantized checkpoint modules of one model, found once per load."""

    def __init__(self, model: nn.Module) -> None:
        for required in ("load_weights", "packed_modules_mapping"):
            if not hasattr(model, required):
                raise AttributeError(
                    f"{type(model).__name__} does not support bitsandbytes "
                    f"quantization yet: it has no '{required}'."
                )
        self.packed = PackedModules(get_packed_modules_mapping(model))
        # Checkpoint module name -> how its weight is split across ranks.
        self.splits: dict[str, RankSplit] = {}
        self.expert_groups: list[ExpertGroup] = []
        # Names of the parameters bitsandbytes owns; only these get states.
        self.quantized_params: set[str] = set()
        # The fused-MoE ones among them.
        self.expert_params: set[str] = set()

        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if isinstance(module, vllm_linear.LinearBase) and isinstance(
                method, BitsAndBytesLinearMethod
            ):
                self._add_linear(name, module)
            elif isinstance(module, RoutedExperts) and isinstance(
                method, BitsAndBytesMoEMethod
            ):
                self._add_experts(name, module, model)
        if not self.splits:
            raise ValueError(
                f"{type(model).__name__} has no layer that bitsandbytes can "
                "quantize; load it without quantization='bitsandbytes'."
            )

        mapper = getattr(model, "hf_to_vllm_mapper", None)
        # Renames and prefixes only: the stacked maps (q_proj -> qkv_proj) are
        # what `load_weights` applies itself, on the unstacked name.
        self._mapper = mapper.get_rename_mapper() if mapper else None
        # Pooling models are built under `model.` while their checkpoints may
        # omit that prefix.
        first_target = next(iter(self.splits))
        self._add_model_prefix = is_pooling_model(model) and first_target.startswith(
            "model."
        )
        self._k_eq_v = _shares_k_and_v(model)
        logger.debug(
            "bitsandbytes quantizes %d checkpoint modules, %d of them experts",
            len(self.splits),
            sum(len(group.shards) for group in self.expert_groups),
        )

    def _add_linear(self, name: str, module: vllm_linear.LinearBase) -> None:
        self.quantized_params.add(name + WEIGHT_SUFFIX)
        # How the layer's weight is cut, whole on disk; and each of its parts
        # stored separately (q_proj, ...), if different.
        part_splits: tuple[RankSplit, ...] = ()
        if module.disable_tp or isinstance(module, vllm_linear.ReplicatedLinear):
            split = REPLICATED
        elif isinstance(module, vllm_linear.RowParallelLinear):
            split = BY_COLUMNS
        elif (
            isinstance(module, vllm_linear.QKVParallelLinear)
            and len(module.output_sizes) == 3
        ):
            # Sections sized as on disk: q, k, v of the checkpoint.
            kv_replicas = module.num_kv_head_replicas
            rows = (
                module.total_num_heads * module.head_size,
                module.total_num_kv_heads * module.head_size,
                module.total_num_kv_heads * module.v_head_size,
            )
            replicas = (1, kv_replicas, kv_replicas)
            split = RankSplit(dim=0, sections=rows, replicas=replicas)
            part_splits = tuple(RankSplit(dim=0, replicas=(r,)) for r in replicas)
        elif isinstance(
            module,
            (vllm_linear.QKVParallelLinear, vllm_linear.MergedColumnParallelLinear),
        ):
            # The whole layer on disk (fused) or each part (gate_proj, ...);
            # QKV variants with more outputs keep the plain row split.
            split = RankSplit(dim=0, sections=tuple(module.output_sizes))
            part_splits = (BY_ROWS,) * len(module.output_sizes)
        else:
            split = BY_ROWS
        self.splits[name] = split
        if packed := self.packed.parts_of(name):
            packed_name, part_names = packed
            stem = name.removesuffix(packed_name)
            for index, part_name in enumerate(part_names):
                part_split = part_splits[index] if part_splits else split
                self.splits.setdefault(stem + part_name, part_split)

    def _add_experts(self, name: str, module: RoutedExperts, model: nn.Module) -> None:
        # The checkpoint names experts relative to the layer's parent:
        # "<parent>.experts.0.w1.weight" for layer "<parent>.experts".
        parent, _, leaf = module.layer_name.rpartition(".")
        group = ExpertGroup(module_name=name)
        seen: set[tuple[int, str]] = set()
        for _, weight_name, expert_id, shard_id in get_moe_expert_mapping(model):
            if not weight_name.startswith(leaf + "."):
                raise ValueError(
                    f"Cannot place expert weight '{weight_name}' under layer "
                    f"'{module.layer_name}'; bitsandbytes does not support this "
                    "model's expert naming yet."
                )
            if (expert_id, shard_id) in seen:
                continue  # redundant copies of one logical expert
            seen.add((expert_id, shard_id))
            checkpoint_module = f"{parent}.{weight_name.removesuffix('.')}"
            self.splits[checkpoint_module] = BY_COLUMNS if shard_id == "w2" else BY_ROWS
            group.shards.append(
                ExpertShard(checkpoint_module + WEIGHT_SUFFIX, expert_id, shard_id)
            )
        self.expert_groups.append(group)
        self.expert_params.update(
            f"{name}.{param}" for param in ("w13_weight", "w2_weight")
        )
        self.quantized_params.update(self.expert_params)

    def checkpoint_name(self, name: str) -> str | None:
        """vLLM's unstacked name for a checkpoint tensor; None if it is dropped."""
        if self._mapper is not None:
            mapped = self._mapper.apply_list([name])
            if not mapped:
                return None
            name = mapped[0]
        if self._add_model_prefix and not name.startswith("model."):
            name = "model." + name
        return name

    def split_of(self, weight_name: str) -> RankSplit | None:
        """The split of a quantized weight; None for tensors left as they are."""
        if not weight_name.endswith(WEIGHT_SUFFIX):
            return None
        return self.splits.get(weight_name.removesuffix(WEIGHT_SUFFIX))

    def param_for(
        self, weight_name: str, param_names: Iterable[str]
    ) -> tuple[str, int]:
        """Parameter and logical shard index that receive a checkpoint weight.

        A weight of a merged layer (`q_proj`) lands in the merged parameter
        (`qkv_proj`) at its position in `packed_modules_mapping`. Only a
        dot-preceded occurrence counts, so `kv_proj` is not found inside
        `qkv_proj`.
        """
        if weight_name in param_names:
            return weight_name, 0
        inverse = self.packed.by_part
        for part_name, (packed_name, index) in inverse.items():
            position = weight_name.find(part_name)
            if position <= 0 or weight_name[position - 1] != ".":
                continue
            candidate = weight_name.replace(part_name, packed_name)
            if candidate in param_names:
                return candidate, index
        return weight_name, 0

    def complete_shards(self, param_name: str, shards: dict[int, object]) -> None:
        """Fill in shards a model derives instead of loading.

        Models with `attention_k_eq_v` (Gemma 4) load no `v_proj`: their
        values reuse the key projection, so the key's state serves both.
        """
        if (
            self._k_eq_v
            and len(shards) == 2
            and 2 not in shards
            and any(
                param_name.endswith(f"{packed}{WEIGHT_SUFFIX}")
                for packed, parts in self.packed.by_packed.items()
                if len(parts) == 3
            )
        ):
            shards[2] = shards[1]


def _shares_k_and_v(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    return bool(getattr(config.get_text_config(), "attention_k_eq_v", False))
