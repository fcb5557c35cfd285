# SPDX-License-Identifier: Apache-2.0
"""patches/ and the git trees made from it.

A tree is a git repository whose commit tagged `base` holds the pristine
sources of a base wheel. The series is applied on top as commits with
`git am`, and the fork's own files (vllm/ of this repository) are symlinked in
and ignored by git, so that editing them in the tree edits the repository.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import git
from .base import REPO, Base, log, unpack_pristine


@dataclass
class Replay:
    """Where replaying the series onto another release got to."""

    replayed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    stopped_at: str | None = None
    conflicts: list[str] = field(default_factory=list)


PATCHES = REPO / "patches"
OVERLAY = REPO / "vllm"
# Compiled extensions: symlinked into a tree, never tracked.
BINARY_SUFFIXES = (".so",)
# git's default context, so that every hunk reads on its own.
PATCH_CONTEXT_LINES = 3
BASE_TAG = "base"
BRANCH = "fork"
IDENTITY = (
    "user.name=vllm-fork-tools",
    "user.email=vllm-fork-tools@localhost",
    "commit.gpgsign=false",
)


def parse_series(text: str) -> list[str]:
    """Patch names of a series file, in order.

    `#` starts a comment, on its own line or after a name; blank lines are
    skipped.
    """
    names = []
    for line in text.splitlines():
        name = line.partition("#")[0].strip()
        if name:
            names.append(name)
    return names


def render_series(names: list[str], previous: str = "") -> str:
    """A series file listing `names`, keeping the comments of `previous`.

    Comment and blank lines stay with the entry that follows them, an inline
    comment with its entry, and lines after the last entry stay last. The
    comments of an entry that is gone (a dropped or renamed patch) go with it.
    """
    attached: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in previous.splitlines():
        name = line.partition("#")[0].strip()
        if not name:
            pending.append(line)
            continue
        suffix = line[line.index(name) + len(name) :]
        attached[name] = [*pending, name + suffix]
        pending = []
    lines = [line for name in names for line in attached.get(name, [name])]
    return "".join(f"{line}\n" for line in [*lines, *pending])


def series(patches: Path = PATCHES) -> list[Path]:
    return [patches / name for name in parse_series((patches / "series").read_text())]


def touched_paths(patch: Path) -> dict[str, str]:
    """The paths a `git format-patch` file changes: "A", "M" or "D"."""
    changes: dict[str, str] = {}
    path = ""
    for line in patch.read_text().splitlines():
        if line.startswith("diff --git "):
            path = line.rpartition(" b/")[2]
            changes[path] = "M"
        elif not path:
            continue
        elif line.startswith("new file mode"):
            changes[path] = "A"
        elif line.startswith("deleted file mode"):
            changes[path] = "D"
        elif line.startswith("rename from "):
            changes[line.removeprefix("rename from ")] = "D"
            changes[path] = "A"
    return changes


def series_changes(patches: list[Path]) -> dict[str, str]:
    """What the whole series does to each path it touches: "A", "M" or "D"."""
    combined: dict[str, str] = {}
    for patch in patches:
        for path, change in touched_paths(patch).items():
            before = combined.get(path)
            if before == "A" and change == "D":
                del combined[path]
            elif before == "A":
                continue
            elif before == "D" and change == "A":
                combined[path] = "M"
            else:
                combined[path] = change
    return combined


def import_sources(pristine: Path, tree: Path, link_binaries: bool = True) -> None:
    """Copy `pristine`/vllm into `tree`/vllm; link compiled extensions."""
    source = pristine / "vllm"
    (tree / "vllm").mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        target = tree / "vllm" / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not path.name.endswith(BINARY_SUFFIXES):
            shutil.copy2(path, target)
        elif link_binaries:
            target.symlink_to(path)


def new_repository(
    tree: Path, pristine: Path, message: str, tag: str, link_binaries: bool = True
) -> git.Repo:
    """A fresh repository at `tree` with the sources of `pristine`, tagged."""
    shutil.rmtree(tree, ignore_errors=True)
    import_sources(pristine, tree, link_binaries)
    repo = git.init(tree, BRANCH, IDENTITY)
    git.exclude(repo, [f"*{suffix}" for suffix in BINARY_SUFFIXES])
    git.commit_all(repo, message)
    repo.run("tag", tag)
    return repo


def base_message(base: Base) -> str:
    """The subject of a tree's base commit: names the wheel it came from."""
    return f"vLLM {base.version} ({base.filename})"


