# SPDX-License-Identifier: Apache-2.0
"""The fork as PR-sized `git am`-able series against pristine sources, and
the check that each applies after the ones before it, imports at every
commit and passes its tests.

The cut lives in tools/fork.toml (`[[upstream.pr]]`): each PR takes patches
of patches/ and then commits adding files of this repository as they are,
`vllm/...` at the same path and `upstream/<path>` (tests and docs written
for vLLM's tree) at `<path>`. A PR's text is upstream/pull-requests/<name>.md
(`PR_TEXTS`), the one directory of upstream/ that is not vLLM's tree: its
`## Purpose` and `## Test Plan` become PR.md's sections, and each
`### <subject>` under `## Commit messages` the body of the commit with that
subject.
"""

from __future__ import annotations

import filecmp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from . import git, lint
from . import target as targets
from .base import CONFIG, REPO, Base, log
from .series import (
    BINARY_SUFFIXES,
    OVERLAY,
    PATCH_CONTEXT_LINES,
    PATCHES,
    materialize,
    parse_series,
    pristine_repository,
    series_changes,
    touched_paths,
)
from .series import series as fork_series
from .target import Target

IMPORT_ALL = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
# Files of this repository kept at vLLM's paths below this directory.
UPSTREAM_ROOT = "upstream"
# The PRs' texts, one <name>.md per [[upstream.pr]]: below UPSTREAM_ROOT but
# never a file of vLLM's tree, so no commit may add them.
PR_TEXTS = f"{UPSTREAM_ROOT}/pull-requests"
# The sections of a PR's text that become PR.md's (the PullRequest fields),
# and the one holding the commit messages, a `### <subject>` section each.
PR_SECTIONS = {"Purpose": "purpose", "Test Plan": "test_plan"}
COMMIT_MESSAGES = "Commit messages"
PR_DESCRIPTION = "PR.md"
SUMMARY = "SUMMARY.md"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
# The DEP-3 fields that close a patch message of patches/: where the patch
# stands and what verifies it in this repository, which upstream has no use for.
FORK_HEADER_FIELDS = (
    "Forwarded:", "Origin:", "Bug:", "Applied-Upstream:", "Last-Update:",
)  # fmt: skip
# Why an exported test cannot run on a target here: a release published only
# for CUDA finds no device on a machine without one (vLLM resolves
# UnspecifiedPlatform, whose device type is ""), so VllmConfig() fails in
# DeviceConfig(device="auto") with the first message, and
# EngineArgs.create_engine_config() with the second (torch.device("")),
# before any code of the series runs. Its CpuPlatform is no way out: from
# 0.34 it refuses x86 without triton-cpu, which PyPI does not publish.
# Failures that say anything else fail the check.
NO_DEVICE = ("Failed to infer device type", "Device string must not be empty")


@dataclass(frozen=True)
class Commit:
    """A commit adding files of this repository to the series."""

    subject: str
    body: str
    paths: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"{self.subject}\n\n{self.body.strip()}\n"


@dataclass(frozen=True)
class PullRequest:
    """One `[[upstream.pr]]` of tools/fork.toml."""

    name: str
    title: str
    patches: tuple[str, ...]
    commits: tuple[Commit, ...]
    purpose: str
    test_plan: str
    fork_tests: tuple[str, ...] = ()

    @property
    def tests(self) -> list[str]:
        """The test files the PR adds, at their path in vLLM's tree."""
        return [
            target
            for commit in self.commits
            for path in commit.paths
            for target in [tree_path(path)]
            if target.startswith("tests/") and Path(target).name.startswith("test_")
        ]


@dataclass
class Size:
    commits: int = 0
    files: int = 0
    added: int = 0
    removed: int = 0


@dataclass
class Series:
    """A PR's exported series and what the export measured of it."""

    pr: PullRequest
    directory: Path
    patches: list[Path]
    size: Size
    # The vLLM release the series applies to.
    version: str = CONFIG["fork"]["base_version"]
    # What check-upstream measured, one line each, for the Test Result section.
    results: list[str] = field(default_factory=list)


