# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A fused bitsandbytes 4-bit matmul for CUDA, for a few to a hundred tokens.

Each program decodes a tile of weights in registers and multiplies it on
the tensor cores, so the weights never reach memory as bfloat16. It reads a
merged layer's storage (`triton_4bit.MergedWeight`) as bitsandbytes writes
it and multiplies by exactly `dequantize_4bit`'s weights, decoded by
`triton_4bit.decode_pairs`. `triton_4bit.matmul` calls it for the token
counts where it is the fastest path (docs/benchmarks.md, section 5,
measured on an H200).

`benchmarks/gpu_4bit.py` times it (its `fused` column) next to the other
paths and bf16; `benchmarks/gpu_4bit_sass.py` counts its instructions
without a GPU; `tests/plugins/bitsandbytes/triton_4bit_checks.py` checks it,
under Triton's interpreter in CI. Like `triton_4bit`, it imports only
torch, triton and bitsandbytes.
"""

import functools

import torch
import triton
import triton.language as tl

from vllm.plugins.bitsandbytes.triton_4bit import (
    _INTERPRETED,
    MergedWeight,
    _to_bfloat16,
    decode_pairs,
)


@triton.jit
def _decode_words(words, absmax, codes_ptr):
    """The 8 bfloat16 weights of each int32 word of `words` (R, C, 8), in
    column order, as 8 tensors of its shape; `absmax` (R, C) is the block's.
    """
    p0, p1, p2, p3 = decode_pairs(words, absmax, codes_ptr)
    return (
        _low_half(p0),
        _high_half(p0),
        _low_half(p1),
        _high_half(p1),
        _low_half(p2),
        _high_half(p2),
        _low_half(p3),
        _high_half(p3),
    )


@triton.jit
def _low_half(pair):
    return (pair & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _high_half(pair):
    return (pair >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def fused_kernel(
    x_ptr,
    words_ptr,
    absmax_ptr,
    codes_ptr,
    partial_ptr,
    arrivals_ptr,
    out_ptr,
    M,
    N,
    K_WORDS,
    K_BLOCKS,
    STEPS,
    STEPS_PER_SPLIT,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNKS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out (M, N) = x (M, K) @ weight.T for one tile of BLOCK_N weight rows
    and BLOCK_M tokens, over one of SPLIT ranges of K.

    A step covers CHUNKS chunks of 64 columns (8 words; one absmax each, as
    blocks are multiples of 64), held by one thread each, so a thread builds
    each table once.
    """
    STEP: tl.constexpr = 64 * CHUNKS
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    token_mask = tokens < M
    chunks = tl.arange(0, CHUNKS)
    # A chunk's 8 words as two 16-byte halves, so that one thread loads both.
    chunk_words = (
        chunks[:, None, None] * 8
        + tl.arange(0, 2)[None, :, None] * 4
        + tl.arange(0, 4)[None, None, :]
    )
    row_words = rows.to(tl.int64)[:, None, None, None] * K_WORDS
    row_blocks = rows.to(tl.int64)[:, None] * K_BLOCKS
    columns = tl.arange(0, STEP)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = pid_k * STEPS_PER_SPLIT
    for step in range(first, tl.minimum(first + STEPS_PER_SPLIT, STEPS)):
        k = step * STEP
        words = tl.load(
            words_ptr + row_words + k // 8 + chunk_words[None],
            mask=row_mask[:, None, None, None],
            other=0,
        )
        absmax = tl.load(
            absmax_ptr + row_blocks + ((k + 64 * chunks) // BLOCKSIZE)[None, :],
            mask=row_mask[:, None],
            other=0.0,
        )
        v0, v1, v2, v3, v4, v5, v6, v7 = _decode_words(
            tl.reshape(words, (BLOCK_N, CHUNKS, 8)), absmax, codes_ptr
        )
        # join appends a dimension: value i of a word ends up at (i & 1,
        # i >> 1 & 1, i >> 2), which the permutation puts in column order.
        weights = tl.join(
            tl.join(tl.join(v0, v1), tl.join(v2, v3)),
            tl.join(tl.join(v4, v5), tl.join(v6, v7)),
        )
        weights = tl.reshape(tl.permute(weights, (0, 1, 2, 5, 4, 3)), (BLOCK_N, STEP))
        x = tl.load(
            x_ptr + tokens[None, :] * stride_xm + k + columns[:, None],
            mask=token_mask[None, :],
            other=0.0,
        )
        if _INTERPRETED:
            # The interpreter's bfloat16 dot is wrong; float32 holds both
            # operands exactly.
            acc += tl.dot(weights.to(tl.float32), x.to(tl.float32))
        else:
            acc = tl.dot(weights, x, acc)
    _write_tile(
        acc,
        rows,
        tokens,
        row_mask,
        token_mask,
        partial_ptr,
        arrivals_ptr,
        out_ptr,
        M,
        N,
        stride_om,
        pid_k,
        pid_m * tl.num_programs(0) + pid_n,
        SPLIT,
    )


@triton.jit
def _write_tile(
    acc,
    rows,
    tokens,
    row_mask,
    token_mask,
    partial_ptr,
    arrivals_ptr,
    out_ptr,
    M,
    N,
    stride_om,
    pid_k,
    tile,
    SPLIT: tl.constexpr,
):
    """Store a tile's float32 sums `acc` (rows, tokens) to `out` as bfloat16.

    With SPLIT > 1 each program stores its partial sums; the last one of
    the tile to arrive adds them in split order (the result does not depend
    on timing), writes `out` and resets the tile's arrival count for the
    next call.
    """
    out_mask = row_mask[:, None] & token_mask[None, :]
    out_offsets = tokens[None, :] * stride_om + rows[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + out_offsets, _to_bfloat16(acc), mask=out_mask)
    else:
        partial_offsets = tokens.to(tl.int64)[None, :] * N + rows[:, None]
        tl.store(partial_ptr + pid_k * M * N + partial_offsets, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in tl.static_range(SPLIT):
                total += tl.load(
                    partial_ptr + split * M * N + partial_offsets,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(out_ptr + out_offsets, _to_bfloat16(total), mask=out_mask)
            tl.atomic_xchg(arrivals_ptr + tile, 0)


# Weight rows per program of the fused kernel: one warpgroup's tensor-core
# tile.
ROWS = 64
# Most partial sums a tile of the fused kernel adds up.
MAX_SPLIT = 16


def supports(weight: MergedWeight) -> bool:
    """Whether `matmul` takes this layer: its chunks of 64 columns must each
    lie in one absmax block."""
    return weight.state.blocksize % 64 == 0 and weight.state.shape[1] % 64 == 0


@functools.cache
def _arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed arrival counts for `tiles` tiles, shared by every call with as
    many tiles on the device: calls on one stream run one after another, and
    each leaves the counts zero."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def launch_config(tokens: int, columns: int) -> tuple[int, int, int]:
    """BLOCK_M, CHUNKS and pipeline stages for `tokens` tokens and `columns`
    columns: the fastest of a sweep on an H200 at Llama-3-8B shapes (one
    warpgroup, 64 rows, 2 chunks, split K to fill the GPU;
    docs/benchmarks.md, section 5)."""
    block_m = min(128, max(16, triton.next_power_of_2(tokens)))
    chunks = 2 if columns % 128 == 0 else 1
    return block_m, chunks, 2 if block_m == 64 else 3


def _split_for(
    device: torch.device, programs: int, steps: int, per_processor: int = 2
) -> int:
    """Ranges of K per tile: enough programs to fill the GPU with
    `per_processor` programs per multiprocessor."""
    if device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    slots = per_processor * processors
    return max(1, min(MAX_SPLIT, steps, triton.cdiv(slots, programs)))


def split_k(
    out: torch.Tensor, programs: int, steps: int, split: int | None
) -> tuple[int, int, torch.Tensor]:
    """The ranges of K per tile (`split`, or enough to fill the GPU), the
    steps per range, and where the programs store their sums for
    `_write_tile`: `out` itself without a split, else float32 partial sums,
    one (M, N) slice per range."""
    if split is None:
        split = _split_for(out.device, programs, steps)
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)
    if split == 1:
        return split, steps_per_split, out
    partial = torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    return split, steps_per_split, partial


def matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    split: int | None = None,
    rows_per_program: int = ROWS,
    block_m: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out`
    (M, N) bfloat16 if given. `split` fixes the number of K ranges per tile
    (by default: enough to fill the GPU); the other arguments are for
    sweeps (`benchmarks/gpu_4bit.py --sweep`): weight rows, tokens, warps
    and pipeline stages per program instead of `launch_config`'s."""
    if not supports(weight):
        raise ValueError(
            f"the fused 4-bit kernel needs blocks of a multiple of 64 "
            f"columns, not {weight.state.blocksize}"
        )
    if x.dtype != torch.bfloat16:
        raise ValueError(
            f"the fused 4-bit kernel multiplies bfloat16 activations, not {x.dtype}"
        )
    rows, columns = weight.state.shape
    tokens = x.shape[0]
    if out is None:
        out = torch.empty(tokens, rows, dtype=torch.bfloat16, device=x.device)
    if tokens == 0:
        return out
    # The kernel reads rows of x and writes rows of out with unit stride.
    x = x.contiguous()
    if out.stride(1) != 1:
        raise ValueError("the fused 4-bit kernel writes an out with unit column stride")
    default_block_m, chunks, default_stages = launch_config(tokens, columns)
    block_m = block_m or default_block_m
    steps = columns // (64 * chunks)
    grid_n = triton.cdiv(rows, rows_per_program)
    grid_m = triton.cdiv(tokens, block_m)
    split, steps_per_split, partial = split_k(out, grid_n * grid_m, steps, split)
    fused_kernel[(grid_n, grid_m, split)](
        x,
        weight.packed.view(torch.int32),
        weight.state.absmax,
        weight.table,
        partial,
        _arrivals(x.device, grid_n * grid_m),
        out,
        tokens,
        rows,
        columns // 8,
        columns // weight.state.blocksize,
        steps,
        steps_per_split,
        x.stride(0),
        out.stride(0),
        BLOCKSIZE=weight.state.blocksize,
        BLOCK_N=rows_per_program,
        BLOCK_M=block_m,
        CHUNKS=chunks,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages or default_stages,
    )
    return out
