# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fast CPU 4-bit quantization, byte for byte what bitsandbytes produces.

On CPU bitsandbytes quantizes with a generic torch kernel: it scales each
block by the reciprocal of its absolute maximum in float32 and finds the code
with `torch.bucketize` against the midpoints of the 16 code values. That
search runs at ~20 Mparam/s and makes online quantization ~20x slower than
reading the checkpoint.

This module does the same float32 arithmetic and replaces the search by table
look-ups: the top 16 bits of a float32 select an interval of values that
contains at most one distinct midpoint, so a table gives the midpoints below
the interval and one comparison with the midpoint inside it finishes the
count. Work runs in cache-sized chunks on a few threads (numpy releases the
GIL), so no float32 copy of the whole weight is ever made. Whatever this
cannot reproduce exactly (other devices, other bitsandbytes versions,
non-finite input) goes to bitsandbytes itself.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from vllm.plugins.bitsandbytes.config import BLOCK_SIZES, SUPPORTED_4BIT_QUANT_TYPES
from vllm.utils.torch_utils import set_default_torch_dtype

# The bitsandbytes releases whose CPU `quantize_4bit` kernel this module
# reproduces; others are left to bitsandbytes.
REPRODUCED_BITSANDBYTES = ("0.50.0", "0.51.0")
# bitsandbytes clamps each absolute maximum from below before inverting it.
MIN_ABSMAX = np.float32(1e-38)
# Blocksize of the second quantization of the absolute maxima.
NESTED_BLOCKSIZE = 256
# Values quantized per task: a few MiB of float32 temporaries stay in cache.
CHUNK_VALUES = 1 << 17
# The high half of a float32, as an unsigned index into 2**16 table entries.
HIGH_HALF_BITS = 16

FloatChunk = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _CodeTables:
    """Look-ups that turn scaled float32 values into bitsandbytes code indices.

    `below[h]` counts the midpoints smaller than every float32 whose high half
    is `h`; `inside[k][h]` is the k-th midpoint within that interval (+inf if
    none), so the midpoints below a value `v` number
    `below[h] + sum_k(v > inside[k][h])`, exactly what `torch.bucketize`
    returns. `code_of_count` maps that count to the stored code index when
    the code is not sorted (FP4); None when it is (NF4).
    """

    below: np.ndarray
    inside: tuple[np.ndarray, ...]
    code_of_count: np.ndarray | None

    def codes(self, scaled: np.ndarray) -> np.ndarray:
        """The 4-bit code index of each float32 value in `scaled`."""
        high = scaled.view(np.uint16)[1::2]  # little-endian high halves
        counts = self.below.take(high)
        for midpoints in self.inside:
            counts += scaled > midpoints.take(high)
        if self.code_of_count is not None:
            counts = self.code_of_count.take(counts)
        return counts


@cache
def _code_tables(quant_type: str) -> _CodeTables:
    """Tables for the midpoints bitsandbytes searches for `quant_type`."""
    from bitsandbytes.functional import get_4bit_type

    # vLLM quantizes under a float32 default dtype, which sets the code's.
    with set_default_torch_dtype(torch.float32):
        code = get_4bit_type(quant_type, device="cpu")
    # The same sort and midpoint arithmetic as the bitsandbytes CPU kernel.
    order = torch.argsort(code)
    midpoints = ((code[order[:-1]] + code[order[1:]]) / 2).numpy()

    high = np.arange(1 << HIGH_HALF_BITS, dtype=np.uint32) << HIGH_HALF_BITS
    ends = np.stack([high.view(np.float32), (high | 0xFFFF).view(np.float32)])
    lowest, highest = ends.min(axis=0), ends.max(axis=0)
    below = np.searchsorted(midpoints, lowest, side="left")
    within = np.searchsorted(midpoints, highest, side="left") - below
    inside = []
    for k in range(int(within.max())):
        table = np.full(high.shape, np.inf, dtype=np.float32)
        has_kth = within > k
        table[has_kth] = midpoints[below[has_kth] + k]
        inside.append(table)

    sorted_code = bool(torch.equal(order, torch.arange(order.numel())))
    return _CodeTables(
        below=below.astype(np.uint8),
        inside=tuple(inside),
        code_of_count=None if sorted_code else order.numpy().astype(np.uint8),
    )


def _pack(codes: np.ndarray) -> np.ndarray:
    """Two code indices per byte, the first in the high nibble."""
    pairs = codes.view(np.uint16)  # little-endian: first | second << 8
    return ((pairs << 4) | (pairs >> 8)).astype(np.uint8)