def pull_requests(
    config: dict[str, Any] = CONFIG, root: Path = REPO
) -> list[PullRequest]:
    """The `[[upstream.pr]]` entries, with their texts from `PR_TEXTS`."""
    prs = []
    for pr in config["upstream"]["pr"]:
        location = f"{PR_TEXTS}/{pr['name']}.md"
        sections, messages = read_pr_text(root / location)
        commits = []
        for entry in pr.get("commit", []):
            body = messages.pop(entry["subject"], None)
            if body is None:
                raise SystemExit(
                    f"{location} has no message for the commit "
                    f"{entry['subject']!r} (a `### <subject>` section under "
                    f"`## {COMMIT_MESSAGES}`)"
                )
            commits.append(Commit(entry["subject"], body, tuple(entry["paths"])))
        if messages:
            raise SystemExit(
                f"{location}: no commit of [[upstream.pr]] {pr['name']!r} has "
                f"the subject of {sorted(messages)}"
            )
        prs.append(
            PullRequest(
                name=pr["name"],
                title=pr["title"],
                patches=tuple(pr.get("patches", [])),
                commits=tuple(commits),
                fork_tests=tuple(pr.get("fork_tests", [])),
                **sections,
            )
        )
    return prs


def _sections(text: str, level: str) -> tuple[str, list[tuple[str, str]]]:
    """The text before the first heading of `level` ("##"), and each such
    heading with its text, stripped."""
    head, *rest = re.split(rf"^{level} (.+)\n", text, flags=re.M)
    pairs = zip(rest[::2], rest[1::2], strict=True)
    return head.strip(), [(heading.strip(), body.strip()) for heading, body in pairs]


