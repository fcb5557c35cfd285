# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Checks that a checkpoint's quantized tensors and states fit together.

bitsandbytes trusts its states: a wrong block size, a short absmax or a NaN
scale is not an error there but a crash deep in a kernel or a model that
silently computes garbage. Everything a pre-quantized checkpoint stores is
therefore checked here, while it is read, and refused with one sentence
naming the tensor at fault. The checks come before bitsandbytes' own
parsers (`unpack_tensor_to_dict`, `QuantState.from_dict`), whose errors are
a `KeyError` or a bare `assert` that names neither the field nor the tensor.
"""

import math
from typing import Any

import torch

from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.checkpoint_files import error_summary
from vllm.plugins.bitsandbytes.config import (
    BLOCK_SIZES,
    PACKED_STATE_PREFIX,
    SUPPORTED_4BIT_QUANT_TYPES,
    BitsAndBytesCheckpointError,
)

WEIGHT_DTYPES = ("float16", "bfloat16", "float32")
# Entries of the 4-bit code book and of the 8-bit one of double quantization.
CODE_SIZE_4BIT = 16
CODE_SIZE_8BIT = 256


def _corrupt(
    weight_name: str, problem: str, component: str | None = None
) -> BitsAndBytesCheckpointError:
    """The error for a bad state; `component` is the stored tensor at fault."""
    return BitsAndBytesCheckpointError(
        f"The bitsandbytes quant_state of {weight_name} is corrupt: {problem}; "
        "re-export the checkpoint with transformers and bitsandbytes.",
        tensor=f"{weight_name}.{component}" if component else weight_name,
    )


def _packed_fields(weight_name: str, components: dict[str, torch.Tensor]) -> dict:
    from bitsandbytes.functional import unpack_tensor_to_dict

    packed_keys = [key for key in components if key.startswith(PACKED_STATE_PREFIX)]
    if len(packed_keys) != 1:
        raise BitsAndBytesCheckpointError(
            f"The checkpoint has no single 'quant_state.bitsandbytes__*' entry "
            f"for {weight_name}; re-export the checkpoint with transformers and "
            "bitsandbytes.",
            tensor=weight_name,
        )
    quant_type = packed_keys[0].removeprefix(PACKED_STATE_PREFIX)
    if quant_type not in SUPPORTED_4BIT_QUANT_TYPES:
        raise BitsAndBytesCheckpointError(
            f"{weight_name} uses bitsandbytes quant type {quant_type!r}; only "
            f"{' and '.join(SUPPORTED_4BIT_QUANT_TYPES)} checkpoints are supported.",
            tensor=weight_name,
        )
    blob = components[packed_keys[0]]
    # bitsandbytes would decode the bytes of any dtype and shape as JSON.
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise _corrupt(weight_name, "its packed fields are not a 1-D uint8 tensor")
    try:
        fields = unpack_tensor_to_dict(blob)
    except (UnicodeDecodeError, ValueError):
        fields = None
    if not isinstance(fields, dict):
        raise _corrupt(weight_name, "its packed fields are not a JSON object")
    if fields.get("quant_type") != quant_type:
        raise _corrupt(
            weight_name,
            f"quant_type {fields.get('quant_type')!r} does not match its "
            f"entry's {quant_type!r}",
        )
    return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_size(weight_name: str, fields: dict, name: str) -> int:
    value = fields.get(name)
    if not _is_int(value) or value not in BLOCK_SIZES:
        raise _corrupt(
            weight_name, f"{name} {value!r} is not one of {list(BLOCK_SIZES)}"
        )
    return value


def _dtype(weight_name: str, fields: dict, name: str) -> str:
    value = fields.get(name)
    if value not in WEIGHT_DTYPES:
        raise _corrupt(weight_name, f"{name} {value!r} is not one of {WEIGHT_DTYPES}")
    return value


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in a float tensor, in one reduction.

    A float64 sum of float32 values cannot overflow, and any NaN or infinity
    makes it non-finite; this is 2-4x cheaper than `isfinite(...).all()` on
    the hundreds of small state tensors of a checkpoint.
    """
    return math.isfinite(tensor.sum(dtype=torch.float64).item())


