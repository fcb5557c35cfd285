# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Cutting a pre-quantized bitsandbytes weight into tensor-parallel parts.

A pre-quantized checkpoint holds each weight for a single rank. A rank's part
can be cut out of the quantized storage without requantizing, exactly, as long
as no quantization block straddles two ranks:

* 4-bit weights are the row-major `[rows, cols]` matrix packed flat, two
  values per byte, with one absmax per `blocksize` consecutive values. A run
  of whole rows is one contiguous byte range and absmax range; a column range
  is one such range per row, which needs `cols` and the range boundaries to
  be multiples of the block size.
* LLM.int8() weights are a plain int8 `[rows, cols]` matrix, which core cuts
  like an unquantized one, with one scale (`SCB`) per row: rows take their
  scales along, columns keep all of them.

Which rows or columns a rank keeps is asked of the same `RankSplit` the
online path cuts unquantized weights with, so both paths agree by
construction.
"""

from typing import Any

import torch

from vllm.plugins.bitsandbytes.layout import RankSplit
from vllm.plugins.bitsandbytes.shard_indexer import VALUES_PER_PACKED_BYTE


def _kept_runs(
    split: RankSplit, extent: int, rank: int, world_size: int
) -> list[range]:
    """The index runs along the split dimension that `rank` keeps, in order."""
    # A single row (or column) of indices, cut like a weight.
    indices = torch.arange(extent).unsqueeze(1 if split.dim == 0 else 0)
    indices = split.take(indices, rank, world_size).reshape(-1).tolist()
    runs: list[range] = []
    start = previous = indices[0]
    for index in indices[1:]:
        if index != previous + 1:
            runs.append(range(start, previous + 1))
            start = index
        previous = index
    runs.append(range(start, previous + 1))
    return runs


def _misaligned(
    weight_name: str, shape: tuple[int, int], blocksize: int, world_size: int, how: str
) -> ValueError:
    rows, cols = shape
    return ValueError(
        f"Cannot split the pre-quantized bitsandbytes weight {weight_name} "
        f"({rows}x{cols}, blocks of {blocksize} values) {how} across "
        f"{world_size} tensor-parallel ranks without cutting through "
        "quantization blocks; use a tensor_parallel_size whose parts are whole "
        "blocks, load it with tensor_parallel_size=1, or quantize the "
        "unquantized checkpoint online."
    )


def reshard_4bit(
    weight_name: str,
    packed: torch.Tensor,
    state: Any,
    split: RankSplit,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, Any]:
    """This rank's packed bytes and `QuantState` of a 4-bit weight.

    `state` must hold plain float absmax (double quantization already
    expanded), so cutting it is a slice and the result dequantizes to exactly
    the matching part of the whole weight.
    """
    from bitsandbytes.functional import QuantState

    rows, cols = state.shape
    blocksize = state.blocksize
    flat = packed.reshape(-1)
    if split.dim == 0:
        byte_parts, absmax_parts = [], []
        for run in _kept_runs(split, rows, rank, world_size):
            first, end = run.start * cols, run.stop * cols
            if first % blocksize or (run.stop != rows and end % blocksize):
                raise _misaligned(
                    weight_name, (rows, cols), blocksize, world_size, "by rows"
                )
            byte_parts.append(
                flat[first // VALUES_PER_PACKED_BYTE : end // VALUES_PER_PACKED_BYTE]
            )
            absmax_parts.append(state.absmax[first // blocksize : -(-end // blocksize)])
        part_bytes = torch.cat(byte_parts)
        absmax = torch.cat(absmax_parts)
        part_shape = (part_bytes.numel() * VALUES_PER_PACKED_BYTE // cols, cols)
    else:
        (run,) = _kept_runs(split, cols, rank, world_size)
        if cols % blocksize or run.start % blocksize or run.stop % blocksize:
            raise _misaligned(
                weight_name, (rows, cols), blocksize, world_size, "by columns"
            )
        part_bytes = flat.view(rows, cols // VALUES_PER_PACKED_BYTE)[
            :, run.start // VALUES_PER_PACKED_BYTE : run.stop // VALUES_PER_PACKED_BYTE
        ]
        absmax = state.absmax.view(rows, cols // blocksize)[
            :, run.start // blocksize : run.stop // blocksize
        ]
        part_shape = (rows, len(run))
    part_state = QuantState(
        # Flat, as bitsandbytes' own states: a slice of it is a range of blocks.
        absmax=absmax.contiguous().reshape(-1),
        shape=torch.Size(part_shape),
        code=state.code,
        blocksize=blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return part_bytes.contiguous().reshape(-1, 1), part_state


def reshard_int8_scales(
    scales: torch.Tensor, split: RankSplit, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's per-row scales (`SCB`) of an int8 weight.

    The int8 weight itself needs no cutting here: it is a plain matrix without
    a `shard_indexer`, which core's weight loaders narrow like an unquantized
    one. A row-parallel rank keeps every row's scale: it computes a partial
    sum of every output, which the scale multiplies before the all-reduce
    adds them up.
    """
    if split.dim != 0:
        return scales
    return split.take(scales, rank, world_size)
