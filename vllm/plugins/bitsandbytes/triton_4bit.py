# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit (NF4/FP4) linear layers on CUDA, one call per merged layer.

The weights stay as bitsandbytes stores them: row-major, two values per byte
(the even column in the high nibble), one float32 absmax per block of
`blocksize` consecutive values. A merged layer's shards (q/k/v, gate/up),
concatenated, are then the storage of the stacked matrix, so one call covers
the layer instead of one per shard.

From 1 to 16 tokens `fragment_4bit` decodes in registers straight into
the tensor cores' operands. From 17 to 128 tokens the fused kernel of
`fused_4bit` decodes in registers and multiplies on the tensor cores
through shared memory; on sm_90 (H100, H200), from 17 to 256 tokens,
`wgmma_4bit` decodes into the register operand of asynchronous warpgroup
MMAs instead. Beyond, a Triton kernel decodes the whole layer once and
cuBLAS multiplies, as vLLM's AWQ path does for large batches. All four decode
with `decode_pairs` (byte permutes on a per-block table, about 2.6
instructions per weight, where a table load per weight costs 11 to 15), so
they multiply by exactly `bitsandbytes.functional.dequantize_4bit`'s
weights (code value times block absmax in float32, rounded to bfloat16).
Layers whose shape the two register kernels do not take, and float16
models, run bitsandbytes' own `matmul_4bit` for few tokens.

The fused-MoE method (`moe.py`) decodes experts with the same kernel, only
those its tokens are routed to (`compact_routing`).

