# SPDX-License-Identifier: Apache-2.0
"""`pip wheel .`, `pip install .` and `pip install -e .` at the repository root
build the fork through the in-tree PEP 517 backend (tools/forklib/pep517.py).

The builds take about half a minute each: the base wheel is cached in
build/wheels/, the tree is materialized in a scratch directory.
"""

import email
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from forklib import pep517, wheel
from forklib.base import Base
from forklib.series import series, series_changes

REPO = Path(__file__).resolve().parents[2]
PINS = tomllib.loads((REPO / "tools" / "fork.toml").read_text())
# What the fork's CPU build must be called: "cpu" in the version is how vLLM
# detects its CPU build.
VERSION = f"{PINS['fork']['base_version']}+{PINS['fork']['local_version']}.cpu"
INFO = f"vllm-{VERSION}.dist-info"
PLUGIN = Path("vllm") / "plugins" / "bitsandbytes"
ENTRY_POINT = "bitsandbytes = vllm.plugins.bitsandbytes:register"
CPU = Base.load("cpu")


def cpu_build_env() -> dict[str, str]:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}


def test_pip_wheel_builds_the_fork(tmp_path: Path):
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "-q", "-w", str(tmp_path), str(REPO),
        ],
        check=True,
        env=cpu_build_env(),
    )  # fmt: skip

    (built,) = tmp_path.glob("*.whl")
    assert built.name.startswith(f"vllm-{VERSION}-")
    with zipfile.ZipFile(built) as archive:
        fields = email.message_from_bytes(archive.read(f"{INFO}/METADATA"))
        assert (fields["Name"], fields["Version"]) == ("vllm", VERSION)
        assert not any("torchvision" in r for r in fields.get_all("Requires-Dist"))
        assert ENTRY_POINT in archive.read(f"{INFO}/entry_points.txt").decode()
        assert (
            "_one_plugin_per_name" in archive.read("vllm/plugins/__init__.py").decode()
        )
        pristine = REPO / "build" / "pristine"
        for name, change in series_changes(series()).items():
            if change == "M":
                assert archive.read(name) != (pristine / name).read_bytes(), name
        plugin = {
            path.relative_to(REPO).as_posix(): path.read_bytes()
            for path in (REPO / PLUGIN).glob("*.py")
        }
        assert {name: archive.read(name) for name in plugin} == plugin


@pytest.fixture(scope="module")
def editable_install(tmp_path_factory: pytest.TempPathFactory):
    """The editable wheel of the backend, installed as pip would into a
    scratch `--target`."""
    scratch = tmp_path_factory.mktemp("editable")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_TARGET_DEVICE", "cpu")
        built = scratch / pep517.build_editable(str(scratch))
    site = scratch / "site"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
            "--target", str(site), str(built),
        ],
        check=True,
    )  # fmt: skip
    yield built, site
    shutil.rmtree(scratch)


def test_editable_wheel_holds_a_stub_for_the_plugin(editable_install):
    built, _ = editable_install

    with zipfile.ZipFile(built) as archive:
        names = archive.namelist()
        fields = email.message_from_bytes(archive.read(f"{INFO}/METADATA"))
        assert fields["Version"] == VERSION
        assert ENTRY_POINT in archive.read(f"{INFO}/entry_points.txt").decode()
        assert (
            "_one_plugin_per_name" in archive.read("vllm/plugins/__init__.py").decode()
        )
    assert [n for n in names if n.startswith(f"{PLUGIN.as_posix()}/")] == [
        f"{PLUGIN.as_posix()}/__init__.py"
    ]


