# SPDX-License-Identifier: Apache-2.0
"""The fused 4-bit kernel compiled for an H200 (sm_90) without a GPU: its main
loop must stay a register decode, far below the 11 to 15 instructions per
weight that a table load per weight costs.

`benchmarks.gpu_4bit_sass` compiles with the triton in this environment and
its bundled ptxas; the count is deterministic for a given triton release.
"""

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[3]


def test_main_loop_decodes_in_registers():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_4bit_sass"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = re.findall(
        r"BLOCK_M +(\d+): ([\d.]+) instructions \((.*)\)", result.stdout
    )
    assert [int(block_m) for block_m, _, _ in counts] == [16, 64, 128]
    for _, per_weight, top in counts:
        assert float(per_weight) < 8, result.stdout
        opcodes = [entry.split()[0] for entry in top.split(", ")]
        # The decode is byte permutes, and no weight is loaded on its own
        # (tiles arrive by LDGSTS, asynchronous copies).
        assert opcodes[0] == "PRMT", result.stdout
        assert "LDG" not in opcodes, result.stdout