The module imports only torch, triton and bitsandbytes (Gluon, for
`wgmma_4bit`, only where triton has it), so it is checked on
a CPU under `TRITON_INTERPRET=1` and timed on a GPU without vLLM.
"""

import functools
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# The token counts for which the fused kernel (`fused_4bit`) is the fastest
# path where `fragment_4bit` does not take the layer and, on sm_90,
# `wgmma_4bit` (within `WGMMA_TOKENS`) does not either; above, decode once
# and cuBLAS (GPU measurements in docs/benchmarks.md, section 5).
FUSED_TOKENS = (2, 128)
# The token counts for which `wgmma_4bit` (sm_90 only) beats the fused
# kernel and decoding once and cuBLAS (docs/benchmarks.md, section 5).
WGMMA_TOKENS = (17, 256)
# Where the fused kernel does not apply (blocks of 32, float16 activations):
# below this many tokens bitsandbytes' kernels are faster.
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


# A block's table: entry i is bfloat16(code[i] * absmax), rounded once from
# the float32 product as `dequantize_4bit` rounds it, split into a plane of
# low bytes and one of high bytes, 4 registers each, 4 entries per register.
TABLE_PTX = tl.constexpr(
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


DECODE_PTX = tl.constexpr(_decode_ptx())


@triton.jit
def _bits(value):
    """float32 rounded to bfloat16, as the low 16 bits of a uint32."""
    return _to_bfloat16(value).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def decode_pairs(words, absmax, codes_ptr):
    """The 8 bfloat16 weights of each int32 word of `words` as 4 uint32
    pairs of its shape, columns 2j (low half) and 2j + 1 of pair j; `absmax`,
    of the shape of `words` without its last dimension, is the block's.
    """
    if _INTERPRETED:
        scale = tl.expand_dims(absmax, -1)
        # Column 2j sits in byte j, in the high nibble.
        return (
            _bits(tl.load(codes_ptr + ((words >> 4) & 15)) * scale)
            | _bits(tl.load(codes_ptr + (words & 15)) * scale) << 16,
            _bits(tl.load(codes_ptr + ((words >> 12) & 15)) * scale)
            | _bits(tl.load(codes_ptr + ((words >> 8) & 15)) * scale) << 16,
            _bits(tl.load(codes_ptr + ((words >> 20) & 15)) * scale)
            | _bits(tl.load(codes_ptr + ((words >> 16) & 15)) * scale) << 16,
            _bits(tl.load(codes_ptr + ((words >> 28) & 15)) * scale)
            | _bits(tl.load(codes_ptr + ((words >> 24) & 15)) * scale) << 16,
        )
    l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
        TABLE_PTX,
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
    return tl.inline_asm_elementwise(
        DECODE_PTX,
        "=r,=r,=r,=r" + ",r" * 9,
        [
            words,
            tl.expand_dims(l0, -1),
            tl.expand_dims(l1, -1),
            tl.expand_dims(l2, -1),
            tl.expand_dims(l3, -1),
            tl.expand_dims(h0, -1),
            tl.expand_dims(h1, -1),
            tl.expand_dims(h2, -1),
            tl.expand_dims(h3, -1),
        ],
        dtype=(tl.uint32,) * 4,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _dequantize_kernel(
    words_ptr,
    absmax_ptr,
    table_ptr,
    experts_ptr,
    out_ptr,
    N,
    K,
    EXPERT_ROWS,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    GATHER: tl.constexpr,
):
    """BLOCK_N rows and GROUPS groups of GROUP columns of the bfloat16 weight,
    read as int32 words of 8 values and stored as int32 pairs.

    A group lies inside one absmax block, so `decode_pairs` builds one table
    per group. With GATHER, the weight is a stack of experts of EXPERT_ROWS
    rows each, and output expert i is stored expert `experts_ptr[i]`.
    """
    WORDS: tl.constexpr = GROUP // 8
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * GROUPS * GROUP
    groups = tl.arange(0, GROUPS)
    row_mask = rows < N
    stored_rows = rows.to(tl.int64)
    if GATHER:
        expert = tl.load(experts_ptr + rows // EXPERT_ROWS, mask=row_mask, other=0)
        stored_rows = expert.to(tl.int64) * EXPERT_ROWS + rows % EXPERT_ROWS
    group_words = groups[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
    words = tl.load(
        words_ptr
        + stored_rows[:, None, None] * (K // 8)
        + (k // 8 + group_words)[None],
        mask=row_mask[:, None, None],
        other=0,
    )
    absmax = tl.load(
        absmax_ptr
        + stored_rows[:, None] * (K // BLOCKSIZE)
        + ((k + groups * GROUP) // BLOCKSIZE)[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    p0, p1, p2, p3 = decode_pairs(words, absmax, table_ptr)
    # join appends a dimension: pair j ends up at (j & 1, j >> 1), which the
    # permutation puts in column order.
    pairs = tl.permute(tl.join(tl.join(p0, p1), tl.join(p2, p3)), (0, 1, 2, 4, 3))
    pairs = tl.reshape(pairs, (BLOCK_N, GROUPS * GROUP // 2))
    columns = tl.arange(0, GROUPS * GROUP // 2)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * (K // 2) + k // 2 + columns
    tl.store(out_ptrs, pairs, mask=row_mask[:, None])


def _largest_step(columns: int, limit: int) -> int:
    """The largest power of two up to `limit` that divides `columns`."""
    step = limit
    while columns % step:
        step //= 2
    return step


def dequantize(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    blocksize: int,
    experts: torch.Tensor | None = None,
    expert_rows: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (N, K) bfloat16 weight of packed (N, K/2) bytes and their absmax,
    into `out` (contiguous) if given.

    With `experts`, the weight is a stack of experts of `expert_rows` rows
    each, and only those experts are decoded, in that order.
    """
    rows, columns = weight.shape[0], 2 * weight.shape[1]
    if columns % 8:
        raise ValueError(f"the 4-bit decode reads words of 8 columns, not {columns}")
    if experts is not None:
        rows = experts.numel() * expert_rows
    if out is None:
        out = torch.empty(rows, columns, dtype=torch.bfloat16, device=weight.device)
    step = _largest_step(columns, 512)
    group = min(blocksize, step)
    _dequantize_kernel[(triton.cdiv(rows, _DEQUANTIZE_ROWS), columns // step)](
        weight.view(torch.int32),
        absmax,
        table,
        experts,
        out.view(torch.int32),
        rows,
        columns,
        expert_rows,
        BLOCKSIZE=blocksize,
        BLOCK_N=_DEQUANTIZE_ROWS,
        GROUP=group,
        GROUPS=step // group,
        GATHER=experts is not None,
        num_warps=4,
    )
    return out


def compact_routing(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts to decode for `topk_ids`, and the ids renumbered into them.

    Returns `routed`, `topk_ids.numel()` distinct experts that include every
    routed one (padded with unrouted ones when tokens share experts), and
    ids such that `routed[ids] == topk_ids`. The sizes depend only on the
    shapes, and nothing waits for the GPU, so CUDA graphs capture it.
    """
    is_routed = torch.zeros(num_experts, dtype=torch.bool, device=topk_ids.device)
    # index_fill_, not `is_routed[ids] = True`: the latter copies True from
    # the CPU, which CUDA-graph capture refuses.
    is_routed.index_fill_(0, topk_ids.flatten().long(), True)
    # A stable sort puts the routed experts first, in id order.
    order = torch.argsort(is_routed.logical_not().to(torch.uint8), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(num_experts, device=order.device)
    routed = order[: topk_ids.numel()]
    return routed, position[topk_ids.long()].to(topk_ids.dtype)


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


@functools.cache
def _warpgroup_kernels():
    """`wgmma_4bit`, or None with a triton that has no Gluon."""
    try:
        from vllm.plugins.bitsandbytes import wgmma_4bit
    except ImportError:
        return None
    return wgmma_4bit


def matmul(
    x: torch.Tensor, weight: MergedWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out` (M, N)
    bfloat16 if given."""
    from vllm.plugins.bitsandbytes import fragment_4bit, fused_4bit

    tokens = x.shape[0]
    if (
        1 <= tokens <= fragment_4bit.MAX_TOKENS
        and x.dtype == torch.bfloat16
        and fragment_4bit.supports(weight)
    ):
        return fragment_4bit.matmul(x, weight, out=out)
    if WGMMA_TOKENS[0] <= tokens <= WGMMA_TOKENS[1] and x.dtype == torch.bfloat16:
        wgmma_4bit = _warpgroup_kernels()
        if wgmma_4bit is not None and wgmma_4bit.supports(weight, x.device):
            return wgmma_4bit.matmul(x, weight, out=out)
    if (
        FUSED_TOKENS[0] <= tokens <= FUSED_TOKENS[1]
        and x.dtype == torch.bfloat16
        and fused_4bit.supports(weight)
    ):
        return fused_4bit.matmul(x, weight, out=out)
    if tokens < MIN_TRITON_TOKENS:
        from bitsandbytes import matmul_4bit

        product = matmul_4bit(x, weight.packed.view(-1, 1).t(), weight.state)
        return product if out is None else out.copy_(product)
    state = weight.state
    decoded = dequantize(weight.packed, state.absmax, weight.table, state.blocksize)
    return torch.matmul(x, decoded.t(), out=out)
