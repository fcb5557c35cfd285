# SPDX-License-Identifier: Apache-2.0
"""A candidate bitsandbytes 4-bit GEMV for one token, kept beside its
benchmark until a GPU run shows whether it beats bitsandbytes' own.

At one token the plugin calls bitsandbytes' GEMV (`triton_4bit.matmul`),
which reads the weights at about a fifth of an H200's memory bandwidth. A
GEMV is bound by how many bytes each SM keeps in flight, so this one gives
every thread several rows of one 64-column chunk: two 16-byte loads per row
and chunk, all issued before any is used, and the activations loaded once
per chunk for all of the thread's rows. The decode is `fused_4bit`'s (byte
permutes on a per-block table, the weights `dequantize_4bit` gives, bit for
bit); the products accumulate in float32 and split K fills the GPU, summed
in a fixed order (`fused_4bit._write_tile`).

`benchmarks/gpu_4bit.py` times it (its `gemv` column, one token) next to
bitsandbytes' GEMV; `benchmarks/gpu_4bit_sass.py` counts its instructions
without a GPU; `tests/plugins/bitsandbytes/triton_4bit_checks.py` checks
it, under Triton's interpreter in CI.
"""

import torch
import triton
import triton.language as tl

from vllm.plugins.bitsandbytes import fused_4bit
from vllm.plugins.bitsandbytes.triton_4bit import MergedWeight

# Weight rows per program and warps: 4 rows per thread.
ROWS = 512
NUM_WARPS = 4


@triton.jit
def _low(pair):
    """The bfloat16 in the low half of `pair`, as float32."""
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _high(pair):
    """The bfloat16 in the high half of `pair`, as float32."""
    return (pair & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _multiply_words(acc, words, absmax, codes_ptr, x_ptr):
    """acc (R, 4) plus each word's 8 weights times the 8 activations at
    `x_ptr` (4, 8 apart): the products of 4 consecutive words of each row."""
    p0, p1, p2, p3 = fused_4bit.decode_pairs(words, absmax, codes_ptr)
    x = x_ptr + tl.arange(0, 4) * 8
    acc += _low(p0) * tl.load(x + 0).to(tl.float32)[None, :]
    acc += _high(p0) * tl.load(x + 1).to(tl.float32)[None, :]
    acc += _low(p1) * tl.load(x + 2).to(tl.float32)[None, :]
    acc += _high(p1) * tl.load(x + 3).to(tl.float32)[None, :]
    acc += _low(p2) * tl.load(x + 4).to(tl.float32)[None, :]
    acc += _high(p2) * tl.load(x + 5).to(tl.float32)[None, :]
    acc += _low(p3) * tl.load(x + 6).to(tl.float32)[None, :]
    acc += _high(p3) * tl.load(x + 7).to(tl.float32)[None, :]
    return acc


@triton.jit
def gemv_kernel(
    x_ptr,
    words_ptr,
    absmax_ptr,
    codes_ptr,
    partial_ptr,
    arrivals_ptr,
    out_ptr,
    N,
    K_WORDS,
    K_BLOCKS,
    STEPS,
    STEPS_PER_SPLIT,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out (1, N) = x (1, K) @ weight.T for BLOCK_N weight rows, over one of
    SPLIT ranges of K, a chunk of 64 columns (8 words, one absmax) a step.

    A chunk's two 16-byte halves are loaded as two tensors of the same
    layout, so one thread holds both and builds the block's table once. The
    absmax is loaded in that layout too (the same address for the 4 words
    of a half) and reduced within the thread, which keeps the table out of
    a shared-memory layout conversion.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    quad = tl.arange(0, 4)
    row_words = rows.to(tl.int64)[:, None] * K_WORDS + quad[None, :]
    row_blocks = rows.to(tl.int64)[:, None] * K_BLOCKS + quad[None, :] * 0
    mask = row_mask[:, None]
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    first = pid_k * STEPS_PER_SPLIT
    last = tl.minimum(first + STEPS_PER_SPLIT, STEPS)
    # Each step loads the next step's words before it decodes its own, so
    # the loads of two steps are in flight (the last step loads itself
    # again).
    low_words = tl.load(words_ptr + row_words + first * 8, mask=mask, other=0)
    high_words = tl.load(words_ptr + row_words + first * 8 + 4, mask=mask, other=0)
    for step in range(first, last):
        k = step * 64
        next_words = words_ptr + row_words + tl.minimum(step + 1, last - 1) * 8
        next_low = tl.load(next_words, mask=mask, other=0)
        next_high = tl.load(next_words + 4, mask=mask, other=0)
        absmax = tl.max(
            tl.load(absmax_ptr + row_blocks + k // BLOCKSIZE, mask=mask, other=0.0),
            axis=1,
        )
        acc = _multiply_words(acc, low_words, absmax, codes_ptr, x_ptr + k)
        acc = _multiply_words(acc, high_words, absmax, codes_ptr, x_ptr + k + 32)
        low_words, high_words = next_low, next_high
    fused_4bit._write_tile(
        tl.sum(acc, axis=1)[:, None],
        rows,
        tl.arange(0, 1),
        row_mask,
        tl.full((1,), True, tl.int1),
        partial_ptr,
        arrivals_ptr,
        out_ptr,
        1,
        N,
        N,
        pid_k,
        pid_n,
        SPLIT,
    )


def matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    split: int | None = None,
    rows_per_program: int = ROWS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """x (1, K) bfloat16 times the merged weight transposed, into `out`
    (1, N) bfloat16 if given. `split` fixes the number of K ranges per
    tile (by default: enough to fill the GPU); the last two arguments are
    for sweeps of the launch configuration."""
    if not fused_4bit.supports(weight):
        raise ValueError(
            f"the 4-bit GEMV needs blocks of a multiple of 64 columns, "
            f"not {weight.state.blocksize}"
        )
    if x.dtype != torch.bfloat16 or x.shape[0] != 1:
        raise ValueError(
            f"the 4-bit GEMV multiplies one token of bfloat16 activations, "
            f"not {tuple(x.shape)} {x.dtype}"
        )
    rows, columns = weight.state.shape
    if out is None:
        out = torch.empty(1, rows, dtype=torch.bfloat16, device=x.device)
    if out.stride(1) != 1:
        raise ValueError("the 4-bit GEMV writes an out with unit column stride")
    x = x.contiguous()
    steps = columns // 64
    programs = triton.cdiv(rows, rows_per_program)
    if split is None:
        split = fused_4bit._split_for(x.device, programs, steps)
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)
    partial = (
        torch.empty(split, rows, dtype=torch.float32, device=x.device)
        if split > 1
        else out
    )
    gemv_kernel[(programs, split)](
        x,
        weight.packed.view(torch.int32),
        weight.state.absmax,
        weight.table,
        partial,
        fused_4bit._arrivals(x.device, programs),
        out,
        rows,
        columns // 8,
        columns // weight.state.blocksize,
        steps,
        steps_per_split,
        BLOCKSIZE=weight.state.blocksize,
        BLOCK_N=rows_per_program,
        SPLIT=split,
        num_warps=num_warps,
    )
    return out