def read_pr_text(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A PR's text: its PR.md sections by `PullRequest` field, and its commit
    messages' bodies by subject."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: every [[upstream.pr]] has its text")
    head, found = _sections(path.read_text(), "##")
    headings = [heading for heading, _ in found]
    expected = [*PR_SECTIONS, COMMIT_MESSAGES]
    if (
        head
        or headings not in (expected, expected[:-1])
        or not all(body for _, body in found)
    ):
        raise SystemExit(
            f"{path} must hold the sections {', '.join(f'## {h}' for h in expected)} "
            f"(the last only for a PR with commits), in this order, none empty, "
            f"and nothing before them; it has {headings}"
        )
    texts = dict(found)
    sections = {field: texts[heading] for heading, field in PR_SECTIONS.items()}
    head, commits = _sections(texts.get(COMMIT_MESSAGES, ""), "###")
    messages = dict(commits)
    if head or len(messages) != len(commits) or not all(messages.values()):
        raise SystemExit(
            f"{path}: `## {COMMIT_MESSAGES}` must hold one non-empty "
            "`### <subject>` section per commit and nothing else"
        )
    return sections, messages


def fork_only(config: dict[str, Any] = CONFIG) -> list[str]:
    """Patches of patches/series that stay out of the upstream series."""
    return list(config["upstream"].get("fork_only", []))


def submitter(sign_off: str | None, repository: Path = REPO) -> str:
    """Who signs off the exported commits: `sign_off` ('Name <email>'), else
    `repository`'s git identity. The sign-off certifies the DCO for the
    person who submits the PRs, so the tools never make one up."""
    if sign_off is None:
        name, email = (
            subprocess.run(
                ["git", "-C", str(repository), "config", key],
                capture_output=True,
                text=True,
            ).stdout.strip()
            for key in ("user.name", "user.email")
        )
        if not name or not email:
            raise SystemExit(
                "The upstream series are signed off by their submitter: pass "
                "--sign-off 'Name <email>' or set git config user.name and "
                "user.email."
            )
        sign_off = f"{name} <{email}>"
    name, email = parseaddr(sign_off)
    if not name or "@" not in email:
        raise SystemExit(f"--sign-off must read 'Name <email>', not {sign_off!r}.")
    return f"{name} <{email}>"


def signer(sign_off: str) -> tuple[str, ...]:
    """git settings committing and signing off as `sign_off`."""
    name, email = parseaddr(sign_off)
    return (f"user.name={name}", f"user.email={email}", "commit.gpgsign=false")


def tree_path(path: str) -> str:
    """Where a file of this repository goes in vLLM's tree."""
    prefix = f"{UPSTREAM_ROOT}/"
    return path.removeprefix(prefix) if path.startswith(prefix) else path


def is_pr_text(path: str) -> bool:
    """Whether `path` of this repository is `PR_TEXTS` or below it."""
    return f"{path}/".startswith(f"{PR_TEXTS}/")


def repository_files(path: str, root: Path = REPO) -> list[str]:
    """The files a `paths` entry names: the file, or all under the directory;
    never the PRs' texts."""
    location = root / path
    if not location.is_dir():
        return [path] if location.exists() and not is_pr_text(path) else []
    return sorted(
        relative
        for found in location.rglob("*")
        if found.is_file()
        and "__pycache__" not in found.parts
        and not found.name.endswith(BINARY_SUFFIXES)
        for relative in [str(found.relative_to(root))]
        if not is_pr_text(relative)
    )


def own_files(root: Path = REPO) -> set[str]:
    """Every file the cut must place: under vllm/ and under upstream/, but
    the PRs' texts."""
    return {
        found
        for directory in (OVERLAY.name, UPSTREAM_ROOT)
        for found in repository_files(directory, root)
    }


def own_tree_files() -> dict[str, str]:
    """The fork's own files: tree path to path in this repository."""
    return {tree_path(path): path for path in sorted(own_files())}


def cut_problems(
    prs: list[PullRequest],
    patches: list[str],
    kept_out: list[str],
    files: set[str],
    root: Path = REPO,
) -> list[str]:
    """Why the cut does not place every patch and every file exactly once, or
    a PR's text is not where it belongs."""
    problems = []
    placed = [name for pr in prs for name in pr.patches] + kept_out
    for name in sorted(set(placed) | set(patches)):
        count = placed.count(name)
        if name not in patches:
            problems.append(f"{name} is not in patches/series")
        elif count != 1:
            problems.append(f"{name} is placed {count} times (PRs and fork_only)")
    in_prs = [name for name in placed if name in patches and name not in kept_out]
    if in_prs != [name for name in patches if name in in_prs]:
        problems.append("the PRs take the patches out of patches/series order")
    assigned: list[str] = []
    for pr in prs:
        for commit in pr.commits:
            for path in commit.paths:
                found = repository_files(path, root)
                if is_pr_text(path):
                    problems.append(
                        f"{pr.name}: {path} is a PR's text, not a file of vLLM's tree"
                    )
                elif not found:
                    problems.append(f"{pr.name}: {path} does not exist")
                assigned += found
    for path in sorted(files | set(assigned)):
        count = assigned.count(path)
        if count != 1:
            problems.append(f"{path} is added by {count} commits of [[upstream.pr]]")
    texts = {f"{pr.name}.md" for pr in prs}
    for found in sorted((root / PR_TEXTS).glob("*")):
        if found.name not in texts:
            problems.append(
                f"{PR_TEXTS}/{found.name} is the text of no [[upstream.pr]]"
            )
    return problems


def without_fork_headers(patch: str) -> str:
    """A `git format-patch` mail without its closing DEP-3 paragraph."""
    message, separator, diff = patch.partition("\n---\n")
    body, _, last = message.rstrip("\n").rpartition("\n\n")
    lines = last.splitlines()
    if (
        lines
        and all(
            line.startswith(FORK_HEADER_FIELDS) or line.startswith(" ")
            for line in lines
        )
        and lines[0].startswith(FORK_HEADER_FIELDS)
    ):
        message = body
    return message + separator + diff


@dataclass(frozen=True)
class Release:
    """What the upstream series are made for: the base, whose patches are
    patches/, or a target, whose patches are the series replayed onto it."""

    pinned: Base | Target
    # The series' patches on this release, by their name in patches/series.
    patches: dict[str, Path]
    # A target: the series replayed onto it (the fork on it), and a directory
    # holding only its metadata, so that vLLM knows its own version.
    fork: Path | None = None
    metadata: Path | None = None

    @property
    def version(self) -> str:
        return self.pinned.version

    @property
    def pristine(self) -> Path:
        return self.pinned.pristine


def release(base: Base, target: Target | None, scratch: Path) -> Release:
    """The base, or `target` with the series replayed onto it in `scratch`
    with its stored resolutions (patches/targets/<version>/)."""
    names = parse_series((PATCHES / "series").read_text())
    if target is None:
        return Release(base, {name: PATCHES / name for name in names})
    tree = scratch / f"fork-{target.version}"
    replayed = targets.materialize(target, tree)
    if replayed.stopped_at is not None or replayed.unused:
        problem = (
            f"{replayed.stopped_at} stops it ({replayed.reason}: "
            f"{', '.join(replayed.conflicts)})"
            if replayed.stopped_at
            else f"{', '.join(replayed.unused)} are resolutions of no patch"
        )
        raise SystemExit(
            f"the series does not replay onto vLLM {target.version} with "
            f"{targets.shown(target.resolutions)}: {problem}. Run `tools/fork.py "
            f"rebase --to-version {target.version}` and resolve (docs/developing.md)."
        )
    patches = targets.format_series(tree, scratch / "target-patches", names)
    metadata = targets.copy_dist_info(target, scratch / "metadata")
    return Release(target, patches, tree, metadata)


def export_upstream(
    base: Base, destination: Path, sign_off: str, target: Target | None = None
) -> list[Series]:
    """Write every PR's series into `destination`/NN-name/, with PR.md, each
    commit signed off by `sign_off` (see `submitter`): against the base, or
    against `target`."""
    with tempfile.TemporaryDirectory(prefix="fork-upstream-") as scratch:
        made_for = release(base, target, Path(scratch))
        exported = _export(made_for, Path(scratch) / "tree", destination, sign_off)
    write_descriptions(exported, destination)
    return exported


def _export(
    made_for: Release, tree: Path, destination: Path, sign_off: str
) -> list[Series]:
    """`export_upstream` built in `tree`, which is left holding the result of
    all series: the snapshot the patches were made from (the fork's own files
    may be edited while a check runs)."""
    prs = pull_requests()
    names = parse_series((PATCHES / "series").read_text())
    problems = cut_problems(prs, names, fork_only(), own_files())
    if problems:
        raise SystemExit(
            "[[upstream.pr]] in tools/fork.toml does not cut the fork cleanly:\n"
            + "\n".join(problems)
        )
    pristine_repository(made_for.pinned, tree)
    repo = git.Repo(tree, signer(sign_off))
    shutil.rmtree(destination, ignore_errors=True)
    exported = []
    for index, pr in enumerate(prs, start=1):
        start = repo.output("rev-parse", "HEAD").strip()
        mails = []
        for name in pr.patches:
            mails.append(tree.parent / "mails" / name)
            mails[-1].parent.mkdir(exist_ok=True)
            mails[-1].write_text(
                without_fork_headers(made_for.patches[name].read_text())
            )
        if mails and not git.am(repo, mails):
            raise SystemExit(f"{pr.name}: its patches do not apply (see above)")
        for commit in pr.commits:
            for path in commit.paths:
                for found in repository_files(path):
                    target = tree / tree_path(found)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / found, target)
                repo.run("add", tree_path(path))
            repo.run("commit", "-q", "-m", commit.message)
        revisions = f"{start}..HEAD"
        numstat = git.numstat(repo, revisions)
        patches = git.format_patch(
            repo, revisions, destination / f"{index:02d}-{pr.name}",
            "--zero-commit", "--no-signature", "--abbrev=12", "--signoff",
            f"--unified={PATCH_CONTEXT_LINES}",
        )  # fmt: skip
        size = Size(
            commits=len(patches),
            files=len(numstat),
            added=sum(added for added, _, _ in numstat),
            removed=sum(removed for _, removed, _ in numstat),
        )
        exported.append(Series(pr, patches[0].parent, patches, size, made_for.version))
    return exported