def test_editable_install_imports_the_plugin_from_the_checkout(editable_install):
    _, site = editable_install
    probe = textwrap.dedent(
        """
        import json
        import vllm
        import vllm.plugins.bitsandbytes as plugin
        import vllm.plugins.bitsandbytes.config as config
        print(json.dumps([vllm.__file__, plugin.__file__, plugin.__path__,
                          config.__file__, plugin.register.__module__]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
    )

    core, package, path, config, module = json.loads(result.stdout.splitlines()[-1])
    assert Path(core) == site / "vllm" / "__init__.py"
    assert Path(package) == REPO / PLUGIN / "__init__.py"
    assert path == [str(REPO / PLUGIN)]
    assert Path(config) == REPO / PLUGIN / "config.py"
    assert module == "vllm.plugins.bitsandbytes"


def test_edits_to_the_checkout_are_live_through_the_stubs(tmp_path: Path):
    """The stubs of a checkout with a package, a module and a data file of its
    own, installed over a minimal `vllm`: edits and new files are seen by the
    next import without reinstalling."""
    pristine = tmp_path / "pristine"
    for package in ("vllm", "vllm/plugins"):
        (pristine / package).mkdir(parents=True)
        (pristine / package / "__init__.py").write_text("")
    checkout = tmp_path / "checkout"
    own = checkout / "vllm" / "plugins" / "toy"
    own.mkdir(parents=True)
    (own / "__init__.py").write_text("from .sub import VALUE\n")
    (own / "sub.py").write_text("VALUE = 1\n")
    (checkout / "vllm" / "plugins" / "solo.py").write_text("NAME = 'solo'\n")
    (checkout / "vllm" / "plugins" / "table.json").write_text("{}\n")

    stubs = wheel.editable_stubs(pristine, checkout)

    assert sorted(stubs) == ["vllm/plugins/solo.py", "vllm/plugins/toy/__init__.py"]
    site = tmp_path / "site"
    shutil.copytree(pristine, site)
    for name, text in stubs.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)

    def probe(code: str) -> str:
        return subprocess.run(
            [sys.executable, "-B", "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(site)},
        ).stdout.strip()

    assert probe("import vllm.plugins.toy as t; print(t.VALUE)") == "1"
    assert probe("import vllm.plugins.solo as s; print(s.NAME)") == "solo"
    (own / "sub.py").write_text("VALUE = 2\n")
    (own / "new.py").write_text("NEW = 'new'\n")
    (checkout / "vllm" / "plugins" / "solo.py").write_text("NAME = 'edited'\n")
    assert probe("import vllm.plugins.toy as t; print(t.VALUE)") == "2"
    assert probe("import vllm.plugins.toy.new as n; print(n.NEW)") == "new"
    assert probe("import vllm.plugins.solo as s; print(s.NAME)") == "edited"


def fake_nvidia_smi(directory: Path, output: str, status: int) -> Path:
    directory.mkdir()
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    script.chmod(0o755)
    return directory


@pytest.mark.parametrize(
    ("environment", "smi", "expected"),
    [
        ("cpu", None, "cpu"),
        ("CUDA", None, "cuda"),
        ("cuda", None, "cuda"),
        ("", None, "cpu"),
        ("", ("GPU 0: NVIDIA A100 (UUID: GPU-0)", 0), "cuda"),
        # A driver without a device, or a broken one: no GPU to run on.
        ("", ("No devices were found", 6), "cpu"),
        ("", ("NVIDIA-SMI has failed", 9), "cpu"),
    ],
)
def test_target_device(monkeypatch, tmp_path: Path, environment, smi, expected):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", environment)
    path = [fake_nvidia_smi(tmp_path / "bin", *smi)] if smi else []
    # Only the fake nvidia-smi, if any, is on PATH.
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, path)) or str(tmp_path))

    assert pep517.target_device() == expected


def test_an_unknown_target_device_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "rocm")

    with pytest.raises(SystemExit, match="VLLM_TARGET_DEVICE=rocm is not a target"):
        pep517.target_device()


def test_the_backend_asks_for_pip_only_to_download_the_base(tmp_path: Path):
    """In pip's isolated build environment (here: `python -S`, no
    site-packages) the backend imports with the standard library alone, and
    needs pip only while the base wheel is not in build/wheels/."""
    shutil.copytree(
        REPO / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__")
    )
    hook = (
        "import sys; sys.path.insert(0, 'tools'); from forklib import pep517; "
        "print(pep517.get_requires_for_build_wheel(), "
        "pep517.get_requires_for_build_editable())"
    )

    def requires(*flags: str) -> str:
        return subprocess.run(
            [sys.executable, *flags, "-c", hook],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=cpu_build_env(),
        ).stdout.strip()

    assert requires("-S") == "['pip'] ['pip']"
    assert requires() == "[] []"
    (tmp_path / "build" / "wheels").mkdir(parents=True)
    (tmp_path / "build" / "wheels" / CPU.filename).write_bytes(b"")
    assert requires("-S") == "[] []"
