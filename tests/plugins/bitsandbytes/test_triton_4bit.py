# SPDX-License-Identifier: Apache-2.0
"""The Triton 4-bit kernels, checked in a process of their own.

Triton decides whether a kernel runs compiled or in its interpreter when
triton is imported, and this session has imported it already. Without CUDA
the checks run with `TRITON_INTERPRET=1`, on the CPU; with CUDA, compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.parametrize("checks", ["triton_4bit_checks.py", "moe_routing_checks.py"])
def test_triton_4bit_kernels(checks):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / checks),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1:] or [result.stderr[-2000:]]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary[0] and "failed" not in summary[0], summary
