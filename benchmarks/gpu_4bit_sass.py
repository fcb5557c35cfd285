# SPDX-License-Identifier: Apache-2.0
"""Machine instructions per weight of the fused 4-bit kernel, without a GPU.

Usage (any machine with torch and triton; no GPU, no CUDA driver)::

    python3 -m benchmarks.gpu_4bit_sass [--arch 90]

Compiles `fused_4bit.fused_kernel` for an NVIDIA architecture (sm_90, the
H100/H200, by default) with Triton's bundled ptxas, disassembles it with its
bundled nvdisasm, and counts the SASS instructions in the kernel's main loop
per weight and thread, by opcode. It is a static count of the code a GPU
would run, the budget the kernel design works against (an H200 issues about
3.3e13 thread-instructions per second, so a Llama-3-8B decoder layer's 218
million weights at 6 instructions each need at least 40 µs); it says
nothing about latency or memory stalls, which only a GPU run measures
(`benchmarks/gpu_4bit.py`).
"""

import argparse
import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

from vllm.plugins.bitsandbytes import fused_4bit

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


def compile_kernel(arch, tokens, split):
    """The kernel as `fused_4bit.matmul` launches it for `tokens` tokens."""
    block_m, chunks, stages = fused_4bit.launch_config(tokens, COLUMNS)
    names = list(SIGNATURE)
    aligned = [n for n, t in SIGNATURE.items() if t.startswith("*")]
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name in aligned + list(DIVISIBLE_BY_16)
    }
    constants = {
        "BLOCKSIZE": 64,
        "BLOCK_N": fused_4bit.ROWS,
        "BLOCK_M": block_m,
        "CHUNKS": chunks,
        "SPLIT": split,
    }
    source = ASTSource(
        fn=fused_4bit.fused_kernel,
        signature=SIGNATURE,
        constexprs=constants,
        attrs=attrs,
    )
    options = {"num_warps": NUM_WARPS, "num_stages": stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, fused_4bit.ROWS * 64 * chunks / (32 * NUM_WARPS)


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
    for block_m in (16, 64, 128):
        kernel, weights_per_thread = compile_kernel(args.arch, block_m, 1)
        loop = main_loop(get_sass(kernel.asm["cubin"]))
        opcodes = collections.Counter(op.split(".")[0] for op in loop)
        top = ", ".join(
            f"{op} {count / weights_per_thread:.2f}"
            for op, count in opcodes.most_common(8)
        )
        print(
            f"BLOCK_M {block_m:3d}: {len(loop) / weights_per_thread:.2f} "
            f"instructions ({top})"
        )


if __name__ == "__main__":
    main()
