# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit (NF4/FP4) linear layers on CUDA, one call per merged layer.

The weights stay as bitsandbytes stores them: row-major, two values per byte
(the even column in the high nibble), one float32 absmax per block of
`blocksize` consecutive values. A merged layer's shards (q/k/v, gate/up),
concatenated, are then the storage of the stacked matrix, so one call covers
the layer instead of one per shard.

Below `MIN_TRITON_TOKENS` tokens bitsandbytes' own `matmul_4bit` runs, once
for the whole layer (its GEMV for one token, the fastest kernel here for
it). From there on a Triton kernel decodes the whole layer once and cuBLAS
multiplies, as vLLM's AWQ path does for large batches; the decoded weights
equal `bitsandbytes.functional.dequantize_4bit`'s bit for bit (code value
times block absmax in float32, rounded to bfloat16).

`fused_matmul` is the candidate to replace both: one kernel for any number
of tokens that decodes the same weights in registers and multiplies them on
the tensor cores, reading the storage as it is. `matmul` does not select it
until it has been timed on a GPU (`benchmarks/gpu_4bit.py`).

The module imports only torch, triton and bitsandbytes, so it is checked on
a CPU under `TRITON_INTERPRET=1` and timed on a GPU without vLLM.
"""

import functools
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# Below this many tokens bitsandbytes' kernels are faster (one token: its
# GEMV; see docs/benchmarks.md for the H200 measurements).
MIN_TRITON_TOKENS = 4
# Weight rows per program of the dequantization kernel.
_DEQUANTIZE_ROWS = 16


@functools.cache
def decode_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 float32 code values, indexed by a 4-bit value.

    Taken from bitsandbytes' own `dequantize_4bit` with an absmax of one, so
    the kernels use the very constants bitsandbytes uses on this device.
    FP4's negative zero becomes 0.0: bitsandbytes itself decodes it to -0.0
    or 0.0 depending on the kernel it picks, and a matmul cannot tell.
    """
    from bitsandbytes.functional import QuantState, dequantize_4bit

    unit_scale = QuantState(
        absmax=torch.ones(1, dtype=torch.float32, device=device),
        shape=(16,),
        blocksize=64,
        quant_type=quant_type,
        dtype=torch.float32,
    )
    # Bytes 0x01, 0x23, ..., 0xEF: every 4-bit value once, in order.
    every_value = torch.tensor(
        [(2 * i) << 4 | (2 * i + 1) for i in range(8)], dtype=torch.uint8, device=device
    )
    codes = dequantize_4bit(every_value.reshape(-1, 1), unit_scale) + 0.0
    return codes.reshape(16)


@triton.jit
def _decode(packed, absmax, table_ptr, SHAPE: tl.constexpr):
    """The bfloat16 weights held by `packed` bytes, in column order.

    `packed` has shape SHAPE[:-1] + (SHAPE[-1] // 2,), `absmax` broadcasts
    to it; the result has SHAPE.
    """
    even = _to_bfloat16(tl.load(table_ptr + (packed >> 4).to(tl.int32)) * absmax)
    odd = _to_bfloat16(tl.load(table_ptr + (packed & 15).to(tl.int32)) * absmax)
    return tl.reshape(tl.join(even, odd), SHAPE)


@triton.jit
def _to_bfloat16(value):
    """Round float32 to the nearest bfloat16, ties to even, as torch does.

    Compiled, that is the conversion instruction. The interpreter truncates
    instead, so there the rounding is spelled out on the bits (exact for
    finite values, which weights are).
    """
    if _INTERPRETED:
        bits = value.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(tl.bfloat16)


