# SPDX-License-Identifier: Apache-2.0
"""Upstream's lint (ruff with vLLM's settings) on what the fork changes."""

import subprocess
import sys
from pathlib import Path

from forklib.lint import new_violations

REPO = Path(__file__).resolve().parents[2]


def write(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def test_only_new_violations_of_patched_files_count(tmp_path: Path):
    """Pristine's findings are tolerated per file and code; added files and
    new formatting problems are not."""
    pristine, tree = tmp_path / "pristine", tmp_path / "tree"
    before = "import os\n\nx = 1\n"
    write(pristine, {"pkg/kept.py": before, "pkg/worse.py": before})
    write(
        tree,
        {
            "pkg/kept.py": before.replace("x = 1", "x = 2"),
            "pkg/worse.py": "import os\nimport sys\n\nx = 1\n",
            "pkg/new.py": "import json\n",
            "pkg/ugly.py": "x = {  'a':1}\n",
        },
    )
    problems = new_violations(
        tree, pristine, ["pkg/kept.py", "pkg/worse.py"], ["pkg/new.py", "pkg/ugly.py"]
    )
    assert problems == [
        "pkg/new.py:1: F401 `json` imported but unused",
        (
            "pkg/worse.py:1: F401 `os` imported but unused (2 F401 in the file, 1 "
            "upstream)"
        ),
        (
            "pkg/worse.py:2: F401 `sys` imported but unused (2 F401 in the file, 1 "
            "upstream)"
        ),
        "pkg/ugly.py: not formatted as `ruff format` would",
    ]


def test_the_series_and_the_fork_files_pass_upstreams_lint(tmp_path: Path):
    fork = [sys.executable, str(REPO / "tools" / "fork.py")]
    tree = tmp_path / "tree"
    subprocess.run([*fork, "materialize", "--tree", str(tree)], check=True)
    result = subprocess.run(
        [*fork, "lint", "--tree", str(tree)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lint OK" in result.stderr
