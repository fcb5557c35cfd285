# SPDX-License-Identifier: Apache-2.0
"""The CUDA wheel builds from its own base and passes the structural check;
the check and the build refuse wheels and trees that are not the fork.

The CUDA fork cannot run here, so this is what verifies it: its Python files
are the CPU fork's wherever the two base wheels agree. Slow-ish (about a
minute): both flavors are materialized and packed into a scratch directory.
"""

import email
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
from forklib import series, wheel
from forklib.base import CONFIG_PATH, Base, fetch

CPU, CUDA = Base.load("cpu"), Base.load("cuda")
# The pinned base release, e.g. 0.32.0.
RELEASE = tomllib.loads(CONFIG_PATH.read_text())["fork"]["base_version"]
ENTRY_POINT = "bitsandbytes = vllm.plugins.bitsandbytes:register"


def assert_upstream_size(fork_wheel: Path, base: Base) -> None:
    """Compressed as upstream's wheel is, compiled extensions included: the
    fork adds only a few hundred kB of sources to its base."""
    assert fork_wheel.stat().st_size < 1.01 * fetch(base).stat().st_size


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """Both flavors' trees and fork wheels, in one scratch directory."""
    out = tmp_path_factory.mktemp("wheels")
    for base in (CPU, CUDA):
        fetch(base)
        tree = series.materialize(base, out / f"tree-{base.flavor}")
        wheel.build(base, tree, out)
    yield out
    shutil.rmtree(out)


def test_cuda_wheel_is_the_fork_on_the_cuda_base(built: Path):
    path = wheel.check_wheel(CUDA, CPU, built)
    assert_upstream_size(path, CUDA)

    assert path.name == f"vllm-{RELEASE}+hooks-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path) as archive:
        info = f"vllm-{RELEASE}+hooks.dist-info"
        fields = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        assert (fields["Name"], fields["Version"]) == ("vllm", f"{RELEASE}+hooks")
        assert ENTRY_POINT in archive.read(f"{info}/entry_points.txt").decode()
        names = set(archive.namelist())
    assert "vllm/plugins/bitsandbytes/__init__.py" in names
    # CUDA-only upstream sources the CPU base lacks are there.
    assert "vllm/third_party/deep_gemm/__init__.py" in names


def test_the_cpu_wheel_passes_the_same_check(built: Path):
    assert_upstream_size(wheel.check_wheel(CPU, CUDA, built), CPU)


def test_a_wheel_of_an_empty_tree_fails_the_check(built: Path, tmp_path: Path):
    # What `build --flavor cuda` used to write after a failed materialize.
    wheel.pack(CUDA, tmp_path / "empty", tmp_path)
    (tmp_path / CPU.fork_wheel_name).hardlink_to(built / CPU.fork_wheel_name)

    with pytest.raises(SystemExit) as failure:
        wheel.check_wheel(CUDA, CPU, tmp_path)

    message = str(failure.value)
    assert "vllm/model_executor/layers/linear.py is missing; the series patches it" in (
        message
    )
    assert "vllm/plugins/bitsandbytes, one of the fork's own files, is missing" in (
        message
    )
    assert "vllm/__init__.py is only in" not in message
    assert "vllm/__init__.py is missing from" in message


def test_a_cuda_wheel_of_cpu_sources_fails_the_check(built: Path, tmp_path: Path):
    wheel.pack(CUDA, built / "tree-cpu", tmp_path)
    (tmp_path / CPU.fork_wheel_name).hardlink_to(built / CPU.fork_wheel_name)

    with pytest.raises(SystemExit) as failure:
        wheel.check_wheel(CUDA, CPU, tmp_path)

    message = str(failure.value)
    # The base wheels differ in these, so the CUDA fork must have CUDA's.
    assert f"vllm/platforms/__init__.py differs from {CUDA.filename}'s" in message
    assert f"vllm/third_party/deep_gemm/__init__.py of {CUDA.filename}" in message


def test_build_refuses_trees_that_are_not_the_fork(built: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="has no vllm/__init__.py"):
        wheel.build(CUDA, tmp_path / "empty", tmp_path)
    with pytest.raises(SystemExit, match=f"not from {CUDA.filename}"):
        wheel.build(CUDA, built / "tree-cpu", tmp_path)
    unpatched = tmp_path / "unpatched"
    series.pristine_repository(CUDA, unpatched)
    with pytest.raises(SystemExit, match="none of the patches applied"):
        wheel.build(CUDA, unpatched, tmp_path)
    assert not list(tmp_path.glob("*.whl"))
