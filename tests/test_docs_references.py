# SPDX-License-Identifier: Apache-2.0
"""The names the documentation gives point at things that exist.

README.md and docs/*.md name repository files (in backticks or links),
patches by number, test functions and plugin or core functions. Each must
resolve: a path exists (a `path.py::name` also defines `name`), a patch
number is in patches/series and the identifiers the sentence gives with it
appear in that patch, a `test_*` name is a test defined in tests/ or
upstream/tests, a `name()` is defined in this repository, the installed
vllm or bitsandbytes, and a `git checkout REF` names a commit this clone
has. No engine, no network.
"""

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Top-level directories and files of the repository whose paths docs name.
ROOTS = (
    "tests/", "upstream/", "vllm/", "tools/", "benchmarks/", "docs/",
    "patches/", "requirements/", ".ci/",
)  # fmt: skip
ROOT_FILES = {"README.md", "pyproject.toml"}
# Paths of build products and per-run output, which a clone has not made yet.
GENERATED = ("build/", "dist/", ".venv/")
PLACEHOLDER = re.compile(r"[*<>{}$ ]|\.\.\.|NNNN|XXXX")
BACKTICKED = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATCH_NUMBER = re.compile(r"\b(?:[Pp]atch(?:es)?|patches/)\s?(\d{4})\b")
IDENTIFIER = re.compile(r"`([A-Za-z_][\w.]*)(?:\([^`]*\))?`")
# Documentation still to be corrected by its owner; strict, so that the mark
# goes once the document is fixed.
PENDING = {}
# Upstream's files named by their package path that the installed CPU fork
# lacks: the CUDA wheel's own directory.
CUDA_ONLY = {"vllm/third_party/"}


def doc_params(check: str) -> list:
    """Every document; one whose correction is pending is expected to fail."""
    return [
        pytest.param(
            doc,
            id=doc.name,
            marks=[
                pytest.mark.xfail(
                    reason=f"fix pending: {PENDING[check, doc.name]}", strict=True
                )
            ]
            if (check, doc.name) in PENDING
            else [],
        )
        for doc in DOCS
    ]


def text_without_code_blocks(doc: Path) -> str:
    """The prose and tables; fenced blocks hold commands and output."""
    return re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)


def repository_paths(doc: Path) -> set[tuple[str, Path]]:
    """(as written, resolved) for every repository path a document names."""
    text = text_without_code_blocks(doc)
    found = set()
    for token in BACKTICKED.findall(text):
        token = token.strip()
        if token.startswith(GENERATED) or PLACEHOLDER.search(token.split("::")[0]):
            continue
        path = token.split("::")[0]
        if path in CUDA_ONLY:
            continue
        if path.startswith("vllm/") and not (REPO / path).exists():
            # Upstream's files, by their package path: in the installed fork.
            found.add((token, installed_vllm().parent / path))
        elif path.startswith(ROOTS) or path in ROOT_FILES:
            found.add((token, REPO / path))
    for target in LINK.findall(text):
        path = target.split("#")[0]
        if not path or "://" in path or path.startswith("mailto:"):
            continue
        found.add((target, (doc.parent / path).resolve()))
    return found


@cache
def installed_vllm() -> Path:
    import vllm

    return Path(vllm.__file__).parent


@cache
def series() -> dict[str, Path]:
    """Patch number -> patch file, for every patch of patches/series."""
    names = [
        line.split("#")[0].strip()
        for line in (REPO / "patches" / "series").read_text().splitlines()
    ]
    return {name[:4]: REPO / "patches" / name for name in names if name}


@cache
def defined_names() -> frozenset[str]:
    """Functions, classes and assigned names of the code docs may name."""
    import bitsandbytes

    import vllm

    roots = [
        REPO / "vllm", REPO / "tests", REPO / "upstream", REPO / "tools",
        REPO / "benchmarks", Path(vllm.__file__).parent,
        Path(bitsandbytes.__file__).parent,
    ]  # fmt: skip
    pattern = re.compile(
        r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)|^\s*(\w+)\s*(?::[^=\n]*)?=", re.M
    )
    names = set()
    for root in roots:
        for source in root.rglob("*.py"):
            code = source.read_text(errors="replace")
            for match in pattern.finditer(code):
                names.add(match.group(1) or match.group(2))
            if source.is_relative_to(REPO):
                # What this repository's code reads or writes by name: other
                # libraries' attributes, checkpoint tensor names, JSON keys.
                names.update(re.findall(r"\.([a-z]\w*)\b", code))
                names.update(re.findall(r"[\"']([a-z]\w*)[\"']", code))
    for config in REPO.glob("tools/*.toml"):
        names.update(re.findall(r"^(\w+)\s*=", config.read_text(), re.M))
    for patch in (REPO / "patches").glob("*.patch"):
        added = "\n".join(
            line[1:] for line in patch.read_text().splitlines() if line[:1] == "+"
        )
        names.update(re.findall(r"(?:def|class)\s+(\w+)", added))
        # Attributes a patch has core read, e.g. a parameter's `shard_indexer`.
        names.update(re.findall(r"getattr\(\w+, \"(\w+)\"", added))
    return frozenset(names)


