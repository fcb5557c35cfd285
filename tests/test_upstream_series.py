# SPDX-License-Identifier: Apache-2.0
"""The fork exported as PR-sized upstream series applies to pristine 0.32.0
(the pinned base) series after series, every commit imports, every series
passes its exported tests and upstream's lint, and the result plus the
fork-only patches is the fork."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exported_series_apply_import_and_pass_their_tests(tmp_path: Path):
    out = tmp_path / "series"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fork.py"), "check-upstream",
         "--out", str(out), "--sign-off", "Test Submitter <submitter@example.com>"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    assert "upstream series OK" in result.stderr
    descriptions = sorted(out.glob("*/PR.md"))
    assert descriptions
    for description in descriptions:
        test_result = description.read_text().partition("## Test Result\n")[2]
        assert "measured by `tools/fork.py check-upstream`" in test_result
        if "tests/" in test_result:
            assert re.search(r"\b\d+ passed\b", test_result), description