def describe(series: Series, before: list[Series]) -> str:
    """PR.md: the title and vLLM's PR template sections."""
    applies = (
        f"after {', '.join(s.directory.name for s in before)}" if before else "alone"
    )
    size = series.size
    if series.results:
        result = "\n".join(f"- {line}" for line in series.results)
    else:
        result = (
            "Not measured by `tools/fork.py export-upstream`; "
            "`tools/fork.py check-upstream` writes this series again with the "
            "results of its run."
        )
    return (
        f"# {series.pr.title}\n\n"
        f"Series `{series.directory.name}`: {size.commits} commits, {size.files} "
        f"files, +{size.added}/-{size.removed} lines; applies with `git am` to "
        f"vLLM {series.version} {applies}.\n\n"
        f"## Purpose\n\n{series.pr.purpose}\n\n"
        f"## Test Plan\n\n{series.pr.test_plan}\n\n"
        f"## Test Result\n\n{result}\n"
    )


def summary(exported: list[Series]) -> str:
    """A table of the series' sizes (from `git diff --numstat`)."""
    rows = [
        f"| {s.directory.name} | {s.pr.title} | {s.size.commits} | {s.size.files} "
        f"| +{s.size.added} | -{s.size.removed} |"
        for s in exported
    ]
    kept_out = ", ".join(f"`{name}`" for name in fork_only()) or "none"
    return (
        "| series | title | commits | files | added | removed |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(f"{row}\n" for row in rows)
        + f"\nFork-only patches, not exported: {kept_out}.\n"
    )


