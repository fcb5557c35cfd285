# SPDX-License-Identifier: Apache-2.0
"""Upstream's lint on what the fork changes: ruff with vLLM's own settings.

vLLM's CI runs `ruff check` and `ruff format --check` with the settings of its
pyproject.toml, which the wheel does not ship: tools/ruff-vllm.toml encodes
them. Files the fork adds must be clean. Upstream files the fork patches are
held only to what the patches change: a violation counts when its file has
more of that code than the same file in the pristine sources, and a file
fails the format check only when its pristine version passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import git
from .base import REPO, Base, log
from .series import BASE_TAG, OVERLAY

RUFF_CONFIG = REPO / "tools" / "ruff-vllm.toml"
RUFF = [sys.executable, "-m", "ruff"]


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} {self.message}"


def ruff_check(root: Path, paths: list[str]) -> list[Violation]:
    """`ruff check` findings in the files `paths`, relative to `root`."""
    if not paths:
        return []
    result = subprocess.run(
        [*RUFF, "check", "--config", str(RUFF_CONFIG), "--no-cache",
         "--exit-zero", "--output-format", "json", *paths],
        cwd=root, check=True, text=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    return [
        Violation(
            str(Path(found["filename"]).relative_to(root.absolute())),
            found["location"]["row"],
            found["code"] or "syntax",
            found["message"],
        )
        for found in json.loads(result.stdout)
    ]


def unformatted(root: Path, paths: list[str]) -> set[str]:
    """The files among `paths` that `ruff format --check` would reformat."""
    if not paths:
        return set()
    result = subprocess.run(
        [*RUFF, "format", "--check", "--config", str(RUFF_CONFIG), "--no-cache",
         "--output-format", "json", *paths],
        cwd=root, text=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    if result.returncode not in (0, 1):
        raise SystemExit(f"ruff format failed in {root}:\n{result.stdout}")
    return {
        str(Path(found["filename"]).relative_to(root.absolute()))
        for found in json.loads(result.stdout)
    }


def new_violations(
    tree: Path, pristine: Path, patched: list[str], added: list[str]
) -> list[str]:
    """What upstream's lint rejects among the fork's changes to `tree`.

    `added` are files the fork adds (every finding counts), `patched` are
    upstream files it changes (only findings that `pristine` lacks count).
    """
    problems: list[str] = []
    found = ruff_check(tree, patched + added)
    before = Counter((v.path, v.code) for v in ruff_check(pristine, patched))
    after = Counter((v.path, v.code) for v in found)
    for violation in found:
        key = (violation.path, violation.code)
        if violation.path in added:
            problems.append(str(violation))
        elif after[key] > before[key]:
            problems.append(
                f"{violation} ({after[key]} {violation.code} in the file, "
                f"{before[key]} upstream)"
            )
    unformatted_before = unformatted(pristine, patched)
    for path in sorted(unformatted(tree, patched + added) - unformatted_before):
        problems.append(f"{path}: not formatted as `ruff format` would")
    return problems


def python_files(paths: list[str]) -> list[str]:
    return sorted(path for path in paths if path.endswith(".py"))


def lint_tree(base: Base, tree: Path) -> None:
    """Upstream's lint on the series and the fork's own files in `tree`."""
    changes = git.changes(git.Repo(tree), f"{BASE_TAG}..HEAD")
    patched = python_files([path for path, kind in changes.items() if kind == "M"])
    added = python_files([path for path, kind in changes.items() if kind == "A"])
    problems = new_violations(tree, base.pristine, patched, added)
    # The fork's own files (vllm/) and the tests and docs meant for vLLM's tree
    # (upstream/) are linted where they are kept: ruff's isort tells a package
    # by its directory, which a symlink into the tree hides (`import
    # bitsandbytes` in vllm/plugins/bitsandbytes/ is of the same package).
    own = python_files(
        [
            str(path.relative_to(REPO))
            for directory in (OVERLAY, REPO / "upstream")
            for path in directory.rglob("*.py")
        ]
    )
    problems += new_violations(REPO, base.pristine, [], own)
    if problems:
        raise SystemExit(
            f"ruff with vLLM's settings ({RUFF_CONFIG.relative_to(REPO)}) rejects:\n"
            + "\n".join(problems)
        )
    log(
        f"lint OK: {len(patched)} patched and {len(added) + len(own)} "
        "new files pass ruff check and ruff format --check with vLLM's settings"
    )
