# SPDX-License-Identifier: Apache-2.0
"""check-upstream's probe of which modules import on pristine sources survives
a module that kills its interpreter (SIGILL from `import vllm._C` on hosts
without AVX-512)."""

import os

from forklib.upstream import importable


def test_a_crashing_import_counts_as_not_importable(tmp_path):
    (tmp_path / "fine.py").write_text("")
    (tmp_path / "raises.py").write_text("raise ImportError('needs a GPU')\n")
    (tmp_path / "crashes.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    found = importable(["fine", "raises", "crashes", "missing"], env)
    assert found == {"fine"}
