# SPDX-License-Identifier: Apache-2.0
"""The fork builds from the pinned base plus patches/ and vllm/, as documented."""

import hashlib
import re
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRISTINE = REPO / "build" / "pristine"
PLUGIN_DIR = Path("vllm") / "plugins" / "bitsandbytes"
BNB_MENTION = re.compile(r"bitsandbytes|\bbnb", re.IGNORECASE)
PINS = tomllib.loads((REPO / "tools" / "fork.toml").read_text())
RELEASE = PINS["fork"]["base_version"]  # the pinned base, 0.32.0


def installed_vllm_root() -> Path:
    import vllm

    return Path(vllm.__file__).resolve().parent.parent


def test_series_applies_and_reexports_identically():
    fork_tool = REPO / "tools" / "fork.py"
    subprocess.run([sys.executable, str(fork_tool), "check"], check=True)


def test_installed_distribution_is_the_fork():
    import vllm

    # "cpu" in the version is how vLLM detects its CPU build.
    assert vllm.__version__ == f"{RELEASE}+hooks.cpu"
    dist = distribution("vllm")
    assert dist.version == vllm.__version__
    requires = " ".join(dist.requires or [])
    for broken in ("torchvision", "torchaudio", "torchcodec"):
        assert broken not in requires
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins["bitsandbytes"] == "vllm.plugins.bitsandbytes:register"


def test_installed_core_never_names_bitsandbytes():
    root = installed_vllm_root()
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in (root / "vllm").rglob("*.py")
        if not path.relative_to(root).is_relative_to(PLUGIN_DIR)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if BNB_MENTION.search(line)
    ]
    assert offenders == []


def test_core_does_not_import_the_plugin():
    root = installed_vllm_root()
    offenders = [
        str(path.relative_to(root))
        for path in (root / "vllm").rglob("*.py")
        if not path.relative_to(root).is_relative_to(PLUGIN_DIR)
        and "vllm.plugins.bitsandbytes" in path.read_text()
    ]
    assert offenders == []


@pytest.mark.skipif(not PRISTINE.is_dir(), reason="run tools/setup first")
def test_repo_vllm_holds_no_upstream_file():
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    upstream = {digest(p) for p in (PRISTINE / "vllm").rglob("*.py")}
    ours = [p for p in (REPO / "vllm").rglob("*.py") if p.stat().st_size > 0]
    assert ours, "the fork adds files under vllm/"
    copies = [str(p.relative_to(REPO)) for p in ours if digest(p) in upstream]
    assert copies == []
    for path in ours:
        assert not (PRISTINE / path.relative_to(REPO)).exists(), (
            f"{path} shadows an upstream file: change it with a patch instead"
        )