def pristine_repository(base: Base, tree: Path) -> git.Repo:
    """A repository of the pristine sources of `base`, tagged `base`."""
    return new_repository(tree, unpack_pristine(base), base_message(base), BASE_TAG)


def overlay_roots(pristine: Path, overlay: Path = OVERLAY) -> list[Path]:
    """The fork's own files and directories, relative to the tree's root.

    A directory that `pristine` lacks is linked as a whole, so files created in
    it while editing the materialized tree land in the repository.
    """
    roots: list[Path] = []

    def visit(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name == "__pycache__":
                continue
            relative = entry.relative_to(overlay.parent)
            if entry.is_dir() and (pristine / relative).is_dir():
                visit(entry)
            else:
                roots.append(relative)

    if overlay.is_dir():
        visit(overlay)
    return roots


def link_overlay(tree: Path, pristine: Path, overlay: Path = OVERLAY) -> int:
    """Symlink the fork's own files into `tree`; how many paths were linked."""
    roots = overlay_roots(pristine, overlay)
    for relative in roots:
        link = tree / relative
        if link.exists() or link.is_symlink():
            raise SystemExit(
                f"{relative} is in vllm/ but upstream has it too: patch it instead."
            )
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(overlay.parent / relative)
    git.exclude(git.Repo(tree), [f"/{relative}" for relative in roots])
    return len(roots)


def materialize(base: Base, tree: Path) -> Path:
    log(f"materializing {tree} from {base.filename}")
    repo = pristine_repository(base, tree)
    patches = series()
    if patches and not git.am(repo, patches):
        raise SystemExit(
            f"the series does not apply to {base.filename} (git am stopped above, "
            f"in {tree})."
        )
    linked = link_overlay(tree, base.pristine)
    log(f"{len(patches)} patches applied, {linked} overlay paths linked")
    return tree


def require_clean(repo: git.Repo, tree: Path) -> None:
    """Refuse to export a tree with a git operation or changes pending."""
    operation = git.operation_in_progress(repo)
    if operation:
        raise SystemExit(
            f"{tree} is in the middle of a `git {operation}`; finish it first "
            f"(`git {operation} --continue`) or abort it (`git {operation} --abort`)."
        )
    status = git.status(repo)
    if status.strip():
        raise SystemExit(
            f"{tree} has uncommitted changes; commit them first:\n{status}"
        )


def export(
    tree: Path, destination: Path, previous_series: str | None = None
) -> list[str]:
    """Write `base..HEAD` of `tree` as patches plus `series`.

    The series keeps the comments of `previous_series`, by default of the
    series file already in `destination`.
    """
    repo = git.Repo(tree)
    require_clean(repo, tree)
    listing = destination / "series"
    if previous_series is None:
        previous_series = listing.read_text() if listing.exists() else ""
    destination.mkdir(parents=True, exist_ok=True)
    for old in destination.glob("*.patch"):
        old.unlink()
    written = git.format_patch(
        repo, f"{BASE_TAG}..HEAD", destination,
        "--zero-commit", "--no-signature", "--no-numbered",
        f"--unified={PATCH_CONTEXT_LINES}", "--abbrev=12",
    )  # fmt: skip
    names = [path.name for path in written]
    listing.write_text(render_series(names, previous_series))
    return names


def check(base: Base, then: Callable[[Path], None] | None = None) -> None:
    """The series applies to pristine sources and re-exports unchanged.

    `then` runs on the fresh tree afterwards (e.g. a lint of it).
    """
    with tempfile.TemporaryDirectory(prefix="fork-check-") as scratch:
        tree = materialize(base, Path(scratch) / "tree")
        exported = Path(scratch) / "patches"
        export(tree, exported, (PATCHES / "series").read_text())
        expected = sorted(p.name for p in PATCHES.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(
            PATCHES, exported, expected, shallow=False
        )
        extra = {p.name for p in exported.iterdir()} - set(expected)
        if mismatch or errors or extra:
            raise SystemExit(
                "patches/ is out of sync with what the series produces: "
                f"differing {mismatch + errors}, unexpected {sorted(extra)}. "
                "Run `tools/fork.py materialize` and `tools/fork.py export`."
            )
        if then is not None:
            then(tree)
    log(f"series OK: {len(series())} patches apply cleanly and re-export identically")
