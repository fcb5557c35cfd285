# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Streams that read pre-quantized checkpoints into bitsandbytes storage.

A pre-quantized checkpoint stores each weight's state in tensors of its own,
beside the weight; these streams rebuild and check it, and record it as
every stream does (see `streams`).
"""

from typing import Any

import torch

from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.config import (
    PACKED_STATE_PREFIX,
    BitsAndBytesCheckpointError,
)
from vllm.plugins.bitsandbytes.layout import WEIGHT_SUFFIX, ModelLayout
from vllm.plugins.bitsandbytes.reshard import reshard_4bit, reshard_int8_scales
from vllm.plugins.bitsandbytes.state_checks import (
    check_4bit_weight,
    check_int8_weight,
    parse_4bit_state,
)
from vllm.plugins.bitsandbytes.states import flatten_double_quant
from vllm.plugins.bitsandbytes.streams import CheckpointTensors, LoadProgress

# Components transformers saves next to a 4-bit weight `<name>.weight`, besides
# the packed non-tensor fields `<name>.weight.quant_state.bitsandbytes__<type>`.
STATE_COMPONENTS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_SCALE_SUFFIX = ".scb"
INT8_FORMAT_SUFFIX = ".weight_format"


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a state tensor, which outlives the pass over the checkpoint.

    The reader's tensors are views of the memory-mapped weights file: keeping
    one would keep the whole mapping, and every page the load has read from
    it, resident until the load ends (+125 MiB peak RSS on a 380M int8 model).
    """
    return tensor.clone()


def _owner_of_4bit_component(weight_name: str) -> tuple[str, str] | None:
    """Split `<weight>.<component>` for a 4-bit state component, else None."""
    owner, _, component = weight_name.rpartition(".")
    if component in STATE_COMPONENTS_4BIT:
        return owner, component
    owner, found, packed_type = weight_name.rpartition("." + PACKED_STATE_PREFIX)
    if found:
        return owner, PACKED_STATE_PREFIX + packed_type
    return None


def _has_complete_4bit_state(components: dict[str, torch.Tensor]) -> bool:
    """Whether every component a valid 4-bit state needs has been read.

    Double quantization stores the absmax as uint8 codes, which need the
    nested statistics as well. An incomplete state is parsed (and reported)
    once the whole checkpoint has been read.
    """
    if "absmax" not in components or "quant_map" not in components:
        return False
    if not any(name.startswith(PACKED_STATE_PREFIX) for name in components):
        return False
    return components["absmax"].dtype != torch.uint8 or (
        "nested_absmax" in components and "nested_quant_map" in components
    )


