# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Attaching the loaded quantization states to the parameters that own them."""

import itertools
import math
from typing import Any

import torch
from torch import nn

from vllm.logger import init_logger
from vllm.model_executor.models.utils import is_pp_missing_parameter
from vllm.plugins.bitsandbytes.config import BitsAndBytesCheckpointError
from vllm.plugins.bitsandbytes.layout import ExpertGroup, ModelLayout

logger = init_logger(__name__)


def attach_quant_states(
    model: nn.Module, layout: ModelLayout, states: dict[str, Any]
) -> None:
    """Attach each quantized parameter's states, as its quant method reads them.

    A linear weight gets `bnb_quant_state` (logical shard index -> state) and
    `bnb_shard_offsets` (shard starts in its storage, plus the end); a
    fused-MoE weight gets one state covering all of its experts.
    """
    params = dict(model.named_parameters())
    by_param: dict[str, Any] = {}
    for group in layout.expert_groups:
        by_param.update(_fuse_expert_states(group, states))
    for weight_name, state in states.items():
        if is_pp_missing_parameter(weight_name, model):
            continue
        param_name, index = layout.param_for(weight_name, params)
        if param_name in layout.quantized_params:
            by_param.setdefault(param_name, {})[index] = state

    logger.debug("Attaching bitsandbytes states to %d parameters", len(by_param))
    for name, param in params.items():
        if name not in layout.quantized_params:
            continue
        shards = by_param.get(name)
        if shards is None:
            raise BitsAndBytesCheckpointError(
                f"No bitsandbytes quantization state was loaded for {name}; "
                "the checkpoint is incomplete, re-export it."
            )
        if not isinstance(shards, dict):
            param.bnb_quant_state = shards
            continue
        layout.complete_shards(name, shards)
        if sorted(shards) != list(range(len(shards))):
            raise BitsAndBytesCheckpointError(
                f"The checkpoint holds only parts {sorted(shards)} of the merged "
                f"weight {name}; re-export it with all of them."
            )
        _check_shard_shapes(name, model.get_submodule(name.rpartition(".")[0]), shards)
        for state in shards.values():
            flatten_double_quant(state)
        sizes = [
            math.prod(shards[index].shape) // param.pack_factor
            for index in range(len(shards))
        ]
        param.bnb_quant_state = shards
        param.bnb_shard_offsets = torch.tensor(
            list(itertools.accumulate(sizes, initial=0))
        )


def _check_shard_shapes(name: str, layer: nn.Module, shards: dict[int, Any]) -> None:
    """The states must describe the layer's weight, or its matmuls go wrong.

    Each logical shard (`q_proj`, ...) has its own state, or one state covers
    a merged weight stored fused on disk. The check runs on this rank's
    states and layer, so it holds under tensor parallelism as well.
    """
    sizes = list(layer.output_partition_sizes)
    rows = [shards[index].shape[0] for index in range(len(shards))]
    columns = {
        shards[index].shape[1]
        for index in range(len(shards))
        if len(shards[index].shape) == 2
    }
    if (rows != sizes and rows != [sum(sizes)]) or columns - {
        layer.input_size_per_partition
    }:
        raise BitsAndBytesCheckpointError(
            f"The quantization states of {name} describe {rows} rows and "
            f"{sorted(columns)} columns but the layer has {sizes} rows and "
            f"{layer.input_size_per_partition} columns; check that the checkpoint "
            "matches the model config."
        )


def flatten_double_quant(state: Any) -> Any:
    """Dequantize a double-quantized absmax once, at load time.

    Double quantization stores the 4-bit block scales (absmax) themselves
    8-bit quantized. Expanding them to float32 here trades a little memory
    for not doing it on every forward pass. Int8 scales pass through.
    """
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    if not isinstance(state, QuantState) or not state.nested:
        return state
    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    state.absmax = absmax.float()
    state.nested = False
    state.offset = None
    state.state2 = None
    return state


def _fuse_expert_states(group: ExpertGroup, states: dict[str, Any]) -> dict[str, Any]:
    """One state per fused-MoE weight, from the experts' individual states.

    `w13_weight` stores each expert's w1 rows then its w3 rows, experts in
    order; `w2_weight` each expert's w2. The fused state's absmax follows
    the same order, which is the order of the packed bytes.
    """
    by_shard: dict[str, dict[int, Any]] = {"w1": {}, "w2": {}, "w3": {}}
    for shard in group.shards:
        state = states.pop(shard.weight_name, None)
        if state is None:
            raise BitsAndBytesCheckpointError(
                f"No bitsandbytes quantization state was loaded for the expert "
                f"weight {shard.weight_name}; the checkpoint stores it "
                "unquantized or not at all.",
                tensor=shard.weight_name,
            )
        by_shard[shard.shard_id][shard.expert_id] = flatten_double_quant(state)
    experts = sorted(by_shard["w1"])
    if sorted(by_shard["w2"]) != experts or sorted(by_shard["w3"]) != experts:
        raise BitsAndBytesCheckpointError(
            f"The checkpoint lacks some expert projections of {group.module_name}; "
            "re-export it with all of them."
        )
    w13 = [by_shard[s][e] for e in experts for s in ("w1", "w3")]
    w2 = [by_shard["w2"][e] for e in experts]
    return {
        f"{group.module_name}.w13_weight": _concatenate_states(w13, group),
        f"{group.module_name}.w2_weight": _concatenate_states(w2, group),
    }


def _concatenate_states(parts: list[Any], group: ExpertGroup) -> Any:
    """A state for the row-wise concatenation of 4-bit matrices."""
    from bitsandbytes.functional import QuantState

    first = parts[0]
    for part in parts:
        if (
            part.blocksize != first.blocksize
            or part.dtype != first.dtype
            or part.quant_type != first.quant_type
            or part.shape[1] != first.shape[1]
            or math.prod(part.shape) % part.blocksize
        ):
            raise BitsAndBytesCheckpointError(
                f"The experts of {group.module_name} were quantized with "
                "different settings or in blocks that straddle experts; "
                "quantize all experts alike, with whole blocks per expert."
            )
    return QuantState(
        absmax=torch.cat([part.absmax for part in parts]),
        shape=(sum(part.shape[0] for part in parts), first.shape[1]),
        code=first.code,
        blocksize=first.blocksize,
        quant_type=first.quant_type,
        dtype=first.dtype,
    )
