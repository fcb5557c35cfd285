# SPDX-License-Identifier: Apache-2.0
"""The PEP 517 build backend of this repository, behind `pip install .`,
`pip wheel .` and `pip install -e .`.

pyproject.toml names it with `backend-path = ["tools"]`: it runs from the
checkout being built and needs only the standard library and git. A build
fetches and verifies the pinned base wheel (cached in build/wheels/),
materializes the fork into a scratch tree and packs it, as `tools/fork.py
materialize` and `build` do. The scratch tree is never build/tree: that is
the developer's work tree, and materializing it would drop commits not yet
exported to patches/.

The flavor is `VLLM_TARGET_DEVICE` (`cpu` or `cuda`), as in upstream's build.
Unset, it is `cuda` where `nvidia-smi -L` lists a GPU and `cpu` elsewhere: a
CUDA toolkit without a GPU (a machine with only `nvcc`) builds for the CPU.

The editable wheel is the normal one except that the fork's own modules
(vllm/plugins/bitsandbytes) are stubs that load them from the checkout, so
edits there are live. The patched upstream files are copies: a change to
patches/ or tools/fork.toml needs another `pip install -e .`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import series, wheel
from .base import CONFIG, REPO, Base, fetch, log

# nvidia-smi can hang on a broken driver; a build should not.
NVIDIA_SMI_TIMEOUT_S = 60


def has_nvidia_gpu() -> bool:
    """`nvidia-smi -L` runs and lists a GPU: a driver with a device."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def target_device() -> str:
    """The flavor to build: `VLLM_TARGET_DEVICE`, or detected when unset."""
    device = os.environ.get("VLLM_TARGET_DEVICE", "").lower()
    if not device:
        device = "cuda" if has_nvidia_gpu() else "cpu"
        log(f"VLLM_TARGET_DEVICE is not set; building for {device}")
    elif device not in CONFIG["base"]:
        raise SystemExit(
            f"VLLM_TARGET_DEVICE={device} is not a target this fork builds; "
            f"set it to one of {', '.join(sorted(CONFIG['base']))}."
        )
    return device


def _requires() -> list[str]:
    """pip, if the base wheel must be downloaded and the build environment
    lacks it (pip's isolated build environments do)."""
    base = Base.load(target_device())
    if base.path.exists() or importlib.util.find_spec("pip") is not None:
        return []
    return ["pip"]


def _build(wheel_directory: str, editable: Path | None) -> str:
    base = Base.load(target_device())
    fetch(base)
    with tempfile.TemporaryDirectory(prefix="vllm-fork-build-") as scratch:
        tree = series.materialize(base, Path(scratch) / "tree")
        built = wheel.build(base, tree, Path(wheel_directory), editable)
    return built.name


def get_requires_for_build_wheel(
    config_settings: dict[str, Any] | None = None,
) -> list[str]:
    return _requires()


def get_requires_for_build_editable(
    config_settings: dict[str, Any] | None = None,
) -> list[str]:
    return _requires()


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    return _build(wheel_directory, editable=None)


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    return _build(wheel_directory, editable=REPO)


def build_sdist(
    sdist_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    raise SystemExit(
        "The fork has no source distribution: its sources are the pinned base "
        "wheel plus this checkout. Build a wheel instead (`pip wheel .` or "
        "`python -m build --wheel`)."
    )
