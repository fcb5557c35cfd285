# SPDX-License-Identifier: Apache-2.0
"""The register 4-bit kernels (fused, fragment) compiled for an H100/H200
(sm_90) without a GPU: their main loops must stay a register
decode, far below the 11 to 15 instructions per weight that a table load
per weight costs.

`benchmarks.gpu_4bit_sass` compiles with the triton in this environment and
its bundled ptxas; the count is deterministic for a given triton release.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def printed():
    """What `benchmarks.gpu_4bit_sass` prints."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_4bit_sass"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_main_loop_decodes_in_registers(printed):
    counts = re.findall(r"BLOCK_M +(\d+): ([\d.]+) instructions \((.*)\)", printed)
    assert [int(block_m) for block_m, _, _ in counts] == [16, 64, 128]
    for _, per_weight, top in counts:
        assert float(per_weight) < 8, printed
        opcodes = [entry.split()[0] for entry in top.split(", ")]
        # The decode is byte permutes, and no weight is loaded on its own
        # (tiles arrive by LDGSTS, asynchronous copies).
        assert opcodes[0] == "PRMT", printed
        assert "LDG" not in opcodes, printed


def test_fragment_main_loop_feeds_the_tensor_cores_from_registers(printed):
    """`fragment_4bit`'s decoded pairs are `mma.sync` operands as
    they are: if Triton gave them another layout than the fragments' lanes,
    converting them would go through shared memory in the loop (and the
    interpreter checks could not tell). One HMMA per 8 weights and thread
    and 8 tokens (m16n8k16: 256 weights of 16 rows by 16 columns per warp),
    and the activations loaded once for both rows of a fragment, which
    keeps the count under the 4 instructions per weight that the issue
    names as the bandwidth limit's."""
    counts = re.findall(
        r"fragment, (\d+) tokens: ([\d.]+) instructions \((.*)\); "
        r"shared or local memory in the loop: ([^;]*); (\d+) registers",
        printed,
    )
    assert [int(tokens) for tokens, *_ in counts] == [8, 16], printed
    for tokens, per_weight, top, memory, _ in counts:
        assert float(per_weight) < 4, printed
        assert memory == "none", printed
        opcodes = dict(entry.split() for entry in top.split(", "))
        assert abs(float(opcodes["HMMA"]) - int(tokens) / 64) < 0.01, printed


def test_wgmma_main_loop_keeps_the_weights_in_registers(printed):
    """`wgmma_4bit`'s decoded weights are the register operand of `HGMMA`:
    no shared-memory store and no spill in the loop (its only shared-memory
    writes are the activations' `LDGSTS` copies), and as many `HGMMA` per
    step as k16 slices (16) per warpgroup, and at most three barriers per
    sub-step of 4 slices (triton 3.6 places two: after the wait for the
    copies and after their fence; 3.9 a third after the `wgmma` wait in
    the kernel of two warpgroups). The `LDS` that ptxas places after
    barriers are never executed (`@!PT`)."""
    counts = re.findall(
        r"wgmma, (\d+) tokens, (\d+) warps: ([\d.]+) instructions \((.*)\); "
        r"shared or local memory in the loop: ([^;]*); \d+ registers; "
        r"(\d+) HGMMA",
        printed,
    )
    assert [(int(t), int(w)) for t, w, *_ in counts] == [
        (256, 8),
        (128, 4),
        (64, 4),
    ], printed
    for _, _, per_weight, top, memory, hgmma in counts:
        assert float(per_weight) < 8, printed
        assert top.split()[0] == "PRMT", printed
        memory_ops = dict(entry.split() for entry in memory.split(", "))
        assert not {"STS", "STL", "LDL"} & set(memory_ops), printed
        assert int(hgmma) == 16, printed
        assert int(memory_ops["BAR"]) <= 3 * 4, printed