@triton.jit
def _dequantize_kernel(
    weight_ptr,
    absmax_ptr,
    table_ptr,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """BLOCK_N rows and GROUPS groups of GROUP columns of the bfloat16 weight.

    A group lies inside one absmax block, so each decoded value needs one
    broadcast absmax.
    """
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * GROUPS * GROUP
    groups = tl.arange(0, GROUPS)
    row_mask = rows < N
    step_bytes = groups[:, None] * HALF + tl.arange(0, HALF)[None, :]
    step_columns = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    packed = tl.load(
        weight_ptr
        + rows.to(tl.int64)[:, None, None] * (K // 2)
        + (k // 2 + step_bytes)[None],
        mask=row_mask[:, None, None],
        other=0,
    )
    absmax = tl.load(
        absmax_ptr
        + rows.to(tl.int64)[:, None] * (K // BLOCKSIZE)
        + ((k + groups * GROUP) // BLOCKSIZE)[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    weights = _decode(packed, absmax[:, :, None], table_ptr, (BLOCK_N, GROUPS, GROUP))
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None, None] * K + (k + step_columns)[None]
    tl.store(out_ptrs, weights, mask=row_mask[:, None, None])


def _largest_step(columns: int, limit: int) -> int:
    """The largest power of two up to `limit` that divides `columns`."""
    step = limit
    while columns % step:
        step //= 2
    return step


def dequantize(
    weight: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """The (N, K) bfloat16 weight of packed (N, K/2) bytes and their absmax."""
    rows, columns = weight.shape[0], 2 * weight.shape[1]
    out = torch.empty(rows, columns, dtype=torch.bfloat16, device=weight.device)
    step = _largest_step(columns, 512)
    group = min(blocksize, step)
    _dequantize_kernel[(triton.cdiv(rows, _DEQUANTIZE_ROWS), columns // step)](
        weight,
        absmax,
        table,
        out,
        rows,
        columns,
        BLOCKSIZE=blocksize,
        BLOCK_N=_DEQUANTIZE_ROWS,
        GROUP=group,
        GROUPS=step // group,
        num_warps=4,
    )
    return out


# The fused kernel decodes a tile of weights in registers and multiplies it on
# the tensor cores, so the weights never reach memory as bfloat16. Compiled,
# the decode is PTX byte permutes on a per-block table, about 2.75
# instructions per weight (a table load per weight costs 11 to 15).
#
# A block's table: entry i is bfloat16(code[i] * absmax), rounded once from
# the float32 product as `dequantize_4bit` rounds it, split into a plane of
# low bytes and one of high bytes, 4 registers each, 4 entries per register.
_TABLE_PTX = tl.constexpr(
    "\n".join(
        ["{", ".reg .f32 p<16>;", ".reg .b32 q<8>;"]
        + [f"mul.rn.f32 p{i}, $8, ${9 + i};" for i in range(16)]
        + [f"cvt.rn.bf16x2.f32 q{i}, p{2 * i + 1}, p{2 * i};" for i in range(8)]
        + [f"prmt.b32 ${i}, q{2 * i}, q{2 * i + 1}, 0x6420;" for i in range(4)]
        + [f"prmt.b32 ${4 + i}, q{2 * i}, q{2 * i + 1}, 0x7531;" for i in range(4)]
        + ["}"]
    )
)


def _decode_ptx() -> str:
    """PTX taking a 32-bit word of packed weights ($4) and its block's table
    ($5-$8 low bytes, $9-$12 high bytes) to the word's 8 bfloat16 weights
    as 4 pairs ($0-$3), in column order.

    Per group of 4 nibbles: their low 3 bits pick a byte from each half of
    each plane (4 `prmt`), bit 3 becomes a byte mask (one `prmt` that
    replicates sign bits), `lop3` keeps the right half, and two `prmt`
    interleave low and high bytes into bfloat16 pairs, swapping the two
    nibbles of a byte (bitsandbytes puts the even column in the high one).
    """
    lines = [
        "{",
        ".reg .b32 s, sh, t, m, la, lb, ha, hb, lo, hi;",
        "and.b32 s, $4, 0x77777777;",
        "shl.b32 t, $4, 4;",
        "shr.b32 sh, s, 16;",
    ]
    # Mask byte i copies bit 3 of nibble i, which is bit 7 of a byte of t
    # (even i) or of the word (odd i).
    for selector, mask, pair in (("s", "0x9D8C", 0), ("sh", "0xBFAE", 2)):
        lines += [
            f"prmt.b32 la, $5, $6, {selector};",
            f"prmt.b32 lb, $7, $8, {selector};",
            f"prmt.b32 ha, $9, $10, {selector};",
            f"prmt.b32 hb, $11, $12, {selector};",
            f"prmt.b32 m, $4, t, {mask};",
            "lop3.b32 lo, la, lb, m, 0xD8;",
            "lop3.b32 hi, ha, hb, m, 0xD8;",
            f"prmt.b32 ${pair}, lo, hi, 0x4051;",
            f"prmt.b32 ${pair + 1}, lo, hi, 0x6273;",
        ]
    return "\n".join([*lines, "}"])


_DECODE_PTX = tl.constexpr(_decode_ptx())


@triton.jit
def _decode_words(words, absmax, codes_ptr):
    """The 8 bfloat16 weights of each int32 word of `words` (R, C, 8), in
    column order, as 8 tensors of its shape; `absmax` (R, C) is the block's.
    """
    if _INTERPRETED:
        scale = absmax[:, :, None]
        # Column 8w + i sits in byte i // 2, in the high nibble for even i.
        v0 = _to_bfloat16(tl.load(codes_ptr + ((words >> 4) & 15)) * scale)
        v1 = _to_bfloat16(tl.load(codes_ptr + (words & 15)) * scale)
        v2 = _to_bfloat16(tl.load(codes_ptr + ((words >> 12) & 15)) * scale)
        v3 = _to_bfloat16(tl.load(codes_ptr + ((words >> 8) & 15)) * scale)
        v4 = _to_bfloat16(tl.load(codes_ptr + ((words >> 20) & 15)) * scale)
        v5 = _to_bfloat16(tl.load(codes_ptr + ((words >> 16) & 15)) * scale)
        v6 = _to_bfloat16(tl.load(codes_ptr + ((words >> 28) & 15)) * scale)
        v7 = _to_bfloat16(tl.load(codes_ptr + ((words >> 24) & 15)) * scale)
        return v0, v1, v2, v3, v4, v5, v6, v7
    l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
        _TABLE_PTX,
        "=r,=r,=r,=r,=r,=r,=r,=r" + ",f" * 17,
        [
            absmax,
            tl.load(codes_ptr + 0),
            tl.load(codes_ptr + 1),
            tl.load(codes_ptr + 2),
            tl.load(codes_ptr + 3),
            tl.load(codes_ptr + 4),
            tl.load(codes_ptr + 5),
            tl.load(codes_ptr + 6),
            tl.load(codes_ptr + 7),
            tl.load(codes_ptr + 8),
            tl.load(codes_ptr + 9),
            tl.load(codes_ptr + 10),
            tl.load(codes_ptr + 11),
            tl.load(codes_ptr + 12),
            tl.load(codes_ptr + 13),
            tl.load(codes_ptr + 14),
            tl.load(codes_ptr + 15),
        ],
        dtype=(tl.uint32,) * 8,
        is_pure=True,
        pack=1,
    )
    p0, p1, p2, p3 = tl.inline_asm_elementwise(
        _DECODE_PTX,
        "=r,=r,=r,=r" + ",r" * 9,
        [
            words,
            l0[:, :, None],
            l1[:, :, None],
            l2[:, :, None],
            l3[:, :, None],
            h0[:, :, None],
            h1[:, :, None],
            h2[:, :, None],
            h3[:, :, None],
        ],
        dtype=(tl.uint32,) * 4,
        is_pure=True,
        pack=1,
    )
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
def _fused_kernel(
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
    each table once. With SPLIT > 1 each program stores its float32 partial
    sums; the last one of a tile to arrive adds them in split order (the
    result does not depend on timing), writes `out` and resets the tile's
    arrival count for the next call.
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
    out_mask = row_mask[:, None] & token_mask[None, :]
    out_offsets = tokens[None, :] * stride_om + rows[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + out_offsets, _to_bfloat16(acc), mask=out_mask)
    else:
        partial_offsets = tokens.to(tl.int64)[None, :] * N + rows[:, None]
        tl.store(partial_ptr + pid_k * M * N + partial_offsets, acc, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in tl.static_range(SPLIT):
                total += tl.load(
                    partial_ptr + split * M * N + partial_offsets,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(out_ptr + out_offsets, _to_bfloat16(total), mask=out_mask)
            tl.atomic_xchg(arrivals_ptr + tile, 0)


class MergedWeight(NamedTuple):
    """A merged layer's 4-bit storage, prepared once after loading."""

    # (N, K/2) packed bytes of the stacked weight
    packed: torch.Tensor
    # bitsandbytes' state of the stacked (N, K) weight, float32 absmax
    state: Any
    # `decode_table()` of the state's quant type
    table: torch.Tensor


def merge_shards(packed: torch.Tensor, states: list[Any]) -> MergedWeight | None:
    """The storage of shards stored back to back in `packed`, as one matrix.

    The shards' float32 absmax are concatenated once and each state keeps a
    view of its part, so memory does not grow. None when the shards cannot
    form one matrix: different quant types or block sizes, double-quantized
    absmax, or blocks that straddle rows.
    """
    from bitsandbytes.functional import QuantState

    first = states[0]
    rows = sum(state.shape[0] for state in states)
    columns = first.shape[1]
    if columns % first.blocksize or any(
        state.nested
        or state.quant_type != first.quant_type
        or state.blocksize != first.blocksize
        or state.shape[1] != columns
        for state in states
    ):
        return None
    absmax = torch.cat([state.absmax for state in states])
    parts = absmax.split([state.absmax.numel() for state in states])
    for state, part in zip(states, parts, strict=True):
        state.absmax = part
    return MergedWeight(
        packed=packed.view(rows, columns // 2),
        state=QuantState(
            absmax=absmax,
            shape=torch.Size((rows, columns)),
            code=first.code,
            blocksize=first.blocksize,
            quant_type=first.quant_type,
            dtype=first.dtype,
        ),
        table=decode_table(first.quant_type, packed.device),
    )


def matmul(
    x: torch.Tensor, weight: MergedWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out` (M, N)
    bfloat16 if given."""
    if x.shape[0] < MIN_TRITON_TOKENS:
        from bitsandbytes import matmul_4bit

        product = matmul_4bit(x, weight.packed.view(-1, 1).t(), weight.state)
        return product if out is None else out.copy_(product)
    state = weight.state
    decoded = dequantize(weight.packed, state.absmax, weight.table, state.blocksize)
    return torch.matmul(x, decoded.t(), out=out)


# Weight rows per program of the fused kernel: one warpgroup's tensor-core
# tile.
_FUSED_ROWS = 64
# Most partial sums a tile of the fused kernel adds up.
_MAX_SPLIT = 16


def supports_fused(weight: MergedWeight) -> bool:
    """Whether `fused_matmul` takes this layer: its chunks of 64 columns
    must each lie in one absmax block."""
    return weight.state.blocksize % 64 == 0 and weight.state.shape[1] % 64 == 0


@functools.cache
def _arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed arrival counts for `tiles` tiles, shared by every call with as
    many tiles on the device: calls on one stream run one after another, and
    each leaves the counts zero."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def _split_for(device: torch.device, programs: int, steps: int) -> int:
    """Ranges of K per tile: enough programs to fill the GPU twice over."""
    if device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_MAX_SPLIT, steps, triton.cdiv(2 * processors, programs)))


def fused_matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, by the fused
    kernel, into `out` (M, N) bfloat16 if given. `split` fixes the number
    of K ranges per tile (by default: enough to fill the GPU)."""
    if not supports_fused(weight):
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
    chunks = next(c for c in (4, 2, 1) if columns % (64 * c) == 0)
    steps = columns // (64 * chunks)
    block_m = min(128, max(16, triton.next_power_of_2(tokens)))
    grid_n, grid_m = triton.cdiv(rows, _FUSED_ROWS), triton.cdiv(tokens, block_m)
    if split is None:
        split = _split_for(x.device, grid_n * grid_m, steps)
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)
    partial = (
        torch.empty(split, tokens, rows, dtype=torch.float32, device=x.device)
        if split > 1
        else out
    )
    _fused_kernel[(grid_n, grid_m, split)](
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
        BLOCK_N=_FUSED_ROWS,
        BLOCK_M=block_m,
        CHUNKS=chunks,
        SPLIT=split,
        num_warps=4,
        # Three stages of 128-token tiles of x would not fit shared memory.
        num_stages=2 if block_m == 128 else 3,
    )
    return out
