# SPDX-License-Identifier: Apache-2.0
"""Machine instructions per weight of the register 4-bit kernels, without
a GPU.

Usage (any machine with torch and triton; no GPU, no CUDA driver)::

    python3 -m benchmarks.gpu_4bit_sass [--arch 90]

Compiles `fused_4bit.fused_kernel` and `fragment_4bit.fragment_kernel` for
an NVIDIA architecture (sm_90, the H100/H200, by default) with Triton's
bundled ptxas, disassembles them with its bundled nvdisasm, and counts the
SASS instructions in each kernel's main loop per weight and thread, by
opcode. It is a static count of the code a GPU would run, the budget the
kernel design works against (an H200 issues about 3.3e13
thread-instructions per second, so a Llama-3-8B decoder layer's 218 million
weights at 6 instructions each need at least 40 µs); it says nothing about
latency or memory stalls, which only a GPU run measures
(`benchmarks/gpu_4bit.py`). Another triton release can be counted from a
folder ahead of this one on `PYTHONPATH`, e.g. after
``pip install --no-deps --target /tmp/t36 triton==3.6.0``.
"""

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

from vllm.plugins.bitsandbytes import fragment_4bit, fused_4bit, wgmma_4bit

SIGNATURE = {
    "x_ptr": "*bf16",
    "words_ptr": "*i32",
    "absmax_ptr": "*fp32",
    "codes_ptr": "*fp32",
    "partial_ptr": "*fp32",
    "arrivals_ptr": "*i32",
    "out_ptr": "*bf16",
    "M": "i32",
    "N": "i32",
    "K_WORDS": "i32",
    "K_BLOCKS": "i32",
    "STEPS": "i32",
    "STEPS_PER_SPLIT": "i32",
    "stride_xm": "i32",
    "stride_om": "i32",
}
# What Triton assumes at a launch with Llama-3-8B shapes: 16-byte aligned
# pointers and these integers divisible by 16.
DIVISIBLE_BY_16 = ("N", "K_WORDS", "K_BLOCKS", "stride_xm", "stride_om")
NUM_WARPS = 4
# Llama-3-8B's hidden size, the K of most of its layers.
COLUMNS = 4096


