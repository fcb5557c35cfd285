# SPDX-License-Identifier: Apache-2.0
"""A candidate bitsandbytes 4-bit GEMV for 1 to 8 tokens, kept beside its
benchmark until a GPU run shows whether it beats bitsandbytes' GEMV (one
token) and the fused kernel (from 2 tokens).

At one token the plugin calls bitsandbytes' GEMV (`triton_4bit.matmul`),
which reads the weights at about a fifth of an H200's memory bandwidth;
from 2 tokens the fused kernel, bound by latency, takes as long as at 16. A
GEMV is bound by how many bytes each SM keeps in flight, so this one gives
every thread several rows of one 64-column chunk: two 16-byte loads per row
and chunk, all issued before any is used, and the activations loaded once
per chunk for all of the thread's rows. The decode is `fused_4bit`'s (byte
permutes on a per-block table, the weights `dequantize_4bit` gives, bit for
bit); each token then costs one float32 multiply-add per weight, which is
why it stops at a few tokens, where the tensor cores take over. Split K
fills the GPU, summed in a fixed order (`fused_4bit._write_tile`).

`benchmarks/gpu_4bit.py` times it (its `gemv` column) next to bitsandbytes'
GEMV; `benchmarks/gpu_4bit_sass.py` counts its instructions without a GPU;
`tests/plugins/bitsandbytes/triton_4bit_checks.py` checks it, under
Triton's interpreter in CI.
"""

import torch
import triton
import triton.language as tl

from vllm.plugins.bitsandbytes import fused_4bit
from vllm.plugins.bitsandbytes.triton_4bit import MergedWeight

# Weight rows per program and warps: 4 rows per thread.
ROWS = 512
NUM_WARPS = 4
# Most tokens per call: each adds about 1.5 instructions per weight to the
# decode's 5 (`benchmarks/gpu_4bit_sass.py`).
MAX_TOKENS = 8


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
    """acc (R, 4 * TOKENS) plus each word's 8 weights times the 8 activations
    of each token at `x_ptr` (4, 8 apart): the products of 4 consecutive
    words of each row, column 4 * word + token. `x_ptr` (4 * TOKENS,)
    points to each column's first activation for each token."""
    p0, p1, p2, p3 = fused_4bit.decode_pairs(words, absmax, codes_ptr)
    tokens: tl.constexpr = acc.shape[1] // 4
    acc += _per_token(_low(p0), tokens) * _x(x_ptr + 0)
    acc += _per_token(_high(p0), tokens) * _x(x_ptr + 1)
    acc += _per_token(_low(p1), tokens) * _x(x_ptr + 2)
    acc += _per_token(_high(p1), tokens) * _x(x_ptr + 3)
    acc += _per_token(_low(p2), tokens) * _x(x_ptr + 4)
    acc += _per_token(_high(p2), tokens) * _x(x_ptr + 5)
    acc += _per_token(_low(p3), tokens) * _x(x_ptr + 6)
    acc += _per_token(_high(p3), tokens) * _x(x_ptr + 7)
    return acc


@triton.jit
def _per_token(weights, TOKENS: tl.constexpr):
    """weights (R, 4) repeated for each token: (R, 4 * TOKENS). `join` puts
    the copies in the thread that holds the weights."""
    rows: tl.constexpr = weights.shape[0]
    copies = weights
    if TOKENS >= 2:
        copies = tl.join(copies, copies)
    if TOKENS >= 4:
        copies = tl.join(copies, copies)
    if TOKENS >= 8:
        copies = tl.join(copies, copies)
    return tl.reshape(copies, (rows, 4 * TOKENS))


@triton.jit
def _x(pointers):
    """Activations (4 * TOKENS,) as float32, broadcast over a thread's rows."""
    return tl.load(pointers).to(tl.float32)[None, :]


@triton.jit
def gemv_kernel(
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
    TOKENS: tl.constexpr,
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
    tokens = tl.arange(0, TOKENS)
    token_mask = tokens < M
    # Lane 4 * word + token of the accumulators: that word's columns for that
    # token. Padding tokens read the last token again; their sums are not
    # stored.
    lane = tl.arange(0, 4 * TOKENS)
    x_lanes = x_ptr + lane // TOKENS * 8 + tl.minimum(lane % TOKENS, M - 1) * stride_xm
    first = pid_k * STEPS_PER_SPLIT
    last = tl.minimum(first + STEPS_PER_SPLIT, STEPS)
    # Each step loads the next step's words before it decodes its own, so
    # the loads of two steps are in flight (the last step loads itself
    # again).
    low_words = tl.load(words_ptr + row_words + first * 8, mask=mask, other=0)
    high_words = tl.load(words_ptr + row_words + first * 8 + 4, mask=mask, other=0)
    acc = tl.zeros((BLOCK_N, 4 * TOKENS), dtype=tl.float32)
    for step in range(first, last):
        k = step * 64
        next_words = words_ptr + row_words + tl.minimum(step + 1, last - 1) * 8
        next_low = tl.load(next_words, mask=mask, other=0)
        next_high = tl.load(next_words + 4, mask=mask, other=0)
        absmax = tl.max(
            tl.load(absmax_ptr + row_blocks + k // BLOCKSIZE, mask=mask, other=0.0),
            axis=1,
        )
        acc = _multiply_words(acc, low_words, absmax, codes_ptr, x_lanes + k)
        acc = _multiply_words(acc, high_words, absmax, codes_ptr, x_lanes + k + 32)
        low_words, high_words = next_low, next_high
    fused_4bit._write_tile(
        tl.sum(tl.reshape(acc, (BLOCK_N, 4, TOKENS)), axis=1),
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
    """x (M, K) bfloat16, M at most MAX_TOKENS, times the merged weight
    transposed, into `out` (M, N) bfloat16 if given. `split` fixes the
    number of K ranges per tile (by default: enough to fill the GPU); the
    last two arguments are for sweeps of the launch configuration."""
    if not fused_4bit.supports(weight):
        raise ValueError(
            f"the 4-bit GEMV needs blocks of a multiple of 64 columns, "
            f"not {weight.state.blocksize}"
        )
    tokens = x.shape[0]
    if x.dtype != torch.bfloat16 or not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(
            f"the 4-bit GEMV multiplies 1 to {MAX_TOKENS} tokens of bfloat16 "
            f"activations, not {tuple(x.shape)} {x.dtype}"
        )
    rows, columns = weight.state.shape
    if out is None:
        out = torch.empty(tokens, rows, dtype=torch.bfloat16, device=x.device)
    if out.stride(1) != 1:
        raise ValueError("the 4-bit GEMV writes an out with unit column stride")
    x = x.contiguous()
    steps = columns // 64
    programs = triton.cdiv(rows, rows_per_program)
    split, steps_per_split, partial = fused_4bit.split_k(out, programs, steps, split)
    gemv_kernel[(programs, split)](
        x,
        weight.packed.view(torch.int32),
        weight.state.absmax,
        weight.table,
        partial,
        fused_4bit._arrivals(x.device, programs),
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
        TOKENS=triton.next_power_of_2(tokens),
        SPLIT=split,
        num_warps=num_warps,
    )
    return out
