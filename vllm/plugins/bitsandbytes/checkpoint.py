# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Checkpoint streams that turn checkpoint tensors into bitsandbytes storage.

Each stream yields `(checkpoint name, tensor)` pairs for the model's own
`load_weights` and records, under vLLM's unstacked tensor name, the state
bitsandbytes needs to use each quantized weight: a `QuantState` for 4-bit,
the per-row scales (`SCB`) for LLM.int8().
"""

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.config import BitsAndBytesCheckpointError
from vllm.plugins.bitsandbytes.layout import WEIGHT_SUFFIX, ModelLayout
from vllm.plugins.bitsandbytes.reshard import reshard_4bit, reshard_int8_scales
from vllm.plugins.bitsandbytes.state_checks import (
    PACKED_STATE_PREFIX,
    check_4bit_weight,
    check_int8_weight,
    parse_4bit_state,
)
from vllm.plugins.bitsandbytes.states import _flatten_double_quant
from vllm.utils.torch_utils import set_default_torch_dtype

logger = init_logger(__name__)

CheckpointTensors = Iterator[tuple[str, torch.Tensor]]
# Opens a fresh pass over the checkpoint; pre-quantized streams read it twice
# because a weight may come before its quantization state.
OpenCheckpoint = Callable[[], CheckpointTensors]

# The in-flight format is fixed, whatever the config's 4-bit fields say: NF4
# with double-quantized statistics, what vLLM has always produced.
IN_FLIGHT_QUANT_TYPE = "nf4"
IN_FLIGHT_DOUBLE_QUANT = True
PROGRESS_LOG_INTERVAL_S = 30.0

# Components transformers saves next to a 4-bit weight `<name>.weight`.
STATE_COMPONENTS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# The non-tensor fields (shape, dtype, quant type, ...) packed into one tensor
# named `<weight>.quant_state.bitsandbytes__<quant type>`.
PACKED_STATE_HOLDER = "quant_state"
PACKED_STATE_TYPE_PREFIX = "bitsandbytes__"
INT8_SCALE_SUFFIX = ".scb"
INT8_FORMAT_SUFFIX = ".weight_format"


class _Progress:
    """Logs how far a long quantizing load has got, at most every interval."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.started = self.last_log = time.perf_counter()

    def step(self) -> None:
        self.count += 1
        now = time.perf_counter()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S:
            logger.info("bitsandbytes: %s %d weights so far", self.what, self.count)
            self.last_log = now

    def done(self) -> None:
        logger.info(
            "bitsandbytes: %s %d weights in %.1f s",
            self.what,
            self.count,
            time.perf_counter() - self.started,
        )


def quantize_in_flight(
    open_checkpoint: OpenCheckpoint,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int,
    tp_size: int,
) -> CheckpointTensors:
    """Cut this rank's part of each target weight and quantize it to 4 bits."""
    from vllm.plugins.bitsandbytes.quantize import quantize_4bit

    progress = _Progress("quantized")
    for name, tensor in open_checkpoint():
        weight_name = layout.checkpoint_name(name)
        split = layout.split_of(weight_name) if weight_name else None
        if split is None:
            yield name, tensor
            continue
        part = split.take(tensor, tp_rank, tp_size)
        if not part.is_cuda:
            part = part.to(device=current_platform.device_type)
        # bitsandbytes reads the tensor as dense memory, see
        # https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1342
        part = part.contiguous()
        # Quantization statistics are computed in float32.
        with set_default_torch_dtype(torch.float32):
            packed, states[weight_name] = quantize_4bit(
                part,
                compress_statistics=IN_FLIGHT_DOUBLE_QUANT,
                quant_type=IN_FLIGHT_QUANT_TYPE,
            )
        progress.step()
        yield name, packed
    progress.done()


def _owner_of_4bit_component(weight_name: str) -> tuple[str, str] | None:
    """Split `<weight>.<component>` for a 4-bit state component, else None."""
    owner, _, component = weight_name.rpartition(".")
    if component in STATE_COMPONENTS_4BIT:
        return owner, component
    if component.startswith(PACKED_STATE_TYPE_PREFIX):
        owner, _, holder = owner.rpartition(".")
        if holder == PACKED_STATE_HOLDER:
            return owner, f"{holder}.{component}"
    return None


def read_prequantized_4bit(
    open_checkpoint: OpenCheckpoint,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> CheckpointTensors:
    """Stream packed 4-bit weights after rebuilding their `QuantState`s.

    Under tensor parallelism each weight is cut to this rank's part, see
    `reshard`.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in open_checkpoint():
        weight_name = layout.checkpoint_name(name)
        if weight_name and (found := _owner_of_4bit_component(weight_name)):
            owner, component = found
            if component.startswith(PACKED_STATE_PREFIX):
                # bitsandbytes decodes the packed fields from host memory.
                tensor = tensor.cpu()
            components.setdefault(owner, {})[component] = tensor

    progress = _Progress("read pre-quantized")
    for name, tensor in open_checkpoint():
        weight_name = layout.checkpoint_name(name)
        if weight_name is None:
            yield name, tensor
            continue
        if _owner_of_4bit_component(weight_name):
            continue
        if weight_name in components:
            states[weight_name] = parse_4bit_state(
                weight_name, components.pop(weight_name)
            )
            check_4bit_weight(weight_name, tensor, states[weight_name])
            split = layout.split_of(weight_name)
            if tp_size > 1 and split is not None and split.dim is not None:
                # Block scales are sliced, so they must be plain floats first.
                _flatten_double_quant(states[weight_name])
                tensor, states[weight_name] = reshard_4bit(
                    weight_name, tensor, states[weight_name], split, tp_rank, tp_size
                )
            progress.step()
        elif layout.split_of(weight_name) is not None:
            raise BitsAndBytesCheckpointError(
                f"The checkpoint stores {weight_name} without a bitsandbytes "
                "quant_state although the model quantizes that layer; re-export "
                "the checkpoint with that layer quantized."
            )
        yield name, tensor
    progress.done()


def read_prequantized_int8(
    open_checkpoint: OpenCheckpoint,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> CheckpointTensors:
    """Stream int8 weights after collecting their per-row scales (`SCB`).

    Under tensor parallelism each weight is cut to this rank's part, see
    `reshard`.
    """
    for name, tensor in open_checkpoint():
        weight_name = layout.checkpoint_name(name)
        if weight_name and weight_name.lower().endswith(INT8_SCALE_SUFFIX):
            owner = weight_name[: -len(INT8_SCALE_SUFFIX)]
            states[owner + WEIGHT_SUFFIX] = tensor

    progress = _Progress("read pre-quantized")
    for name, tensor in open_checkpoint():
        weight_name = layout.checkpoint_name(name)
        if weight_name is None:
            yield name, tensor
            continue
        if weight_name.lower().endswith((INT8_SCALE_SUFFIX, INT8_FORMAT_SUFFIX)):
            continue
        if weight_name in states:
            check_int8_weight(weight_name, tensor, states[weight_name])
            split = layout.split_of(weight_name)
            if tp_size > 1 and split is not None and split.dim is not None:
                states[weight_name] = reshard_int8_scales(
                    states[weight_name], split, tp_rank, tp_size
                )
            progress.step()
        elif layout.split_of(weight_name) is not None:
            raise BitsAndBytesCheckpointError(
                f"The checkpoint stores {weight_name} without its int8 scales "
                "(SCB) although the model quantizes that layer; re-export the "
                "checkpoint with that layer quantized."
            )
        yield name, tensor
    progress.done()