def write_descriptions(exported: list[Series], destination: Path) -> None:
    for index, series in enumerate(exported):
        text = describe(series, exported[:index])
        (series.directory / PR_DESCRIPTION).write_text(text)
    (destination / SUMMARY).write_text(summary(exported))


def module_names(paths: list[str]) -> list[str]:
    """Importable module names of the Python files of vllm/ among `paths`."""
    names = []
    for path in paths:
        if path.startswith("vllm/") and path.endswith(".py"):
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


def run_pytest(tests: list[str], env: dict[str, str], cwd: Path, *options: str) -> str:
    """Run pytest; its summary line and wall time, e.g. "12 passed in 3.1 s"."""
    started = time.perf_counter()
    result = subprocess.run(
        [*PYTEST, *options, *tests],
        env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"pytest {' '.join(tests)} failed:\n{result.stdout[-6000:]}")
    lines = result.stdout.strip().splitlines()
    outcome = lines[-1].strip("= ") if lines else "no output"
    return f"{outcome} ({time.perf_counter() - started:.0f} s wall)"


def check_upstream(
    base: Base, destination: Path, sign_off: str, target: Target | None = None
) -> list[Series]:
    """Apply every series to pristine sources commit by commit, and test it.

    After each commit, `import vllm` and every module of vllm/ it touched must
    import. After each series, the Python files it touches must compile, its
    exported tests (PYTHONPATH: the tree) and its `fork_tests` must pass and
    the files it touches must pass upstream's lint. The final tree must equal
    the export's snapshot, and with the fork-only patches applied on top, the
    fork. The series are written to `destination` with the measured results in
    their PR.md.

    Against a `target`, the series are those replayed onto it with its stored
    resolutions, which must be exactly what the replay needs; `fork_tests`
    (this repository's, for the base) are not run, and an exported test may
    fail only for want of a device (`NO_DEVICE`), which the results count.
    """
    with tempfile.TemporaryDirectory(prefix="fork-bisect-") as scratch:
        made_for = release(base, target, Path(scratch))
        if target is not None:
            _same_resolutions(target, made_for, Path(scratch) / "resolutions")
        pinned = made_for.pinned
        snapshot = Path(scratch) / "export"
        exported = _export(made_for, snapshot, destination, sign_off)
        pristine_repository(pinned, Path(scratch) / "upstream")
        repo = git.Repo(Path(scratch) / "upstream", signer(sign_off))
        tree = repo.path
        path = [str(tree)] + ([str(made_for.metadata)] if made_for.metadata else [])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "VLLM_PLUGINS": "",
            "HF_HUB_OFFLINE": "1",
        }
        # Modules that already fail to import on pristine sources here (e.g.
        # ROCm-only ones on a CPU machine) cannot be held to importing.
        touched_anywhere = sorted(
            {
                name
                for series in exported
                for patch in series.patches
                for name in module_names(list(touched_paths(patch)))
                if upstream_has(pinned, name)
            }
        )
        log(f"probing {len(touched_anywhere)} modules on pristine sources")
        importable_upstream = importable(touched_anywhere, env)
        environment = (
            f"Python {platform.python_version()}, {platform.machine()} CPU "
            f"({os.cpu_count()} cores), {pinned.filename}"
        )
        for series in exported:
            start = repo.output("rev-parse", "HEAD").strip()
            imported = 0
            for patch in series.patches:
                if not git.am(repo, [patch]):
                    raise SystemExit(f"{patch} does not apply (see above)")
                touched = repo.output(
                    "diff", "--name-only", "--diff-filter=AM", "HEAD~1"
                )
                modules = ["vllm"] + [
                    name
                    for name in module_names(touched.split())
                    if name in importable_upstream or not upstream_has(pinned, name)
                ]
                log(f"{series.directory.name}/{patch.name}: {len(modules)} modules")
                subprocess.run(
                    [sys.executable, "-c", IMPORT_ALL, *modules], check=True, env=env
                )
                imported += len(modules)
            compiled = _compile_series(repo, f"{start}..HEAD")
            series.results += [
                (
                    f"Environment: {environment}; measured by `tools/fork.py "
                    f"check-upstream` on {time.strftime('%Y-%m-%d')}."
                ),
                (
                    f"`git am` onto vLLM {made_for.version} after the previous series: "
                    f"{len(series.patches)} of {len(series.patches)} commits apply; "
                    f"after each, `import vllm` and the modules it touches import "
                    f"({imported} imports in all); the {compiled} Python files the "
                    "series touches compile."
                ),
            ]
            if series.pr.tests:
                if target is None:
                    outcome = run_pytest(series.pr.tests, env, tree)
                else:
                    outcome = run_pytest_without_device(series.pr.tests, env, tree)
                log(f"{series.directory.name}: {outcome}")
                series.results.append(
                    f"`pytest {' '.join(series.pr.tests)}` on the tree after this "
                    f"series: {outcome}."
                )
            if series.pr.fork_tests and target is None:
                # Engine runs are the oracle's job, not a per-series check's.
                # The series added the plugin, so its entry point may load.
                outcome = run_pytest(
                    list(series.pr.fork_tests),
                    {**env, "VLLM_PLUGINS": "bitsandbytes"},
                    REPO,
                    "-m",
                    "not engine",
                )
                log(f"{series.directory.name}: fork tests {outcome}")
                series.results.append(
                    f"This repository's `pytest -m 'not engine' "
                    f"{' '.join(series.pr.fork_tests)}` on that tree: {outcome}."
                )
            elif series.pr.fork_tests:
                series.results.append(
                    f"This repository's tests of the PR ({len(series.pr.fork_tests)} "
                    f"files) are written for the fork's base, vLLM "
                    f"{base.version}, and run there, not on {made_for.version}."
                )
            series.results.append(_lint_series(pinned, repo, f"{start}..HEAD"))
        _compare(tree, snapshot, "the upstream series do not reproduce their export")
        if fork_only():
            mails = [made_for.patches[name] for name in fork_only()]
            if not git.am(repo, mails):
                raise SystemExit("the fork-only patches do not apply after the series")
            fork = made_for.fork or materialize(base, Path(scratch) / "fork")
            _same_as_fork(tree, fork)
    write_descriptions(exported, destination)
    log(
        f"upstream series OK: {len(exported)} series, "
        f"{sum(len(s.patches) for s in exported)} commits on vLLM "
        f"{made_for.version}, each imports and the series pass their tests; "
        f"written to {destination}"
    )
    return exported