def _float32_chunks(values: torch.Tensor) -> tuple[np.ndarray, FloatChunk]:
    """A numpy view of `values` and how to widen a slice of it to float32.

    Widening is exact for every supported dtype; bfloat16 is the high half of
    a float32, which numpy has no type for.
    """
    if values.dtype == torch.bfloat16:
        raw = values.view(torch.int16).numpy().view(np.uint16)
        return raw, lambda part: (part.astype(np.uint32) << 16).view(np.float32)
    return values.numpy(), lambda part: part.astype(np.float32, copy=False)


def _quantize_blocks(
    values: np.ndarray,
    widen: FloatChunk,
    tables: _CodeTables,
    blocksize: int,
    packed: np.ndarray,
    absmax: np.ndarray,
) -> None:
    """Quantize whole blocks, multiplying by the reciprocal as bitsandbytes does."""
    blocks = widen(values).reshape(-1, blocksize)
    np.abs(blocks).max(axis=1, out=absmax)
    if not np.isfinite(absmax).all():
        return
    reciprocal = np.float32(1) / np.maximum(absmax, MIN_ABSMAX)
    scaled = blocks * reciprocal[:, None]
    packed[:] = _pack(tables.codes(scaled.reshape(-1)))


def _quantize_tail(
    values: np.ndarray, widen: FloatChunk, tables: _CodeTables
) -> tuple[np.ndarray, np.float32]:
    """Quantize the last, partial block, dividing as bitsandbytes does there.

    Unlike a whole block's, this absmax is stored clamped, and an odd value
    count is padded with a scaled 0, again like bitsandbytes.
    """
    tail = widen(values)
    absmax = np.maximum(np.abs(tail).max(), MIN_ABSMAX)
    scaled = np.zeros(tail.size + tail.size % 2, dtype=np.float32)
    if np.isfinite(absmax):
        scaled[: tail.size] = tail / absmax
    return _pack(tables.codes(scaled)), absmax


@cache
def _reproduces_bitsandbytes() -> bool:
    """Whether the installed bitsandbytes runs the CPU kernel reproduced here."""
    from importlib.metadata import version as installed_version

    from packaging import version

    first, after_last = map(version.parse, REPRODUCED_BITSANDBYTES)
    return first <= version.parse(installed_version("bitsandbytes")) < after_last


def _quantize_4bit_cpu(
    values: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Packed codes and per-block absmax, or None for non-finite input."""
    tables = _code_tables(quant_type)
    raw, widen = _float32_chunks(values.detach().reshape(-1))
    count = raw.size
    full = count - count % blocksize
    packed = np.empty((count + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(count // -blocksize), dtype=np.float32)

    chunk = max(CHUNK_VALUES // blocksize, 1) * blocksize

    def quantize_chunk(start: int) -> None:
        stop = min(start + chunk, full)
        _quantize_blocks(
            raw[start:stop],
            widen,
            tables,
            blocksize,
            packed[start // 2 : stop // 2],
            absmax[start // blocksize : stop // blocksize],
        )

    starts = range(0, full, chunk)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(quantize_chunk, starts):
                pass
    else:
        for start in starts:
            quantize_chunk(start)
    if full < count:
        packed[full // 2 :], absmax[-1] = _quantize_tail(raw[full:], widen, tables)

    if not np.isfinite(absmax).all():
        return None
    return torch.from_numpy(packed).unsqueeze(1), torch.from_numpy(absmax)


def quantize_4bit(
    values: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
) -> tuple[torch.Tensor, Any]:
    """`bitsandbytes.functional.quantize_4bit` with uint8 storage, faster on CPU.

    Returns the same packed tensor and `QuantState` as bitsandbytes, to the
    bit; anything the fast path does not cover is quantized by bitsandbytes.
    """
    import bitsandbytes.functional as bnb

    result = None
    if (
        values.device.type == "cpu"
        and values.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and values.numel() > 0
        and quant_type in SUPPORTED_4BIT_QUANT_TYPES
        and blocksize in BLOCK_SIZES
        and _reproduces_bitsandbytes()
    ):
        result = _quantize_4bit_cpu(values, blocksize, quant_type)
    if result is None:
        return bnb.quantize_4bit(
            values,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
        )

    packed, absmax = result
    code = bnb.get_4bit_type(quant_type, device=values.device)
    offset = nested_state = None
    if compress_statistics:
        offset = absmax.mean()
        absmax, nested_state = bnb.quantize_blockwise(
            absmax - offset, blocksize=NESTED_BLOCKSIZE
        )
    state = bnb.QuantState(
        absmax=absmax,
        shape=values.shape,
        dtype=values.dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=nested_state,
    )
    return packed, state