def _tensor(
    weight_name: str,
    components: dict[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
    numel: int,
) -> torch.Tensor:
    """A 1-D component of the given dtype and size, with finite values.

    bitsandbytes would take any tensor, so a wrong one surfaces only in a
    kernel; the component is checked before it is handed over.
    """
    tensor = components.get(name)
    if tensor is None:
        raise _corrupt(weight_name, f"{name} is missing")
    if tensor.dtype != dtype or tuple(tensor.shape) != (numel,):
        raise _corrupt(
            weight_name,
            f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected "
            f"{dtype} of shape ({numel},)",
            component=name,
        )
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise _corrupt(
            weight_name, f"{name} holds NaN or infinite values", component=name
        )
    return tensor


def parse_4bit_state(weight_name: str, components: dict[str, torch.Tensor]) -> Any:
    """The `QuantState` of a pre-quantized 4-bit weight, after checking it all.

    bitsandbytes' `QuantState.from_dict` builds it from the checked
    components and fields only: it asserts that it knows every key, while an
    unknown packed field has never stopped a load.
    """
    from bitsandbytes.functional import QuantState

    fields = _packed_fields(weight_name, components)
    shape = fields.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(_is_int(size) and size > 0 for size in shape)
    ):
        raise _corrupt(weight_name, f"shape {shape!r} is not two positive sizes")
    blocksize = _block_size(weight_name, fields, "blocksize")
    blocks = math.ceil(math.prod(shape) / blocksize)
    # Double quantization stores the absmax as 8-bit codes.
    nested = "nested_absmax" in components
    checked = {
        "quant_type": fields["quant_type"],
        "shape": shape,
        "blocksize": blocksize,
        "quant_map": _tensor(
            weight_name, components, "quant_map", torch.float32, CODE_SIZE_4BIT
        ),
        "absmax": _tensor(
            weight_name,
            components,
            "absmax",
            torch.uint8 if nested else torch.float32,
            blocks,
        ),
    }
    if nested:
        nested_blocksize = _block_size(weight_name, fields, "nested_blocksize")
        nested_offset = fields.get("nested_offset")
        if not isinstance(nested_offset, (int, float)) or not math.isfinite(
            nested_offset
        ):
            raise _corrupt(
                weight_name, f"nested_offset {nested_offset!r} is not a finite number"
            )
        checked |= {
            "nested_blocksize": nested_blocksize,
            "nested_offset": nested_offset,
            "nested_absmax": _tensor(
                weight_name,
                components,
                "nested_absmax",
                torch.float32,
                math.ceil(blocks / nested_blocksize),
            ),
            "nested_quant_map": _tensor(
                weight_name,
                components,
                "nested_quant_map",
                torch.float32,
                CODE_SIZE_8BIT,
            ),
            "nested_dtype": _dtype(weight_name, fields, "nested_dtype"),
        }
    checked["dtype"] = _dtype(weight_name, fields, "dtype")
    try:
        return QuantState.from_dict(checked, device=current_platform.device_type)
    except (AssertionError, KeyError, TypeError, ValueError) as err:
        # Not reached by any checkpoint the checks above let through.
        raise _corrupt(
            weight_name, f"bitsandbytes cannot read it ({error_summary(err)})"
        ) from err


def check_4bit_weight(weight_name: str, weight: torch.Tensor, state: Any) -> None:
    """The packed bytes must hold exactly the values the state describes."""
    values = math.prod(state.shape)
    # transformers stores the bytes as one column, (bytes, 1).
    if (
        weight.dtype != torch.uint8
        or weight.numel() * 2 != values
        or weight.dim() > 2
        or weight.dim() == 2
        and weight.shape[1] != 1
    ):
        raise BitsAndBytesCheckpointError(
            f"The packed 4-bit weight {weight_name} is {weight.dtype} of shape "
            f"{tuple(weight.shape)} but its quant_state describes "
            f"{values} 4-bit values, ({values // 2}, 1) uint8 bytes; re-export the "
            "checkpoint with transformers and bitsandbytes.",
            tensor=weight_name,
        )


def check_int8_weight(
    weight_name: str, weight: torch.Tensor, scales: torch.Tensor
) -> None:
    """An LLM.int8() weight is int8 rows, each with one finite non-negative scale."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise BitsAndBytesCheckpointError(
            f"The 8-bit weight {weight_name} is {weight.dtype} of shape "
            f"{tuple(weight.shape)}, not a 2-D int8 matrix; re-export the "
            "checkpoint with transformers and bitsandbytes.",
            tensor=weight_name,
        )
    if (
        scales.dtype != torch.float32
        or tuple(scales.shape) != (weight.shape[0],)
        or not _all_finite(scales)
        or not (scales >= 0).all()
    ):
        raise BitsAndBytesCheckpointError(
            f"The int8 scales (SCB) of {weight_name} are {scales.dtype} of shape "
            f"{tuple(scales.shape)}; expected {weight.shape[0]} finite non-negative "
            "float32 values, one per row; re-export the checkpoint with "
            "transformers and bitsandbytes.",
            # transformers saves the scales of `<module>.weight` as `<module>.SCB`.
            tensor=weight_name.removesuffix(".weight") + ".SCB",
        )
