# SPDX-License-Identifier: Apache-2.0
"""The whole fork as one `git am`-able series against pristine sources, for
the upstream pull request, and the check that it is bisectable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import git
from .base import CONFIG, REPO, Base, log
from .series import (
    BASE_TAG,
    BINARY_SUFFIXES,
    IDENTITY,
    materialize,
    overlay_roots,
    pristine_repository,
    touched_paths,
)

IMPORT_ALL = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"


def export_upstream(base: Base, destination: Path) -> list[Path]:
    """The whole fork as one `git am`-able series against pristine sources.

    The patch series comes first, then one commit per entry of
    `[[upstream.commit]]` in tools/fork.toml adding the fork's own files.
    """
    with tempfile.TemporaryDirectory(prefix="fork-upstream-") as scratch:
        return _export(base, Path(scratch) / "tree", destination)


def _export(base: Base, tree: Path, destination: Path) -> list[Path]:
    """`export_upstream` from `tree`, which is left holding the whole fork
    with its own files copied in: the snapshot the series was made from."""
    materialize(base, tree)
    repo = git.Repo(tree, IDENTITY)
    # The fork's own files are committed from here on: unignore them.
    (tree / ".git" / "info" / "exclude").write_text("")
    git.exclude(repo, [f"*{suffix}" for suffix in BINARY_SUFFIXES])
    assigned: set[Path] = set()
    for commit in CONFIG["upstream"]["commit"]:
        for relative in map(Path, commit["paths"]):
            (tree / relative).unlink()
            source = REPO / relative
            if source.is_dir():
                shutil.copytree(
                    source,
                    tree / relative,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy2(source, tree / relative)
            repo.run("add", str(relative))
            assigned.add(relative)
        message = f"{commit['subject']}\n\n{commit['body'].strip()}\n"
        repo.run("commit", "-q", "-m", message)
    unassigned = set(overlay_roots(base.pristine)) - assigned
    if unassigned:
        raise SystemExit(
            f"{sorted(map(str, unassigned))} belong to no [[upstream.commit]] "
            "in tools/fork.toml; add them to one."
        )
    shutil.rmtree(destination, ignore_errors=True)
    return git.format_patch(
        repo, f"{BASE_TAG}..HEAD", destination,
        "--zero-commit", "--no-signature", "--abbrev=12",
    )  # fmt: skip


def module_names(paths: list[str]) -> list[str]:
    """Importable module names of the Python files among `paths`."""
    names = []
    for path in paths:
        if path.endswith(".py"):
            name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            names.append(name)
    return names


def importable(modules: list[str], env: dict[str, str]) -> set[str]:
    """The modules among `modules` that import, each in its own process.

    Some modules cannot import on this machine even from pristine sources:
    ROCm- or CUDA-only ones raise, and on hosts without AVX-512 the bare
    `import vllm._C` of vllm/platforms/rocm.py dies with SIGILL. A crash
    counts as a failed import, and takes only its own process down.
    """
    found = set()
    for name in modules:
        result = subprocess.run(
            [sys.executable, "-c", IMPORT_ALL, name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if result.returncode == 0:
            found.add(name)
        elif result.returncode < 0:
            cause = signal.Signals(-result.returncode).name
            log(f"{name}: importing pristine sources dies with {cause} here")
    return found


def check_upstream(base: Base) -> None:
    """Apply the upstream series patch by patch; every step must import.

    After each patch, `import vllm` and every module the patch touched must
    import, and the fork's unit tests that exist from that patch on must pass.
    The final tree must equal the fork the series was exported from (a
    snapshot: the fork's own files may be edited while this runs).
    """
    with tempfile.TemporaryDirectory(prefix="fork-bisect-") as scratch:
        fork_tree = Path(scratch) / "fork"
        patches = _export(base, fork_tree, Path(scratch) / "series")
        repo = pristine_repository(base, Path(scratch) / "upstream")
        tree = repo.path
        env = {**os.environ, "PYTHONPATH": str(tree), "VLLM_PLUGINS": ""}
        # Modules that already fail to import on pristine sources here (e.g.
        # ROCm-only ones on a CPU machine) cannot be held to importing.
        touched_anywhere = sorted(
            {
                name
                for patch in patches
                for name in module_names(list(touched_paths(patch)))
                if upstream_has(base, name)
            }
        )
        log(f"probing {len(touched_anywhere)} modules on pristine sources")
        importable_upstream = importable(touched_anywhere, env)
        tests: list[str] = []
        subjects = {
            c["subject"]: c.get("tests", []) for c in CONFIG["upstream"]["commit"]
        }
        for patch in patches:
            if not git.am(repo, [patch]):
                raise SystemExit(f"{patch.name} does not apply (see above)")
            subject = repo.output("log", "-1", "--format=%s").strip()
            tests += subjects.get(subject, [])
            touched = repo.output("diff", "--name-only", "--diff-filter=AM", "HEAD~1")
            modules = ["vllm"] + [
                name
                for name in module_names(touched.split())
                if name in importable_upstream or not upstream_has(base, name)
            ]
            log(f"{patch.name}: importing {len(modules)} modules, tests: {tests}")
            subprocess.run(
                [sys.executable, "-c", IMPORT_ALL, *modules], check=True, env=env
            )
            if tests:
                pytest = [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "not engine",  # engine runs are the oracle's job
                ]
                subprocess.run([*pytest, *tests], check=True, env=env, cwd=REPO)
        ignored = ["-x", ".*", "-x", "__pycache__"]  # git, tool caches
        differences = subprocess.run(
            ["diff", "-r", "-q", *ignored, str(tree), str(fork_tree)],
            text=True,
            stdout=subprocess.PIPE,
        ).stdout
        if differences:
            raise SystemExit(
                f"the upstream series does not reproduce the fork:\n{differences}"
            )
    log(f"upstream series OK: {len(patches)} patches, each imports and passes tests")


def upstream_has(base: Base, module: str) -> bool:
    """Whether pristine `base` has the module (a package or a .py file)."""
    location = base.pristine / Path(*module.split("."))
    return location.is_dir() or location.with_suffix(".py").exists()
