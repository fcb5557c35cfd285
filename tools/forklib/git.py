# SPDX-License-Identifier: Apache-2.0
"""Git helpers.

Everything here is project agnostic: no paths, names or policies of the fork,
only thin wrappers that say what each git invocation is for.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Repo:
    """A work tree, plus `-c key=value` settings given to every command."""

    path: Path
    config: tuple[str, ...] = ()

    def run(
        self, *args: str, capture: bool = False, check: bool = True, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`quiet`: discard what git prints (e.g. its hints after a conflict)."""
        settings = [item for setting in self.config for item in ("-c", setting)]
        return subprocess.run(
            ["git", *settings, "-C", str(self.path), *args],
            check=check,
            text=True,
            stdout=subprocess.PIPE
            if capture
            else subprocess.DEVNULL
            if quiet
            else None,
            stderr=subprocess.DEVNULL if quiet else None,
        )

    def output(self, *args: str) -> str:
        return self.run(*args, capture=True).stdout


def init(path: Path, branch: str, config: Iterable[str] = ()) -> Repo:
    path.mkdir(parents=True, exist_ok=True)
    repo = Repo(path, tuple(config))
    repo.run("init", "-q", "-b", branch)
    return repo


def exclude(repo: Repo, patterns: Iterable[str]) -> None:
    """Append to `.git/info/exclude`: ignored here, never in a commit."""
    with (repo.path / ".git" / "info" / "exclude").open("a") as f:
        f.writelines(f"{pattern}\n" for pattern in patterns)


def commit_all(repo: Repo, message: str) -> None:
    """Commit the whole work tree (additions and removals included)."""
    repo.run("add", "-A")
    repo.run("commit", "-q", "--allow-empty", "-m", message)


def clear_work_tree(repo: Repo) -> None:
    """Remove every file from the work tree and the index, ignored ones too."""
    repo.run("rm", "-r", "-q", "--ignore-unmatch", ".")
    repo.run("clean", "-f", "-d", "-x", "-q")


def am(repo: Repo, patches: Iterable[Path], *, threeway: bool = False) -> bool:
    """Apply mailbox patches as commits; False if `git am` stopped."""
    args = ["am", "-q", "--keep-cr", "--keep-non-patch"]
    if threeway:
        args.append("--3way")
    return repo.run(*args, *map(str, patches), check=False).returncode == 0


def apply(repo: Repo, diff: str) -> bool:
    """Apply a diff to the work tree only (not the index); False if it does
    not apply, in which case nothing is changed."""
    result = subprocess.run(
        ["git", "-C", str(repo.path), "apply", "--whitespace=nowarn", "-"],
        input=diff,
        text=True,
        check=False,
    )
    return result.returncode == 0


def diff_paths(repo: Repo, diff: str) -> list[str]:
    """The paths a diff changes (as `git apply --numstat` reads it)."""
    result = subprocess.run(
        ["git", "-C", str(repo.path), "apply", "--numstat", "-"],
        input=diff,
        text=True,
        check=True,
        stdout=subprocess.PIPE,
    )
    return [line.split("\t", 2)[2] for line in result.stdout.splitlines()]


def format_patch(repo: Repo, revisions: str, out: Path, *options: str) -> list[Path]:
    """`git format-patch` of `revisions` into `out`; the files written."""
    written = repo.output("format-patch", *options, "-o", str(out), revisions)
    return [Path(line) for line in written.split()]


def rebase_onto(repo: Repo, new_base: str, old_base: str, branch: str) -> bool:
    """Replay `old_base..branch` onto `new_base`; False if it stopped."""
    result = repo.run("rebase", "--onto", new_base, old_base, branch, check=False)
    return result.returncode == 0


def operation_in_progress(repo: Repo) -> str | None:
    """ "rebase", "am" or None: what a `--continue` would resume."""
    git_dir = repo.path / ".git"
    if (git_dir / "rebase-merge").is_dir():
        return "rebase"
    if (git_dir / "rebase-apply" / "applying").exists():
        return "am"
    if (git_dir / "rebase-apply").is_dir():
        return "rebase"
    return None


def subjects(repo: Repo, revisions: str) -> list[str]:
    """Commit subjects of `revisions`, oldest first."""
    return repo.output("log", "--reverse", "--format=%s", revisions).splitlines()


def unmerged_paths(repo: Repo) -> list[str]:
    return repo.output("diff", "--name-only", "--diff-filter=U").split()


def status(repo: Repo) -> str:
    return repo.output("status", "--porcelain")


def has_ref(repo: Repo, ref: str) -> bool:
    verify = ("rev-parse", "-q", "--verify", f"{ref}^{{commit}}")
    return repo.run(*verify, capture=True, check=False).returncode == 0


def changes(repo: Repo, revisions: str) -> dict[str, str]:
    """What `revisions` does to each path: "A", "M" or "D" (renames split)."""
    listing = repo.output("diff", "--name-status", "--no-renames", revisions)
    return {
        path: kind for kind, path in (line.split("\t") for line in listing.splitlines())
    }


def numstat(repo: Repo, revisions: str) -> list[tuple[int, int, str]]:
    """(lines added, lines removed, path) of each file `revisions` changes."""
    rows = []
    for line in repo.output(
        "diff", "--numstat", "--no-renames", revisions
    ).splitlines():
        added, removed, path = line.split("\t")
        # Binary files count no lines.
        rows.append(
            (int(added.replace("-", "0")), int(removed.replace("-", "0")), path)
        )
    return rows