@cache
def defined_tests() -> frozenset[str]:
    names = set()
    for root in (REPO / "tests", REPO / "upstream" / "tests"):
        for source in root.rglob("*.py"):
            names.update(re.findall(r"^\s*def (test_\w+)", source.read_text(), re.M))
    return frozenset(names)


@pytest.mark.parametrize("doc", doc_params("paths"))
def test_named_paths_exist(doc: Path) -> None:
    missing = []
    for written, path in sorted(repository_paths(doc)):
        if not path.exists():
            missing.append(written)
        elif "::" in written:
            function = written.split("::")[-1].split("[")[0]
            if not re.search(rf"^\s*def {function}\b", path.read_text(), re.M):
                missing.append(written)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


@pytest.mark.parametrize("doc", doc_params("patches"))
def test_named_patches_exist_and_hold_what_the_sentence_names(doc: Path) -> None:
    """`X` ... (patch 0004): patch 0004 must exist and mention X."""
    wrong = []
    text = text_without_code_blocks(doc)
    # A sentence, a list item or a table cell is the claim a number goes with.
    for clause in re.split(r"\n\s*[-|]|\||(?<=[.;])\s+", text):
        for number in PATCH_NUMBER.findall(clause):
            patch = series().get(number)
            if patch is None:
                wrong.append(f"patch {number} (not in patches/series)")
                continue
            identifiers = {
                name.split(".")[-1]
                for name in IDENTIFIER.findall(clause)
                if not name.startswith(ROOTS)
            }
            content = patch.read_text()
            if identifiers and not any(name in content for name in identifiers):
                wrong.append(f"patch {number} does not touch {sorted(identifiers)}")
    assert not wrong, f"{doc.name}: {wrong}"


@pytest.mark.parametrize("doc", doc_params("functions"))
def test_named_functions_are_defined(doc: Path) -> None:
    text = text_without_code_blocks(doc)
    tests = set(re.findall(r"`(?:[\w/.]+::)?(test_\w+)(?:\[[^`]*\])?`", text))
    calls = {
        name.split(".")[-1]
        for name in re.findall(r"`([A-Za-z_][\w.]*)\([^`]*\)`", text)
        # The standard library's and torch's own.
        if not name.startswith(("gc.", "torch.", "os.", "sys.", "Fraction"))
    }
    # Names of attributes, fields and tensors, such as `llm_int8_skip_modules`.
    snake_case = set(re.findall(r"`([a-z][a-z0-9]*_[a-z0-9_]+)`", text))
    missing = sorted(tests - defined_tests()) + sorted(
        (calls | snake_case) - defined_names()
    )
    assert not missing, f"{doc.name} names undefined functions: {missing}"


@pytest.mark.parametrize("doc", doc_params("git_refs"))
def test_named_git_refs_exist_in_a_clone(doc: Path) -> None:
    """`git checkout REF`: a clone fetches branches and their history.

    Only commands count (code blocks and code spans), and a path of this
    repository is a file being restored, not a ref.
    """
    text = doc.read_text()
    commands = re.findall(r"^```.*?^```", text, flags=re.M | re.S)
    commands += re.findall(r"`([^`\n]+)`", text_without_code_blocks(doc))
    refs = {
        ref
        for command in commands
        for ref in re.findall(r"git (?:checkout|worktree add \S+) ([\w./-]+)", command)
        if not (REPO / ref).exists()
    }
    missing = [
        ref
        for ref in sorted(refs)
        if subprocess.run(
            ["git", "-C", str(REPO), "merge-base", "--is-ancestor", ref, "HEAD"],
            capture_output=True,
        ).returncode
    ]
    assert not missing, f"{doc.name} names refs not in this branch: {missing}"
