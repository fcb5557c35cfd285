# SPDX-License-Identifier: Apache-2.0
"""The test run imports the installed fork, not the checkout's `vllm/`.

pytest puts the repository root on `sys.path` (tests/ is a package). The
root's `vllm/` holds only the files the fork adds, without an `__init__.py`,
so it must never become, or join, the `vllm` package that the tests, those of
`upstream/tests` included, import: that is the installed distribution.
"""

import importlib.metadata
from pathlib import Path

import vllm
import vllm.plugins

REPO = Path(__file__).resolve().parents[1]


def test_vllm_is_the_installed_distribution() -> None:
    distribution = importlib.metadata.distribution("vllm")
    installed = Path(distribution.locate_file("vllm/__init__.py")).resolve()
    assert Path(vllm.__file__).resolve() == installed
    assert "+hooks" in distribution.version
    # Only the installed package's directories, never the checkout's.
    assert [Path(p).resolve() for p in vllm.__path__] == [installed.parent]
    assert [Path(p).resolve() for p in vllm.plugins.__path__] == [
        installed.parent / "plugins"
    ]
