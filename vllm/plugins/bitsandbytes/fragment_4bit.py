# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit matmul for decode batches on the tensor cores, with
the weights loaded straight into `mma.sync` operands, in programs of 8 or
16 tokens (a wider batch takes more programs, each decoding its weights).

`mma.sync.m16n8k16`'s operand fragments are registers of known lanes: lane
4g + t holds rows g and g + 8 of the weights and token g of the
activations, for the k slots of t. The words of a step are loaded as a
(4 rows, 4) tensor, chunk t (64 columns) of row j at 4 j + t, which every
Triton version lays out with that element in lane 4 (j % 8) + t, and rows
j and j + R / 2 in the same lane: a fragment's rows g and g + 8. So the
decoded bfloat16 pairs are the weight operand as they are. The k slots are
the lane's own columns and the activations are loaded in the same order
(pairs of bfloat16 as int32, one 16-byte load per word and 8 tokens), so
the product is unchanged. Nothing goes through shared memory in the loop,
which is what bounds the fused kernel (`fused_4bit`) at these batch sizes,
and 8 tokens cost half the multiplies of 16.

The decode is `triton_4bit.decode_pairs` (a per-block table built once
per row and chunk, byte permutes, exactly `dequantize_4bit`'s weights).
Under Triton's interpreter, which cannot run PTX, `_mma` computes what the
PTX ISA defines `mma.sync.m16n8k16` to compute from those lanes'
registers, so the CPU checks test the fragment mapping;
`benchmarks/gpu_4bit_sass.py` checks that the compiled loop keeps the
layout (no shared memory), and the GPU checks compare the compiled kernel
with bitsandbytes.
"""

import torch
import triton
import triton.language as tl

from vllm.plugins.bitsandbytes import fused_4bit
from vllm.plugins.bitsandbytes.triton_4bit import (
    _INTERPRETED,
    MergedWeight,
    decode_pairs,
)

# Tokens per program: two fragments (m16n8k16's N is 8). More tokens take
# more programs, each decoding the weights again.
TILE_TOKENS = 16
# Most tokens `triton_4bit.matmul` gives this kernel, as measured against
# one tile: beyond, the fused kernel decodes each weight once for up to 128
# tokens (`gpu_4bit.py --sweep` times more tiles against it;
# docs/benchmarks.md, section 5).
MAX_TOKENS = 16

MMA_PTX = tl.constexpr(
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
    "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
)


def launch_config(tokens: int) -> tuple[int, int]:
    """Weight rows per program and warps for `tokens` tokens: the fastest
    of a sweep on an H100 at Llama-3-8B shapes (docs/benchmarks.md)."""
    return (128, 4) if tokens <= 8 else (64, 2)


@triton.jit
def _low(pair):
    """The bfloat16 in the low half of `pair`, as float32."""
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _high(pair):
    """The bfloat16 in the high half of `pair`, as float32."""
    return (pair & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _pair_products(a, b):
    """The two products of bfloat16 pairs `a` (uint32) and `b` (int32),
    summed in float32."""
    b = b.to(tl.uint32, bitcast=True)
    return _low(a) * _low(b) + _high(a) * _high(b)


@triton.jit
def _fragment_sums(a_x, a_y, b_x, b_y):
    """What one m16n8k16 adds to 8 of its rows: (groups, row, token), each
    summing the k slots of the 4 lanes of a row. Arguments (groups, 8, 4),
    lane (g, t) at [:, g, t]: the rows' pairs `a_x`, `a_y` and the tokens'
    pairs `b_x`, `b_y` for the lane's two pairs of k slots."""
    products = _pair_products(a_x[:, :, None, :], b_x[:, None, :, :])
    products += _pair_products(a_y[:, :, None, :], b_y[:, None, :, :])
    return tl.sum(products, axis=3)


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """c += a @ b for one m16n8k16 fragment per 8 lanes, each argument
    (J, 4) with the register of lane (g = j % 8, t) at [j, t].

    a0/a2 hold the weights of the fragment's row g for the lane's two pairs
    of k slots, a1/a3 those of row g + 8; b0/b1 token g's activations for
    the same slots; c0/c1 hold (row g, tokens 2t and 2t + 1), c2/c3 row
    g + 8's.
    """
    if _INTERPRETED:
        lanes: tl.constexpr = a0.shape[0]
        shape: tl.constexpr = (lanes // 8, 8, 4)
        b0 = tl.reshape(b0, shape)
        b1 = tl.reshape(b1, shape)
        first = _fragment_sums(tl.reshape(a0, shape), tl.reshape(a2, shape), b0, b1)
        second = _fragment_sums(tl.reshape(a1, shape), tl.reshape(a3, shape), b0, b1)
        even_first, odd_first = tl.split(tl.reshape(first, (lanes, 4, 2)))
        even_second, odd_second = tl.split(tl.reshape(second, (lanes, 4, 2)))
        return c0 + even_first, c1 + odd_first, c2 + even_second, c3 + odd_second
    return tl.inline_asm_elementwise(
        MMA_PTX,
        "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
        [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
        dtype=(tl.float32,) * 4,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _split4(values):
    """The last dimension (4) of `values` (J, 4, 4) as 4 tensors, in order."""
    shape: tl.constexpr = values.shape
    even, odd = tl.split(tl.reshape(values, (shape[0], shape[1], 2, 2)))
    v0, v2 = tl.split(even)
    v1, v3 = tl.split(odd)
    return v0, v1, v2, v3


@triton.jit
def _halves(values):
    """`values` (R, 4, 4) as its first and second R / 2 rows, which are the
    same lanes' registers: a fragment's rows g and g + 8."""
    shape: tl.constexpr = values.shape
    halves = tl.reshape(values, (2, shape[0] // 2, shape[1], shape[2]))
    return tl.split(tl.permute(halves, (1, 2, 3, 0)))


@triton.jit
def _words(pairs):
    """A word's pairs of (R, 4, 4) `pairs` for both fragment rows, by word."""
    first, second = _halves(pairs)
    return _split4(first), _split4(second)


@triton.jit
def _multiply_half(acc, words, absmax, codes_ptr, x_tokens, TOKENS: tl.constexpr):
    """The fragments `acc` (8 tensors (R / 2, 4): c0-c3 for tokens 0-7,
    c4-c7 for 8-15) plus one 16-byte half of each lane's chunk: 4 words of
    (R, 4, 4) `words`, each two m16n8k16 (pairs 0 and 1, pairs 2 and 3) per
    8 tokens. `x_tokens` (2 tensors (R / 2, 4, 4)) point to the half's
    activations of tokens g and g + 8 as int32 pairs, word w's at 4 w."""
    c0, c1, c2, c3, c4, c5, c6, c7 = acc
    p0, p1, p2, p3 = decode_pairs(words, absmax, codes_ptr)
    # One target per assignment: triton 3.6 cannot parse nested unpacking.
    p0, p0_ = _words(p0)
    p1, p1_ = _words(p1)
    p2, p2_ = _words(p2)
    p3, p3_ = _words(p3)
    for word in tl.static_range(4):
        x0, x1, x2, x3 = _split4(_load_lanes(x_tokens[0] + 4 * word))
        a = (p0[word], p0_[word], p1[word], p1_[word])
        c0, c1, c2, c3 = _mma(*a, x0, x1, c0, c1, c2, c3)
        b = (p2[word], p2_[word], p3[word], p3_[word])
        c0, c1, c2, c3 = _mma(*b, x2, x3, c0, c1, c2, c3)
        if TOKENS == 16:
            x0, x1, x2, x3 = _split4(_load_lanes(x_tokens[1] + 4 * word))
            c4, c5, c6, c7 = _mma(*a, x0, x1, c4, c5, c6, c7)
            c4, c5, c6, c7 = _mma(*b, x2, x3, c4, c5, c6, c7)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _multiply_step(
    acc, low, high, absmax, codes_ptr, x_tokens, step, TOKENS: tl.constexpr
):
    """`acc` plus the products of one step: its two 16-byte halves."""
    x_step = (x_tokens[0] + step * 128, x_tokens[1] + step * 128)
    acc = _multiply_half(acc, low, absmax, codes_ptr, x_step, TOKENS)
    x_step = (x_step[0] + 16, x_step[1] + 16)
    return _multiply_half(acc, high, absmax, codes_ptr, x_step, TOKENS)


@triton.jit
def _tile(acc, TOKENS: tl.constexpr):
    """The fragments as a (rows, TOKENS) tile, rows in program order."""
    c0, c1, c2, c3, c4, c5, c6, c7 = acc
    lanes: tl.constexpr = c0.shape[0]
    first = tl.reshape(tl.join(c0, c1), (lanes, 8))
    second = tl.reshape(tl.join(c2, c3), (lanes, 8))
    if TOKENS == 16:
        first = tl.join(first, tl.reshape(tl.join(c4, c5), (lanes, 8)))
        first = tl.reshape(tl.permute(first, (0, 2, 1)), (lanes, 16))
        second = tl.join(second, tl.reshape(tl.join(c6, c7), (lanes, 8)))
        second = tl.reshape(tl.permute(second, (0, 2, 1)), (lanes, 16))
    tile = tl.permute(tl.join(first, second), (2, 0, 1))
    return tl.reshape(tile, (2 * lanes, TOKENS))


@triton.jit
def _load_lanes(pointers, mask=None, other=None):
    """Load (R * 4, C) `pointers` to lanes 4 j + t, element j * 4 + t, as
    (R, 4, C). The 4 of one row are along the first dimension with the
    rows, not one of their own: there every Triton version puts them in
    consecutive lanes, as the fragments need (with a dimension of equal
    contiguity for each, triton 3.6 and 3.9 order them differently)."""
    values = tl.load(pointers, mask=mask, other=other)
    return tl.reshape(values, (values.shape[0] // 4, 4, values.shape[1]))


@triton.jit
def _load_step(rows, step, BLOCKSIZE):
    """A step's absmax (R, 4) and words, as two 16-byte halves (R, 4, 4), of
    the program's `rows`: pointers to their first words (4 R, 4) and
    absmax blocks (4 R), the chunk of each (4 R) and its mask (4 R)."""
    words, blocks, chunks, chunk_mask = rows
    k = step * 256
    absmax = _load_lanes(
        (blocks + (k + 64 * chunks) // BLOCKSIZE)[:, None],
        mask=chunk_mask[:, None],
        other=0.0,
    )
    absmax = tl.reshape(absmax, (absmax.shape[0], 4))
    low = _load_lanes(words + k // 8, mask=chunk_mask[:, None], other=0)
    high = _load_lanes(words + k // 8 + 4, mask=chunk_mask[:, None], other=0)
    return absmax, low, high


@triton.jit
def fragment_kernel(
    x_ptr,
    words_ptr,
    absmax_ptr,
    codes_ptr,
    partial_ptr,
    arrivals_ptr,
    out_ptr,
    experts_ptr,
    routed_tokens_ptr,
    M,
    N,
    K_WORDS,
    K_BLOCKS,
    STEPS,
    STEPS_PER_SPLIT,
    stride_xm,
    stride_om,
    EXPERT_ROWS,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    SPLIT: tl.constexpr,
    ROUTED: tl.constexpr,
):
    """out (M, N) = x (M, K) @ weight.T for BLOCK_N weight rows and one
    tile of TOKENS (8 or 16) tokens, over one of SPLIT ranges of K, 4 chunks of 64
    columns (one per lane of a row) a step, with the loads of the next
    step in flight. `x_ptr` is x as int32 pairs,
    `stride_xm` in pairs.

    ROUTED: the weight is a stack of experts of EXPERT_ROWS rows, and out
    (1, N) holds N / EXPERT_ROWS products of one token and one expert: the
    rows of product p are token `routed_tokens[p]` of x times expert
    `experts[p]`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    tile_tokens = pid_m * TOKENS + tl.arange(0, TOKENS)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    first_row = pid_n * BLOCK_N
    if ROUTED:
        product = first_row // EXPERT_ROWS
        expert = tl.load(experts_ptr + product).to(tl.int64)
        first_row = expert * EXPERT_ROWS + first_row % EXPERT_ROWS
        x_ptr += tl.load(routed_tokens_ptr + product).to(tl.int64) * stride_xm
    # Element 4 j + t of the step's loads is chunk t (words 8 t to 8 t + 7)
    # of row j, which `_load_lanes` puts in lane 4 (j % 8) + t.
    lanes = tl.arange(0, 4 * BLOCK_N)
    chunk_mask = pid_n * BLOCK_N + lanes // 4 < N
    chunk_rows = (first_row + lanes // 4).to(tl.int64)
    chunks = lanes % 4
    quad = tl.arange(0, 4)
    tile_rows = (
        words_ptr + chunk_rows[:, None] * K_WORDS + chunks[:, None] * 8 + quad[None, :],
        absmax_ptr + chunk_rows * K_BLOCKS,
        chunks,
        chunk_mask,
    )
    # ... and, in the same lanes, the activations of tokens g (and g + 8)
    # for those columns, as int32 pairs (padding tokens read the last token
    # again; their sums are not stored). Rows j and j + BLOCK_N / 2 share
    # their lanes: a fragment's rows g and g + 8.
    x_lanes = tl.arange(0, 2 * BLOCK_N)
    lane_tokens = (x_lanes // 4) % 8
    pairs = (x_lanes % 4)[:, None] * 32 + quad[None, :]
    lane_tokens += pid_m * TOKENS
    x_tokens = (
        x_ptr + tl.minimum(lane_tokens, M - 1)[:, None] * stride_xm + pairs,
        x_ptr + tl.minimum(lane_tokens + 8, M - 1)[:, None] * stride_xm + pairs,
    )
    zeros = tl.zeros((BLOCK_N // 2, 4), dtype=tl.float32)
    acc = (zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros)
    first = pid_k * STEPS_PER_SPLIT
    last = tl.minimum(first + STEPS_PER_SPLIT, STEPS)
    # Each step loads the next step's words and absmax before it decodes its
    # own, so the loads of two steps are in flight (the last step loads
    # itself again). Loading two steps ahead was slower on an H100
    # (docs/benchmarks.md, section 5).
    absmax, low, high = _load_step(tile_rows, first, BLOCKSIZE)
    for step in range(first, last):
        next_step = _load_step(tile_rows, tl.minimum(step + 1, last - 1), BLOCKSIZE)
        acc = _multiply_step(acc, low, high, absmax, codes_ptr, x_tokens, step, TOKENS)
        absmax, low, high = next_step
    fused_4bit._write_tile(
        _tile(acc, TOKENS),
        rows,
        tile_tokens,
        row_mask,
        tile_tokens < M,
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


def supports(weight: MergedWeight) -> bool:
    """Whether `matmul` takes this layer: steps of 256 columns, each chunk
    of 64 in one absmax block."""
    return fused_4bit.supports(weight) and weight.state.shape[1] % 256 == 0


def supports_routed(weight: MergedWeight, expert_rows: int) -> bool:
    """Whether `routed_matmul` takes this stack of experts of `expert_rows`
    rows: whole programs of rows per expert."""
    return supports(weight) and expert_rows % launch_config(1)[0] == 0


def _check_supported(weight: MergedWeight) -> None:
    if not supports(weight):
        raise ValueError(
            "the fragment 4-bit kernel needs rows of a multiple of 256 columns "
            f"in blocks of a multiple of 64, not {tuple(weight.state.shape)} "
            f"in blocks of {weight.state.blocksize}"
        )


def matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    split: int | None = None,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out`
    (M, N) bfloat16 if given, by programs of one tile of TILE_TOKENS tokens
    each. `split` fixes the number of K ranges per tile (by default: enough
    to fill the GPU); rows and warps per program instead of
    `launch_config`'s are for sweeps (`benchmarks/gpu_4bit.py --sweep`)."""
    _check_supported(weight)
    tokens = x.shape[0]
    if x.dtype != torch.bfloat16 or tokens < 1:
        raise ValueError(
            f"the fragment 4-bit kernel multiplies one or more tokens of "
            f"bfloat16 activations, not {tuple(x.shape)} {x.dtype}"
        )
    default_rows, default_warps = launch_config(tokens)
    rows_per_program = rows_per_program or default_rows
    num_warps = num_warps or default_warps
    if out is None:
        out = torch.empty(
            tokens, weight.state.shape[0], dtype=torch.bfloat16, device=x.device
        )
    if out.stride(1) != 1:
        raise ValueError(
            "the fragment 4-bit kernel writes an out with unit column stride"
        )
    if rows_per_program % (16 * num_warps):
        raise ValueError(
            f"the fragment 4-bit kernel takes 16 rows per warp and fragment, "
            f"not {rows_per_program} rows for {num_warps} warps"
        )
    _launch(x, weight, out, split, rows_per_program, num_warps)
    return out


def routed_matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    experts: torch.Tensor,
    tokens: torch.Tensor,
    expert_rows: int,
) -> torch.Tensor:
    """Products of single tokens and single experts, (P, expert_rows)
    bfloat16: row p is x[tokens[p]] (x (M, K) bfloat16) times expert
    `experts[p]` of the weight, a stack of experts of `expert_rows` rows,
    transposed. Each product reads its expert's weights once, so this is
    for decode steps, which route few tokens."""
    _check_supported(weight)
    rows_per_program, num_warps = launch_config(1)
    if x.dtype != torch.bfloat16 or not supports_routed(weight, expert_rows):
        raise ValueError(
            f"the routed fragment 4-bit kernel multiplies bfloat16 activations "
            f"by experts of a multiple of {rows_per_program} rows, not "
            f"{x.dtype} by {expert_rows} rows"
        )
    out = torch.empty(
        1, experts.numel() * expert_rows, dtype=torch.bfloat16, device=x.device
    )
    routing = (experts.reshape(-1), tokens.reshape(-1), expert_rows)
    _launch(x, weight, out, None, rows_per_program, num_warps, routing)
    return out.view(-1, expert_rows)


def _launch(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor,
    split: int | None,
    rows_per_program: int,
    num_warps: int,
    routing: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    """`fragment_kernel` over all of `out`: x times the weight, or, with
    `routing` (experts, tokens, rows per expert), the routed products."""
    columns = weight.state.shape[1]
    tokens, rows = out.shape
    x_pairs = x.contiguous().view(torch.int32)
    experts, routed_tokens, expert_rows = routing or (x_pairs, x_pairs, 1)
    steps = columns // 256
    tile_tokens = 8 if tokens <= 8 else TILE_TOKENS
    programs = triton.cdiv(rows, rows_per_program)
    token_tiles = triton.cdiv(tokens, tile_tokens)
    split, steps_per_split, partial = fused_4bit.split_k(
        out, programs * token_tiles, steps, split
    )
    fragment_kernel[(programs, split, token_tiles)](
        x_pairs,
        weight.packed.view(torch.int32),
        weight.state.absmax,
        weight.table,
        partial,
        fused_4bit._arrivals(x.device, programs * token_tiles),
        out,
        experts,
        routed_tokens,
        tokens,
        rows,
        columns // 8,
        columns // weight.state.blocksize,
        steps,
        steps_per_split,
        x_pairs.stride(0),
        out.stride(0),
        expert_rows,
        BLOCKSIZE=weight.state.blocksize,
        BLOCK_N=rows_per_program,
        TOKENS=tile_tokens,
        SPLIT=split,
        ROUTED=routing is not None,
        num_warps=num_warps,
    )
