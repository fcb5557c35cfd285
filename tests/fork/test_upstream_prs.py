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
    PR_TEXTS,
    Commit,
    PullRequest,
    cut_problems,
    export_upstream,
    fork_only,
    own_files,
    own_tree_files,
    pull_requests,
    read_pr_text,
    repository_files,
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
    for path in (
        "vllm/pkg/a.py",
        "vllm/pkg/b.py",
        "upstream/tests/test_x.py",
        f"{PR_TEXTS}/one.md",
        f"{PR_TEXTS}/gone.md",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    prs = [
        pr("one", ("2.patch", "1.patch"), ("vllm/pkg",)),
        pr("two", ("2.patch", "9.patch"), ("vllm/pkg/a.py", "vllm/missing.py")),
        pr("three", (), (f"{PR_TEXTS}/one.md",)),
    ]
    files = own_files(tmp_path)
    assert files == {"vllm/pkg/a.py", "vllm/pkg/b.py", "upstream/tests/test_x.py"}
    assert repository_files("upstream", tmp_path) == ["upstream/tests/test_x.py"]
    problems = cut_problems(prs, ["1.patch", "2.patch", "3.patch"], [], files, tmp_path)
    assert problems == [
        "2.patch is placed 2 times (PRs and fork_only)",
        "3.patch is placed 0 times (PRs and fork_only)",
        "9.patch is not in patches/series",
        "the PRs take the patches out of patches/series order",
        "two: vllm/missing.py does not exist",
        f"three: {PR_TEXTS}/one.md is a PR's text, not a file of vLLM's tree",
        "upstream/tests/test_x.py is added by 0 commits of [[upstream.pr]]",
        "vllm/pkg/a.py is added by 2 commits of [[upstream.pr]]",
        f"{PR_TEXTS}/gone.md is the text of no [[upstream.pr]]",
    ]


def test_pr_texts_give_the_sections_and_commit_messages(tmp_path: Path):
    config = {
        "upstream": {
            "pr": [
                {
                    "name": "one",
                    "title": "[Test] One",
                    "commit": [
                        {"subject": "[Test] Add a", "paths": ["upstream/a.py"]},
                        {"subject": "[Test] Add b", "paths": ["upstream/b.py"]},
                    ],
                    "fork_tests": ["tests/test_one.py"],
                },
                {"name": "two", "title": "[Test] Two", "patches": ["1.patch"]},
            ]
        }
    }
    texts = tmp_path / PR_TEXTS
    texts.mkdir(parents=True)
    (texts / "one.md").write_text(
        "## Purpose\n\nWhy,\n\n- in a list.\n\n## Test Plan\n\n- pytest\n\n"
        "## Commit messages\n\n### [Test] Add b\n\nB.\n\n"
        "### [Test] Add a\n\nA, and\n    code.\n"
    )
    (texts / "two.md").write_text("## Purpose\n\nP.\n\n## Test Plan\n\nT.\n")
    one, two = pull_requests(config, tmp_path)
    assert one == PullRequest(
        name="one",
        title="[Test] One",
        patches=(),
        commits=(
            Commit("[Test] Add a", "A, and\n    code.", ("upstream/a.py",)),
            Commit("[Test] Add b", "B.", ("upstream/b.py",)),
        ),
        purpose="Why,\n\n- in a list.",
        test_plan="- pytest",
        fork_tests=("tests/test_one.py",),
    )
    assert one.commits[0].message == "[Test] Add a\n\nA, and\n    code.\n"
    assert two == PullRequest("two", "[Test] Two", ("1.patch",), (), "P.", "T.")


@pytest.mark.parametrize(
    "text, error",
    [
        (None, "is missing"),
        ("Intro.\n## Purpose\n\nP.\n## Test Plan\n\nT.\n", "must hold the sections"),
        ("## Test Plan\n\nT.\n## Purpose\n\nP.\n", "must hold the sections"),
        ("## Purpose\n\nP.\n## Test Plan\n\n## Test Result\n\nR.\n", "must hold"),
        ("## Purpose\n\nP.\n## Test Plan\n\nT.\n", "no message for the commit"),
        (
            (
                "## Purpose\n\nP.\n## Test Plan\n\nT.\n## Commit messages\n\n"
                "### [Test] Add\n\nA.\n### [Test] Gone\n\nG.\n"
            ),
            "has the subject of \\['\\[Test\\] Gone'\\]",
        ),
        (
            (
                "## Purpose\n\nP.\n## Test Plan\n\nT.\n## Commit messages\n\n"
                "### [Test] Add\n\nA.\n### [Test] Add\n\nA.\n"
            ),
            "one non-empty `### <subject>` section per commit",
        ),
    ],
)
def test_a_malformed_pr_text_is_refused(tmp_path: Path, text: str | None, error: str):
    config = {
        "upstream": {
            "pr": [
                {
                    "name": "one",
                    "title": "[Test] One",
                    "commit": [{"subject": "[Test] Add", "paths": ["upstream/a.py"]}],
                }
            ]
        }
    }
    texts = tmp_path / PR_TEXTS
    texts.mkdir(parents=True)
    if text is not None:
        (texts / "one.md").write_text(text)
    with pytest.raises(SystemExit, match=error):
        pull_requests(config, tmp_path)


def test_every_pr_has_its_text_and_no_text_is_exported():
    texts = {path.name for path in (REPO / PR_TEXTS).iterdir()}
    assert texts == {f"{p.name}.md" for p in pull_requests()}
    assert not any(path.startswith(f"{PR_TEXTS}/") for path in own_files())
    assert read_pr_text(REPO / PR_TEXTS / "bitsandbytes-plugin.md")[0]["purpose"]


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
