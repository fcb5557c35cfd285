# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Quantizing an unquantized checkpoint to LLM.int8() while it loads.

Each target weight is quantized whole, exactly as transformers does when it
loads a model with `load_in_8bit=True` (`bitsandbytes.nn.Int8Params`: float16,
one absmax scale per row), and only then cut to this rank's part (core's
weight loader narrows the int8 matrix, this stream the scales). So every
tensor-parallel size loads the very bytes a TP=1 load and a transformers-saved
8-bit checkpoint hold; a row-parallel rank keeps the full-row scales.
"""

from typing import Any

import torch

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.checkpoint import CheckpointTensors
from vllm.plugins.bitsandbytes.layout import ModelLayout
from vllm.plugins.bitsandbytes.reshard import reshard_int8_scales

logger = init_logger(__name__)

# bitsandbytes quantizes 8-bit weights from float16 (`Int8Params._quantize`).
INT8_SOURCE_DTYPE = torch.float16


def quantize_in_flight_int8(
    checkpoint: CheckpointTensors,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int,
    tp_size: int,
) -> CheckpointTensors:
    """Stream int8 weights, recording each one's per-row scales (`SCB`)."""
    from bitsandbytes.functional import int8_vectorwise_quant

    count = 0
    for name, tensor in checkpoint:
        weight_name = layout.checkpoint_name(name)
        split = layout.split_of(weight_name) if weight_name else None
        if split is None:
            yield name, tensor
            continue
        if not tensor.is_floating_point():
            raise ValueError(
                f"{weight_name} is already quantized ({tensor.dtype}), so it "
                "cannot be quantized to 8 bits while loading; drop the "
                "quantization_config override and load the checkpoint as it is."
            )
        weight = tensor.to(
            device=current_platform.device_type, dtype=INT8_SOURCE_DTYPE
        ).contiguous()
        quantized, scales, _ = int8_vectorwise_quant(weight)
        states[weight_name] = reshard_int8_scales(scales, split, tp_rank, tp_size)
        count += 1
        yield name, quantized
    logger.info("bitsandbytes: quantized %d weights to 8 bits", count)
