# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Online quantization: an unquantized checkpoint quantized while it loads.

4-bit cuts each target weight to this rank's part first and quantizes the
part (NF4, double-quantized statistics, as vLLM always has). LLM.int8()
quantizes each weight whole, exactly as transformers does when it loads a
model with `load_in_8bit=True` (`bitsandbytes.nn.Int8Params`: float16, one
absmax scale per row), and only then cuts it (core's weight loader narrows
the int8 matrix, this stream the scales). So every tensor-parallel size
loads the very bytes a TP=1 load and a transformers-saved 8-bit checkpoint
hold; a row-parallel rank keeps the full-row scales.
"""

from typing import Any

import torch

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.layout import ModelLayout
from vllm.plugins.bitsandbytes.reshard import reshard_int8_scales
from vllm.plugins.bitsandbytes.streams import CheckpointTensors, LoadProgress
from vllm.utils.torch_utils import set_default_torch_dtype

logger = init_logger(__name__)

# The online 4-bit format is fixed, whatever the config's 4-bit fields say:
# NF4 with double-quantized statistics, what vLLM has always produced.
ONLINE_QUANT_TYPE = "nf4"
ONLINE_DOUBLE_QUANT = True
# bitsandbytes quantizes 8-bit weights from float16 (`Int8Params._quantize`).
INT8_SOURCE_DTYPE = torch.float16


def quantize_online_4bit(
    checkpoint: CheckpointTensors,
    layout: ModelLayout,
    states: dict[str, Any],
    tp_rank: int,
    tp_size: int,
) -> CheckpointTensors:
    """Cut this rank's part of each target weight and quantize it to 4 bits."""
    from vllm.plugins.bitsandbytes.quantize import quantize_4bit

    progress = LoadProgress("quantized")
    for name, tensor in checkpoint:
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
                compress_statistics=ONLINE_DOUBLE_QUANT,
                quant_type=ONLINE_QUANT_TYPE,
            )
        progress.step()
        yield name, packed
    progress.done()


def quantize_online_int8(
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