def _same_resolutions(target: Target, made_for: Release, scratch: Path) -> None:
    """The target's stored resolutions are what its replay needs, byte for byte."""
    assert made_for.fork is not None
    targets.export(made_for.fork, scratch)
    stored = target.resolutions
    names = sorted(
        {p.name for p in scratch.glob("*")} | {p.name for p in stored.glob("*")}
    )
    differing = [
        name
        for name in names
        if not (scratch / name).exists()
        or not (stored / name).exists()
        or not filecmp.cmp(scratch / name, stored / name, shallow=False)
    ]
    if differing:
        raise SystemExit(
            f"{targets.shown(stored)} is not what the replay produces: "
            f"{differing}; run `tools/fork.py export --upstream-version "
            f"{target.version}` on the replayed tree (docs/developing.md)."
        )
    log(f"{len(names)} resolutions of {targets.shown(stored)} re-export identically")


def _compile_series(repo: git.Repo, revisions: str) -> int:
    """Compile every Python file `revisions` adds or changes; how many."""
    changes = git.changes(repo, revisions)
    files = lint.python_files([p for p, kind in changes.items() if kind != "D"])
    for path in files:
        source = (repo.path / path).read_text()
        try:
            compile(source, path, "exec", dont_inherit=True)
        except SyntaxError as error:
            raise SystemExit(f"{path} does not compile: {error}") from None
    return len(files)


