# SPDX-License-Identifier: Apache-2.0
"""The fork exported as one upstream series applies to pristine 0.32.0 (the
pinned base) patch by patch, each step imports and passes its unit tests, and
the end result is the fork."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exported_series_is_bisectable_and_reproduces_the_fork():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fork.py"), "check-upstream"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    assert "upstream series OK" in result.stderr
