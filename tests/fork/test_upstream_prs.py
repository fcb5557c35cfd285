# SPDX-License-Identifier: Apache-2.0
"""The PR-sized upstream series: the cut in tools/fork.toml places everything
once, and an export carries what a vLLM pull request needs."""

import re
import subprocess
from pathlib import Path

import pytest
from forklib.base import Base
from forklib.series import PATCHES, parse_series
from forklib.upstream import (
    Commit,
    PullRequest,
    cut_problems,
    export_upstream,
    fork_only,
    own_files,
    own_tree_files,
    pull_requests,
    submitter,
    tree_path,
    without_fork_headers,
)

# Whoever exports signs off; the tests export as this stand-in.
SUBMITTER = "Test Submitter <submitter@example.com>"
SERIES = parse_series((PATCHES / "series").read_text())
REPO = PATCHES.parent


def pr(name: str, patches: tuple[str, ...] = (), paths: tuple[str, ...] = ()):
    commits = (Commit("[Test] Add", "Why.", paths),) if paths else ()
    return PullRequest(name, f"[Test] {name}", patches, commits, "p", "t")


def test_the_cut_places_every_patch_and_file_exactly_once():
    assert cut_problems(pull_requests(), SERIES, fork_only(), own_files()) == []


def test_cut_problems_name_what_is_misplaced(tmp_path: Path):
    for path in ("vllm/pkg/a.py", "vllm/pkg/b.py", "upstream/tests/test_x.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    prs = [
        pr("one", ("2.patch", "1.patch"), ("vllm/pkg",)),
        pr("two", ("2.patch", "9.patch"), ("vllm/pkg/a.py", "vllm/missing.py")),
    ]
    files = own_files(tmp_path)
    assert files == {"vllm/pkg/a.py", "vllm/pkg/b.py", "upstream/tests/test_x.py"}
    problems = cut_problems(prs, ["1.patch", "2.patch", "3.patch"], [], files, tmp_path)
    assert problems == [
        "2.patch is placed 2 times (PRs and fork_only)",
        "3.patch is placed 0 times (PRs and fork_only)",
        "9.patch is not in patches/series",
        "the PRs take the patches out of patches/series order",
        "two: vllm/missing.py does not exist",
        "upstream/tests/test_x.py is added by 0 commits of [[upstream.pr]]",
        "vllm/pkg/a.py is added by 2 commits of [[upstream.pr]]",
    ]


def test_fork_headers_are_dropped_from_upstream_mails():
    mail = (
        "Subject: [PATCH] [Core] Do it\n\nWhy it matters.\n\n"
        "Forwarded: no\nOrigin: vllm-hooks fork; verified by\n tests/x.py\n"
        "---\n a.py | 1 +\n"
    )
    assert without_fork_headers(mail) == (
        "Subject: [PATCH] [Core] Do it\n\nWhy it matters.\n---\n a.py | 1 +\n"
    )
    # A closing paragraph that only mentions a field stays.
    kept = "Subject: [PATCH] [Core] Do it\n\nSee Origin: below.\n---\n"
    assert without_fork_headers(kept) == kept


def test_the_submitter_signs_off_never_the_tools(tmp_path, monkeypatch):
    """An explicit identity is used as given and a malformed one refused; with
    none, a repository without a git identity refuses to export."""
    assert submitter("Ada Lovelace <ada@example.com>") == (
        "Ada Lovelace <ada@example.com>"
    )
    with pytest.raises(SystemExit, match="must read 'Name <email>'"):
        submitter("ada@example.com")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    empty = tmp_path / "gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    with pytest.raises(SystemExit, match="signed off by their submitter"):
        submitter(None, repo)
    subprocess.run(["git", "-C", str(repo), "config", "user.name", "Ada"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "config", "user.email", "ada@example.com"], check=True
    )
    assert submitter(None, repo) == "Ada <ada@example.com>"


def test_upstream_directory_maps_to_vllms_tree():
    assert tree_path("upstream/tests/quantization/t.py") == "tests/quantization/t.py"
    assert tree_path("vllm/plugins/bitsandbytes") == "vllm/plugins/bitsandbytes"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("upstream-series")
    return out, export_upstream(Base.load("cpu"), out, SUBMITTER)


def test_one_directory_per_pr_in_order(exported):
    out, series = exported
    names = [f"{i:02d}-{p.name}" for i, p in enumerate(pull_requests(), start=1)]
    assert [s.directory.name for s in series] == names
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    rows = re.findall(r"^\| (\d\d-[\w-]+) \|", (out / "SUMMARY.md").read_text(), re.M)
    assert rows == names


def test_every_commit_is_signed_off_and_titled_like_vllm(exported):
    _, series = exported
    for s in series:
        assert re.fullmatch(r"(\[[A-Z][\w ]*\])+ \S.*", s.pr.title), s.pr.title
        for patch in s.patches:
            message = patch.read_text().partition("\n---\n")[0]
            assert re.search(r"^Subject: \[PATCH( \d+/\d+)?\] \[[A-Z]", message, re.M)
            trailer = f"Signed-off-by: {SUBMITTER}"
            assert message.rstrip().endswith(trailer), patch
            assert not re.search(r"^(Forwarded|Origin): ", message, re.M), patch


def test_pr_descriptions_have_vllms_template_sections(exported):
    _, series = exported
    for s in series:
        text = (s.directory / "PR.md").read_text()
        assert text.startswith(f"# {s.pr.title}\n")
        headings = re.findall(r"^## (.+)$", text, re.M)
        assert headings == ["Purpose", "Test Plan", "Test Result"]
        assert f"{s.size.commits} commits, {s.size.files} files" in text


def test_the_series_carry_all_patches_but_the_fork_only_ones(exported):
    """Exported names are renumbered per series; the rest is the subject's."""
    _, series = exported
    exported_names = {patch.name[5:] for s in series for patch in s.patches}
    for name in SERIES:
        assert (name[5:] in exported_names) != (name in fork_only()), name


def test_tests_and_docs_are_added_at_vllms_paths(exported):
    _, series = exported
    added = {
        line.removeprefix(" create mode 100644 ")
        for s in series
        for patch in s.patches
        for line in patch.read_text().splitlines()
        if line.startswith(" create mode 100644 ")
    }
    expected = {tree_path(path) for path in own_files()}
    assert added == expected


def test_the_series_add_the_forks_own_files_as_they_are(exported, tmp_path: Path):
    """The plugin and the tests and docs reach vLLM's tree byte for byte as
    this repository has them."""
    _, series = exported
    files = own_tree_files()
    includes = [f"--include={path}" for path in files]
    for patch in (patch for s in series for patch in s.patches):
        subprocess.run(
            ["git", "apply", *includes, str(patch)], cwd=tmp_path, check=True
        )
    for target, source in files.items():
        assert (tmp_path / target).read_bytes() == (REPO / source).read_bytes(), target