def _compile(
    kernel,
    signature,
    constants,
    arch,
    num_warps,
    num_stages,
    source_type=ASTSource,
    **options,
):
    """`kernel` compiled for sm_`arch` as a launch at Llama-3-8B shapes sees
    it: 16-byte aligned pointers, DIVISIBLE_BY_16 integers divisible by 16."""
    names = list(signature)
    aligned = [n for n, t in signature.items() if t.startswith("*")]
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name in aligned + [n for n in DIVISIBLE_BY_16 if n in signature]
    }
    source = source_type(
        fn=kernel, signature=signature, constexprs=constants, attrs=attrs
    )
    options.update(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_kernel(arch, tokens, split):
    """The fused kernel as `fused_4bit.matmul` launches it for `tokens`
    tokens, and the weights per thread of one step of its main loop."""
    block_m, chunks, stages = fused_4bit.launch_config(tokens, COLUMNS)
    constants = {
        "BLOCKSIZE": 64,
        "BLOCK_N": fused_4bit.ROWS,
        "BLOCK_M": block_m,
        "CHUNKS": chunks,
        "SPLIT": split,
    }
    kernel = _compile(
        fused_4bit.fused_kernel, SIGNATURE, constants, arch, NUM_WARPS, stages
    )
    return kernel, fused_4bit.ROWS * 64 * chunks / (32 * NUM_WARPS)


def compile_fragment(arch, tokens, split):
    """`fragment_4bit.fragment_kernel` as `fragment_4bit.matmul` launches it
    for `tokens` tokens (8: one fragment of them, 16: two), and the weights
    per thread of one step of its main loop."""
    rows, num_warps = fragment_4bit.launch_config(tokens)
    kernel = fragment_4bit.fragment_kernel
    types = {
        **SIGNATURE,
        "x_ptr": "*i32",
        "experts_ptr": "*i32",
        "routed_tokens_ptr": "*i32",
        "EXPERT_ROWS": "i32",
    }
    signature = {name: types[name] for name in kernel.arg_names if name in types}
    constants = {
        "BLOCKSIZE": 64,
        "BLOCK_N": rows,
        "TOKENS": tokens,
        "SPLIT": split,
        "ROUTED": False,
    }
    compiled = _compile(kernel, signature, constants, arch, num_warps, 1)
    return compiled, rows * 256 / (32 * num_warps)


def compile_wgmma(arch, config, split):
    """`wgmma_4bit.wgmma_kernel` as `wgmma_4bit.matmul` launches it with
    `config` (tokens per program, warps, programs per multiprocessor), and
    the weights per thread of one step of its loop."""
    from triton.experimental.gluon._runtime import GluonASTSource

    block_t, num_warps, per_processor = config
    kernel = wgmma_4bit.wgmma_kernel
    types = {**SIGNATURE, "x_ptr": "*bf16"}
    signature = {name: types[name] for name in kernel.arg_names if name in types}
    constants = {
        "BLOCKSIZE": 64,
        "BLOCK_T": block_t,
        "RING": wgmma_4bit.ring_tiles(block_t, per_processor),
        "SPLIT": split,
        "num_warps": num_warps,
    }
    compiled = _compile(
        kernel,
        signature,
        constants,
        arch,
        num_warps,
        1,
        source_type=GluonASTSource,
        maxnreg=wgmma_4bit.max_registers(num_warps, per_processor),
    )
    return compiled, 16 * num_warps * wgmma_4bit.STEP_COLUMNS / (32 * num_warps)


def main_loop(sass):
    """Opcodes of the longest backward-branching block (the K loop)."""
    lines = [line.strip() for line in sass.splitlines()]
    labels, loops = {}, []
    for index, line in enumerate(lines):
        if re.fullmatch(r"\.?L\w*:", line):
            labels[line[:-1]] = index
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].lstrip("@!P0123456789T ").startswith("BRA"):
            continue
        target = fields[1].rstrip(";").split()[-1]
        if labels.get(target, index) < index:
            body = [
                f.split("\t")[1] for f in lines[labels[target] : index + 1] if "\t" in f
            ]
            loops.append([re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body])
    return max(loops, key=len)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, main loop per weight")
    kernels = [
        (f"BLOCK_M {block_m:3d}", compile_kernel(args.arch, block_m, 1))
        for block_m in (16, 64, 128)
    ]
    # With split K, as small layers get it (the main loop is the same).
    kernels += [
        (f"fragment, {tokens} tokens", compile_fragment(args.arch, tokens, 5))
        for tokens in (8, 16)
    ]
    # Split (the main loop is the same).
    kernels += [
        (
            f"wgmma, {config[0]} tokens, {config[1]} warps",
            compile_wgmma(args.arch, config, 2),
        )
        for config in wgmma_4bit.CONFIGS
    ]
    for label, (kernel, weights_per_thread) in kernels:
        loop = main_loop(get_sass(kernel.asm["cubin"]))
        opcodes = collections.Counter(op.split(".")[0] for op in loop)
        top = ", ".join(
            f"{op} {count / weights_per_thread:.2f}"
            for op, count in opcodes.most_common(8)
        )
        print(
            f"{label}: {len(loop) / weights_per_thread:.2f} instructions ({top}); "
            f"shared or local memory in the loop: {_memory_ops(opcodes)}; "
            f"{_registers(kernel)} registers; {opcodes['HGMMA']} HGMMA"
        )


def _registers(kernel):
    """Registers per thread, as Triton's bundled cuobjdump reads the cubin."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [tools / "cuobjdump", "-res-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def _memory_ops(opcodes):
    """Shared-memory accesses, barriers and register spills (local memory)
    per loop iteration, by opcode."""
    ops = {
        op: n for op, n in opcodes.items() if op in ("LDS", "STS", "BAR", "LDL", "STL")
    }
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "none"


if __name__ == "__main__":
    main()
