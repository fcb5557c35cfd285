# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit matmul for large batches on Hopper (sm_90), written in
Gluon: the decoded weights are the register operand of asynchronous
warpgroup MMAs (`wgmma`), so the tensor cores multiply one part of a tile
while the warps decode the next, and the weights never go through shared
memory.

A warpgroup's register operand gives lane 4g + t rows g and g + 8 of its
warp's 16 and, in each k16 slice, the k slots 2t, 2t + 1, 2t + 8, 2t + 9.
As in `fragment_4bit`, the k slots of a lane are made to be its own chunk
of 64 columns (one absmax block, one decode table): slot 16s + 8h + 2t + e
of sub-step q of a step of 256 holds column 64t + 16q + 4s + 2h + e. One
pass over x puts the activations in that order (`slot_order`), so that
16-byte `cp.async` copies fill the shared-memory tiles (gathering from x as
it is takes 4-byte copies, each in its own 32-byte sector: on an H100,
gate/up at 256 tokens took 8 times as long as with x reordered first).
The weights are decoded by `triton_4bit`'s byte permutes, exactly
`dequantize_4bit`'s values, straight into the operand's registers: the
only layout conversion is a renaming of registers, which the compiler is
made to prove (`assert_trivial`).

Gluon kernels are compiled for a GPU; Triton's interpreter cannot run them,
so the CPU checks compile this kernel for sm_90 and inspect the machine
code, and the GPU checks compare it with bitsandbytes. `triton_4bit.matmul`
calls it from 17 to 256 tokens, where it was measured to beat the fused
kernel and decoding once: programs of 64 tokens and 64 rows, two per
multiprocessor, up to 64 tokens; beyond, programs of 256 tokens and 128
rows, one per multiprocessor, where they fill the GPU (gate/up: each
weight decoded once), else programs of 128 tokens and 64 rows, two per
multiprocessor (`launch_config`); `benchmarks/gpu_4bit.py` times it at
every batch as its ``wgmma`` side.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from vllm.plugins.bitsandbytes import fused_4bit
from vllm.plugins.bitsandbytes.triton_4bit import (
    DECODE_PTX,
    TABLE_PTX,
    MergedWeight,
)

# triton 3.6 names the cp.async copy `async_copy_global_to_shared`; later
# releases `async_load`.
_copy_async = getattr(async_copy, "async_load", None) or (
    async_copy.async_copy_global_to_shared
)
# A barrier of the program's threads: `thread_barrier` in triton 3.6,
# `barrier` in later releases.
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
# Columns per step: 4 chunks of 64, one per lane of a row.
STEP_COLUMNS = 256
# Columns per sub-step: one `warpgroup_mma` of 4 k16 slices.
SUB_COLUMNS = 64
# The same two, as the kernel reads them.
_STEP_COLUMNS = gl.constexpr(STEP_COLUMNS)
_SUB_COLUMNS = gl.constexpr(SUB_COLUMNS)
# Shared memory for the rings of activation tiles of one multiprocessor,
# within the 228 KiB of an sm_90 multiprocessor (227 KiB per program).
RING_BYTES = 192 * 1024
# Registers of one multiprocessor.
_REGISTERS = 64 * 1024
# Launch configurations: tokens per program, warps, programs per
# multiprocessor (`launch_config`).
WIDE = (256, 8, 1)
NARROW = (128, 4, 2)
SMALL = (64, 4, 2)
CONFIGS = (WIDE, NARROW, SMALL)
# The fewest steps of a range of K when the kernel splits K.
MIN_SPLIT_STEPS = 8