def run_pytest_without_device(tests: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run pytest where no device exists: every failure must be for want of
    one (`NO_DEVICE`); the summary says how many passed and how many could
    not run."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fork-pytest-") as scratch:
        report = Path(scratch) / "junit.xml"
        result = subprocess.run(
            [*PYTEST, f"--junitxml={report}", "-o", "junit_logging=all", *tests],
            env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not report.exists():
            raise SystemExit(f"pytest {' '.join(tests)} did not run:\n{result.stdout}")
        cases = list(ElementTree.parse(report).iter("testcase"))
    passed, no_device, failed = 0, [], []
    for case in cases:
        problems = [case.find(kind) for kind in ("failure", "error")]
        problems = [problem for problem in problems if problem is not None]
        if not problems:
            passed += case.find("skipped") is None
            continue
        text = " ".join(
            (element.get("message") or "") + (element.text or "")
            for element in [
                *problems,
                *case.iter("system-err"),
                *case.iter("system-out"),
            ]
        )
        name = f"{case.get('classname')}::{case.get('name')}"
        (no_device if any(m in text for m in NO_DEVICE) else failed).append(name)
    if failed or result.returncode not in (0, 1):
        raise SystemExit(
            f"pytest {' '.join(tests)} failed ({', '.join(failed)}):\n"
            f"{result.stdout[-6000:]}"
        )
    outcome = f"{passed} passed"
    if no_device:
        outcome += (
            f"; {len(no_device)} cannot run without a device (they build a "
            "VllmConfig, which a machine without CUDA cannot for this release)"
        )
    return f"{outcome} ({time.perf_counter() - started:.0f} s wall)"


def _lint_series(base: Base | Target, repo: git.Repo, revisions: str) -> str:
    """Upstream's lint on the Python files a series touches, as a result line."""
    changes = git.changes(repo, revisions)
    # A file upstream lacks is held to being clean, even if a series edits it.
    upstream_files = [p for p in changes if (base.pristine / p).exists()]
    patched = lint.python_files([p for p in upstream_files if changes[p] == "M"])
    added = lint.python_files(
        [p for p, kind in changes.items() if kind != "D" and p not in patched]
    )
    problems = lint.new_violations(repo.path, base.pristine, patched, added)
    if problems:
        raise SystemExit("ruff with vLLM's settings rejects:\n" + "\n".join(problems))
    return (
        f"`ruff check` and `ruff format --check` with vLLM's settings "
        f"(tools/ruff-vllm.toml): the {len(added)} Python files upstream lacks "
        f"are clean, the {len(patched)} patched ones have no new violations."
    )


def _same_as_fork(tree: Path, fork: Path) -> None:
    """Every file patches/ changes is in `tree` as in the fork's tree `fork`.

    The fork's own files are compared with the export's snapshot instead:
    they may be edited while the check runs.
    """
    differing = [
        path
        for path, change in series_changes(fork_series()).items()
        if (tree / path).exists() != (change != "D")
        or (change != "D" and not filecmp.cmp(tree / path, fork / path, shallow=False))
    ]
    if differing:
        raise SystemExit(
            f"the series and the fork-only patches differ from the fork: {differing}"
        )


def _compare(tree: Path, expected: Path, failure: str) -> None:
    ignored = ["-x", ".*", "-x", "__pycache__"]  # git, tool caches
    differences = subprocess.run(
        ["diff", "-r", "-q", *ignored, str(tree), str(expected)],
        text=True,
        stdout=subprocess.PIPE,
    ).stdout
    if differences:
        raise SystemExit(f"{failure}:\n{differences}")


def upstream_has(base: Base | Target, module: str) -> bool:
    """Whether pristine `base` has the module (a package or a .py file)."""
    location = base.pristine / Path(*module.split("."))
    return location.is_dir() or location.with_suffix(".py").exists()
