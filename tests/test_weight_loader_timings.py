# SPDX-License-Identifier: Apache-2.0
r"""pytest-benchmark timings of single unquantized weight-loader calls.

The calls are exactly those ``tests/test_zero_cost.py`` counts (built by
``tests/zero_cost_probe.py``). Run this file on the fork and on pristine
0.32.0, its base (``build/pristine``, no plugins), each in its own process,
and compare with pytest-benchmark's own tool::

    B="tests/test_weight_loader_timings.py"
    S="build/benchmarks/weight_loader"
    .venv/bin/python -m pytest $B --benchmark-storage=$S --benchmark-save=fork
    PYTHONPATH=build/pristine VLLM_PLUGINS= \
        .venv/bin/python -m pytest $B --benchmark-storage=$S --benchmark-save=upstream
    .venv/bin/pytest-benchmark --storage $S compare --group-by=name

With ``WEIGHT_LOADER_BENCH_TP=2`` the process is rank 1 of a real two-rank
gloo tensor-parallel group (a probe process is rank 0 and exits once the
group exists), so the layers load rank 1's shards. Times are reported,
never asserted. A plain ``pytest`` run leaves this file out
(``collect_ignore`` in ``tests/conftest.py``); it runs when named.
"""

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

import vllm
from tests import zero_cost_probe
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

TP_SIZE = int(os.environ.get("WEIGHT_LOADER_BENCH_TP", "1"))
TP_RANK = TP_SIZE - 1
PARTNER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def loader_cases() -> Iterator[dict[str, zero_cost_probe.LoaderCase]]:
    """The probe's loader calls, on layers at this process's TP position."""
    # vLLM's CPU worker names the group's shared memory after this.
    os.environ.setdefault("VLLM_DIST_IDENT", f"weight-loader-bench-{os.getpid()}")
    with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(VllmConfig()):
        init_method = f"file://{tmp}/dist-init"
        partner = None
        if TP_SIZE > 1:
            partner = subprocess.Popen(
                [
                    sys.executable,
                    zero_cost_probe.__file__,
                    "layers",
                    f"--world-size={TP_SIZE}",
                    "--rank=0",
                    f"--init-method={init_method}",
                    str(Path(tmp, "partner.json")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        zero_cost_probe.init_distributed(TP_SIZE, TP_RANK, init_method)
        # Nothing else may compete for the CPU once timing starts.
        if partner is not None:
            assert partner.wait(PARTNER_TIMEOUT_S) == 0
        # Small copies on a shared 2-core machine: one thread keeps the
        # Python-side work (what the fork changes) from drowning in
        # thread hand-off noise.
        torch.set_num_threads(1)
        torch.manual_seed(0)
        yield {**zero_cost_probe.linear_cases(), **zero_cost_probe.moe_cases()}
        cleanup_dist_env_and_memory()


@pytest.mark.parametrize("case", zero_cost_probe.CASES)
def test_weight_loader(
    benchmark: BenchmarkFixture,
    loader_cases: dict[str, zero_cost_probe.LoaderCase],
    case: str,
) -> None:
    loader = loader_cases[case]
    benchmark.group = case
    benchmark.extra_info.update(
        vllm=vllm.__version__,
        vllm_file=vllm.__file__,
        tp_rank=loader.tp_rank,
        tp_size=loader.tp_size,
    )
    benchmark(loader.call)
