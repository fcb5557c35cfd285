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


def test_probe_of_pristine_vllm_survives_kernels_that_crash_on_import(tmp_path):
    """The pristine tree as on a host without AVX-512: `vllm._C` kills Python.

    A copy of the tree (links to every entry) whose `_C` extension is replaced
    by a module that raises SIGILL, as the AVX-512 build does on such a host.
    The probe still answers for every module: the platform module that
    imports `vllm._C` (ROCm's) is not importable, the config is.
    """
    from tests.oracle.harness import pristine_dir

    tree = tmp_path / "vllm"
    tree.mkdir()
    for entry in (pristine_dir() / "vllm").iterdir():
        if entry.name != "_C.abi3.so":
            (tree / entry.name).symlink_to(entry.resolve())
    (tree / "_C.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    found = importable(["vllm.platforms.rocm", "vllm.config"], env)
    assert found == {"vllm.config"}