@gluon.constexpr_function
def _word_layout(rows, words):
    """(rows, 4 chunks, `words` words): lane 4g + t holds rows g and g + 8
    of its warp's 16 and chunk t; the words are registers."""
    registers = [[0, 0, 1 << b] for b in range(words.bit_length() - 1)]
    registers.append([8, 0, 0])
    lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warps = [[16 << b, 0, 0] for b in range((rows // 16).bit_length() - 1)]
    return gl.DistributedLinearLayout(registers, lanes, warps, [], [rows, 4, words])


@gluon.constexpr_function
def _copy_layout(tokens, warps):
    """(tokens, 64 slots) of a sub-step's activations, 16-byte copies: 8
    lanes take one token's 128 bytes, warps and then registers the other
    tokens."""
    registers = [[0, 1], [0, 2], [0, 4]]
    lanes = [[0, 8], [0, 16], [0, 32], [1, 0], [2, 0]]
    warp_bases = [[4 << b, 0] for b in range(warps.bit_length() - 1)]
    covered = 4 * warps
    while covered < tokens:
        registers.append([covered, 0])
        covered *= 2
    return gl.DistributedLinearLayout(registers, lanes, warp_bases, [], [tokens, 64])


@gluon.jit
def _tables(absmax, codes_ptr):
    """`triton_4bit.decode_pairs`'s 8 table registers of each block."""
    return gl.inline_asm_elementwise(
        TABLE_PTX,
        "=r,=r,=r,=r,=r,=r,=r,=r" + ",f" * 17,
        [
            absmax,
            gl.load(codes_ptr + 0),
            gl.load(codes_ptr + 1),
            gl.load(codes_ptr + 2),
            gl.load(codes_ptr + 3),
            gl.load(codes_ptr + 4),
            gl.load(codes_ptr + 5),
            gl.load(codes_ptr + 6),
            gl.load(codes_ptr + 7),
            gl.load(codes_ptr + 8),
            gl.load(codes_ptr + 9),
            gl.load(codes_ptr + 10),
            gl.load(codes_ptr + 11),
            gl.load(codes_ptr + 12),
            gl.load(codes_ptr + 13),
            gl.load(codes_ptr + 14),
            gl.load(codes_ptr + 15),
        ],
        dtype=(gl.uint32,) * 8,
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _operand(words, tables, operand_layout: gl.constexpr):
    """The register operand (rows, 64 slots) of a sub-step from its words
    (rows, 4 chunks, 2): word i of chunk t fills slices 2i and 2i + 1."""
    l0, l1, l2, l3, h0, h1, h2, h3 = tables
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        DECODE_PTX,
        "=r,=r,=r,=r" + ",r" * 9,
        [words, l0, l1, l2, l3, h0, h1, h2, h3],
        dtype=(gl.uint32,) * 4,
        is_pure=True,
        pack=1,
    )
    # Pair j = 2 js + h of word i (columns 8 i + 2 j + e of the chunk) goes
    # to slot 32 i + 16 js + 8 h + 2 t + e.
    pairs = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # (rows, t, i, h, js)
    low = (pairs & 0xFFFF).to(gl.uint16).to(gl.bfloat16, bitcast=True)
    high = (pairs >> 16).to(gl.uint16).to(gl.bfloat16, bitcast=True)
    operand = gl.permute(gl.join(low, high), (0, 2, 4, 3, 1, 5))
    operand = gl.reshape(operand, (operand.shape[0], 64))
    return gl.convert_layout(operand, operand_layout, assert_trivial=True)


@gluon.jit
def wgmma_kernel(
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
    BLOCKSIZE: gl.constexpr,
    BLOCK_T: gl.constexpr,
    RING: gl.constexpr,
    SPLIT: gl.constexpr,
    num_warps: gl.constexpr,
):
    """out (M, N) = x (M, K) @ weight.T for 16 num_warps weight rows and
    BLOCK_T tokens, over one of SPLIT ranges of K. The activations of each
    sub-step are copied RING - 2 sub-steps ahead into a ring of RING
    tiles; one `warpgroup_mma` stays in flight while the next is decoded."""
    ROWS: gl.constexpr = 16 * num_warps
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    first = pid_k * STEPS_PER_SPLIT
    last = gl.minimum(first + STEPS_PER_SPLIT, STEPS)
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_T, 16]
    )
    operand_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=mma, k_width=2
    )
    words_layout: gl.constexpr = _word_layout(ROWS, 2)
    blocks_layout: gl.constexpr = gl.SliceLayout(2, words_layout)
    rows = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blocks_layout))
    rows = gl.minimum(rows, N - 1).to(gl.int64)
    chunks = gl.arange(0, 4, layout=gl.SliceLayout(0, blocks_layout))
    pair_words = gl.arange(
        0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, words_layout))
    )
    words_ptrs = (
        words_ptr
        + (rows[:, None] * K_WORDS + chunks[None, :] * 8)[:, :, None]
        + pair_words[None, None, :]
    )
    absmax_ptrs = (
        absmax_ptr + rows[:, None] * K_BLOCKS + (64 * chunks)[None, :] // BLOCKSIZE
    )

    copies: gl.constexpr = _copy_layout(BLOCK_T, num_warps)
    ring = gl.allocate_shared_memory(
        gl.bfloat16,
        [RING, BLOCK_T, _SUB_COLUMNS],
        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
    )
    tokens = pid_m * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, copies))
    slots = gl.arange(0, _SUB_COLUMNS, layout=gl.SliceLayout(0, copies))
    x_ptrs = (
        x_ptr
        + gl.minimum(tokens, M - 1).to(gl.int64)[:, None] * stride_xm
        + (first * _STEP_COLUMNS + slots)[None, :]
    )
    x_mask = (tokens < M)[:, None] & (slots[None, :] < _SUB_COLUMNS)

    AHEAD: gl.constexpr = RING - 2
    sub_steps = (last - first) * 4
    for ahead in gl.static_range(AHEAD):
        if ahead < sub_steps:
            _copy_async(
                ring.index(ahead),
                x_ptrs + ahead * _SUB_COLUMNS,
                mask=x_mask,
            )
        async_copy.commit_group()

    acc = gl.zeros((ROWS, BLOCK_T), gl.float32, layout=mma)
    for step in range(first, last):
        tables = _tables(
            gl.load(absmax_ptrs + step * _STEP_COLUMNS // BLOCKSIZE), codes_ptr
        )
        tables = (
            tables[0][:, :, None],
            tables[1][:, :, None],
            tables[2][:, :, None],
            tables[3][:, :, None],
            tables[4][:, :, None],
            tables[5][:, :, None],
            tables[6][:, :, None],
            tables[7][:, :, None],
        )
        words = gl.load(words_ptrs + step * 32)
        for q in gl.static_range(4):
            sub_step = (step - first) * 4 + q
            if q < 3:
                sub_step_words = gl.load(words_ptrs + step * 32 + (q + 1) * 2)
            # This thread's copies of the sub-step have landed. Past the
            # barrier the compiler puts after the wait, every warpgroup is
            # done with the tile the next copy overwrites (two sub-steps
            # ago); past the one after the copy, every thread's fenced
            # copies are visible to the tensor cores. Issued between them,
            # the copy needs no barrier of its own before the `wgmma` (two
            # per sub-step instead of three with triton 3.6).
            async_copy.wait_group(AHEAD - 1)
            fence_async_shared()
            later = sub_step + AHEAD
            if later < sub_steps:
                _copy_async(
                    ring.index(later % RING),
                    x_ptrs + later * _SUB_COLUMNS,
                    mask=x_mask,
                )
            async_copy.commit_group()
            _barrier()
            operand = _operand(words, tables, operand_layout)
            tile = ring.index(sub_step % RING).permute((1, 0))
            acc = warpgroup_mma(operand, tile, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if q < 3:
                words = sub_step_words
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    out_rows = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
    out_tokens = pid_m * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
    out_mask = (out_rows[:, None] < N) & (out_tokens[None, :] < M)
    out_ptrs = (
        out_ptr + out_tokens.to(gl.int64)[None, :] * stride_om + out_rows[:, None]
    )
    if SPLIT == 1:
        gl.store(out_ptrs, acc.to(gl.bfloat16), mask=out_mask)
    else:
        # As `fused_4bit._write_tile`: partial sums, and the last program of
        # the tile adds them in split order.
        offsets = out_tokens.to(gl.int64)[None, :] * N + out_rows[:, None]
        gl.store(partial_ptr + pid_k * M * N + offsets, acc, mask=out_mask)
        _barrier()
        tile_id = pid_m * gl.num_programs(0) + pid_n
        arrived = gl.atomic_add(arrivals_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = gl.zeros((ROWS, BLOCK_T), gl.float32, layout=mma)
            for split in gl.static_range(SPLIT):
                total += gl.load(
                    partial_ptr + split * M * N + offsets,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            gl.store(out_ptrs, total.to(gl.bfloat16), mask=out_mask)
            gl.atomic_xchg(arrivals_ptr + tile_id, 0)


def slot_order(x: torch.Tensor) -> torch.Tensor:
    """A copy of x (M, K) whose columns are in the order of the kernel's k
    slots: in each step of 256 columns, sub-step q's slot 16 s + 8 h + 2 t
    + e holds column 64 t + 16 q + 4 s + 2 h + e. One pass over x lets the
    kernel copy its activations 16 bytes at a time."""
    tokens, columns = x.shape
    # (tokens, step, t, q, s, h, e) -> (tokens, step, q, s, h, t, e)
    chunks = x.reshape(tokens, columns // STEP_COLUMNS, 4, 4, 4, 2, 2)
    return chunks.permute(0, 1, 3, 4, 5, 2, 6).reshape(tokens, columns)


def ring_tiles(tokens_per_program: int, per_processor: int) -> int:
    """Activation tiles in the ring of a program of that many tokens, with
    `per_processor` programs sharing a multiprocessor."""
    return RING_BYTES // (per_processor * tokens_per_program * SUB_COLUMNS * 2)


def max_registers(num_warps: int, per_processor: int) -> int:
    """Registers per thread that let `per_processor` programs share a
    multiprocessor."""
    return min(255, _REGISTERS // (per_processor * num_warps * 32))


def supports(weight: MergedWeight, device: torch.device) -> bool:
    """Whether `matmul` takes this layer on `device`: an sm_90 GPU, steps of
    256 columns, chunks of 64 in one absmax block."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) == (9, 0)
        and fused_4bit.supports(weight)
        and weight.state.shape[1] % STEP_COLUMNS == 0
    )


def _tiles(rows: int, tokens: int, block_t: int, num_warps: int) -> tuple[int, int]:
    """Programs along the rows and along the tokens, one tile each."""
    return triton.cdiv(rows, 16 * num_warps), triton.cdiv(tokens, block_t)


def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(
    weight: MergedWeight, tokens: int, device: torch.device
) -> tuple[int, int, int]:
    """Tokens per program, warps (16 weight rows each) and programs per
    multiprocessor, the fastest of sweeps on an H100 and an H200 at
    Llama-3-8B shapes (docs/benchmarks.md, section 5): `SMALL` up to its
    64 tokens (no padding to 128), `WIDE` where its tiles cover every
    multiprocessor beyond 128 tokens (gate/up: each weight decoded once),
    `NARROW` elsewhere (the smaller layers, and every layer from 65 to 128
    tokens: four times the tiles, two programs to a multiprocessor)."""
    if tokens <= SMALL[0]:
        return SMALL
    block_t, num_warps, per_processor = WIDE
    row_tiles, token_tiles = _tiles(weight.state.shape[0], tokens, block_t, num_warps)
    fills_the_gpu = row_tiles * token_tiles >= per_processor * _processors(device)
    return WIDE if tokens > NARROW[0] and fills_the_gpu else NARROW


def _split_for(
    device: torch.device, programs: int, steps: int, per_processor: int
) -> int:
    """Ranges of K per tile: as many as the GPU's program slots hold at
    once, while each keeps `MIN_SPLIT_STEPS` steps (each range writes and
    reads back a float32 tile)."""
    slots = per_processor * _processors(device)
    return max(1, min(slots // programs, steps // MIN_SPLIT_STEPS))


def matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    split: int | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out`
    (M, N) bfloat16 if given. `split` fixes the ranges of K per tile, and
    `config` the launch instead of `launch_config`'s (for checks and
    sweeps)."""
    if x.dtype != torch.bfloat16 or not supports(weight, x.device):
        raise ValueError(
            "the warpgroup 4-bit kernel multiplies bfloat16 activations on sm_90 "
            f"by rows of a multiple of {STEP_COLUMNS} columns in blocks of a "
            f"multiple of 64, not {x.dtype} by {tuple(weight.state.shape)}"
        )
    tokens, columns = x.shape
    rows = weight.state.shape[0]
    block_t, num_warps, per_processor = config or launch_config(
        weight, tokens, x.device
    )
    if out is None:
        out = torch.empty(tokens, rows, dtype=torch.bfloat16, device=x.device)
    if out.stride(1) != 1:
        raise ValueError(
            "the warpgroup 4-bit kernel writes an out with unit column stride"
        )
    x = slot_order(x)
    steps = columns // STEP_COLUMNS
    row_tiles, token_tiles = _tiles(rows, tokens, block_t, num_warps)
    programs = row_tiles * token_tiles
    if split is None:
        split = _split_for(x.device, programs, steps, per_processor)
    split, steps_per_split, partial = fused_4bit.split_k(out, programs, steps, split)
    wgmma_kernel[(row_tiles, token_tiles, split)](
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
        BLOCK_T=block_t,
        RING=ring_tiles(block_t, per_processor),
        SPLIT=split,
        num_warps=num_warps,
        maxnreg=max_registers(num_warps, per_processor),
    )
    return out