def _packed_bytes(tensor: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Packed 4-bit codes stored as `storage` elements, as the bytes they are.

    bitsandbytes writes the codes into a buffer of the storage type, so its
    memory read as uint8 is exactly a uint8 checkpoint's `(bytes, 1)` column.
    Tensors of any other type are left for `check_4bit_weight` to refuse.
    """
    if tensor.dtype != storage or storage == torch.uint8:
        return tensor
    return tensor.contiguous().view(torch.uint8).reshape(-1, 1)


def _is_packed_column(tensor: torch.Tensor, storage: torch.dtype) -> bool:
    """Whether a tensor is laid out as transformers stores packed 4-bit codes."""
    return tensor.dtype == storage and tensor.dim() == 2 and tensor.shape[1] == 1


def _dequantized(weight_name: str, tensor: torch.Tensor, state: Any) -> torch.Tensor:
    """A quantized checkpoint weight of a layer vLLM keeps unquantized.

    transformers 4.x quantized every `nn.Linear` but the output embedding,
    MoE routers (`gate`, `shared_expert_gate`) included, while vLLM builds
    routers unquantized; they get their weights back as bitsandbytes
    dequantizes them, in the dtype the state records.
    """
    from bitsandbytes.functional import dequantize_4bit

    check_4bit_weight(weight_name, tensor, state)
    device = current_platform.device_type
    state.to(device)  # in place
    return dequantize_4bit(tensor.to(device), state)


def read_prequantized_4bit(
    checkpoint: CheckpointTensors,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int = 0,
    tp_size: int = 1,
    storage: torch.dtype = torch.uint8,
) -> CheckpointTensors:
    """Stream packed 4-bit weights, each once its `QuantState` is rebuilt.

    The checkpoint is read once. transformers saves `<name>.weight` before
    its state components, so a weight waits (as the reader's lazy view of the
    file) until they have all been read. Under tensor parallelism each weight
    is cut to this rank's part, see `reshard`. `storage` is the checkpoint's
    `bnb_4bit_quant_storage` type. A packed weight of a layer the model does
    not quantize is dequantized, see `_dequantized`.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    waiting: dict[str, tuple[str, torch.Tensor]] = {}
    progress = LoadProgress("read pre-quantized")

    def with_state(
        weight_name: str, name: str, tensor: torch.Tensor
    ) -> tuple[str, torch.Tensor]:
        state = parse_4bit_state(weight_name, components.pop(weight_name))
        tensor = _packed_bytes(tensor, storage)
        split = layout.split_of(weight_name)
        if split is None:
            return name, _dequantized(weight_name, tensor, state)
        check_4bit_weight(weight_name, tensor, state)
        if tp_size > 1 and split.dim is not None:
            # Block scales are sliced, so they must be plain floats first.
            flatten_double_quant(state)
            tensor, state = reshard_4bit(
                weight_name, tensor, state, split, tp_rank, tp_size
            )
        states[weight_name] = state
        progress.step()
        return name, tensor

    for name, tensor in checkpoint:
        weight_name = layout.checkpoint_name(name)
        if weight_name is None:
            yield name, tensor
        elif found := _owner_of_4bit_component(weight_name):
            owner, component = found
            if component.startswith(PACKED_STATE_PREFIX):
                # bitsandbytes decodes the packed fields from host memory.
                tensor = tensor.cpu()
            components.setdefault(owner, {})[component] = _detached(tensor)
            if owner in waiting and _has_complete_4bit_state(components[owner]):
                yield with_state(owner, *waiting.pop(owner))
        elif layout.split_of(weight_name) is None and not _is_packed_column(
            tensor, storage
        ):
            yield name, tensor
        elif _has_complete_4bit_state(components.get(weight_name, {})):
            yield with_state(weight_name, name, tensor)
        else:
            waiting[weight_name] = (name, tensor)

    for weight_name, (name, tensor) in waiting.items():
        if weight_name in components:
            yield with_state(weight_name, name, tensor)
        elif layout.split_of(weight_name) is None:
            # Shaped like packed codes, but stored without a state: a weight
            # of the model's own.
            yield name, tensor
        else:
            raise BitsAndBytesCheckpointError(
                f"The checkpoint stores {weight_name} without a bitsandbytes "
                "quant_state although the model quantizes that layer; re-export "
                "the checkpoint with that layer quantized.",
                tensor=weight_name,
            )
    progress.done()


def read_prequantized_int8(
    checkpoint: CheckpointTensors,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> CheckpointTensors:
    """Stream int8 weights, each once its per-row scales (`SCB`) are read.

    The checkpoint is read once; a weight stored before its scales waits for
    them. Under tensor parallelism each weight's scales are cut to this
    rank's rows, see `reshard`.
    """
    scales: dict[str, torch.Tensor] = {}
    waiting: dict[str, tuple[str, torch.Tensor]] = {}
    progress = LoadProgress("read pre-quantized")

    def with_scales(
        weight_name: str, name: str, tensor: torch.Tensor
    ) -> tuple[str, torch.Tensor]:
        check_int8_weight(weight_name, tensor, scales[weight_name])
        split = layout.split_of(weight_name)
        states[weight_name] = scales.pop(weight_name)
        if tp_size > 1 and split is not None and split.dim is not None:
            states[weight_name] = reshard_int8_scales(
                states[weight_name], split, tp_rank, tp_size
            )
        progress.step()
        return name, tensor

    for name, tensor in checkpoint:
        weight_name = layout.checkpoint_name(name)
        if weight_name is None:
            yield name, tensor
        elif weight_name.lower().endswith(INT8_SCALE_SUFFIX):
            owner = weight_name[: -len(INT8_SCALE_SUFFIX)] + WEIGHT_SUFFIX
            scales[owner] = _detached(tensor)
            if owner in waiting:
                yield with_scales(owner, *waiting.pop(owner))
        elif weight_name.lower().endswith(INT8_FORMAT_SUFFIX):
            continue
        elif layout.split_of(weight_name) is None:
            yield name, tensor
        elif weight_name in scales:
            yield with_scales(weight_name, name, tensor)
        else:
            waiting[weight_name] = (name, tensor)

    if waiting:
        weight_name = next(iter(waiting))
        raise BitsAndBytesCheckpointError(
            f"The checkpoint stores {weight_name} without its int8 scales "
            "(SCB) although the model quantizes that layer; re-export the "
            "checkpoint with that layer quantized.",
            tensor=weight_name,
        )
    progress.done()
