# SPDX-License-Identifier: Apache-2.0
"""The shard_indexer hook costs an unquantized load nothing (DESIGN.md §4).

Wall time on a shared machine cannot prove "no extra work", so these tests
count it deterministically: ``zero_cost_probe.py`` runs each weight-loader
call under ``sys.settrace`` with opcode tracing and counts the line and
opcode events executed inside the ``vllm`` package, once on the installed
fork and once on pristine upstream 0.27.1 (same interpreter, ``PYTHONPATH``
switch), each side in its own processes. Layers are built under real gloo
tensor-parallel groups of one and of two ranks, so TP=2 shard positions are
measured without patching any rank lookup.

A second probe loads whole unquantized models through the real loader on
the fork and records every executed line of ``linear.py`` and
``routed_experts.py``; none may fall inside a ``shard_indexer`` branch, and
no layer may have built a shard table.
"""

import ast
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import Side, fork, pristine_dir, upstream

PROBE = Path(__file__).with_name("zero_cost_probe.py")
# (world_size, rank) of the tensor-parallel positions measured.
POSITIONS = ((1, 0), (2, 0), (2, 1))
# Unquantized checkpoints for the load trace: plain Llama, Phi-3 (qkv and
# gate_up fused on disk), Qwen2 (qkv bias: the edited v1 loader runs) and
# Mixtral (fused-MoE expert loader).
LOAD_MODELS = ("llama", "phi3", "qwen2", "mixtral")
# Only catches hangs; all probes together take well under a minute.
TIMEOUT_S = 300


def _spawn(side: Side, args: list[str], out: Path, **env: str) -> subprocess.Popen:
    """Start the probe on ``side``; its output goes to ``out`` with ``.log``."""
    with out.with_suffix(".log").open("w") as log:
        return subprocess.Popen(
            [side.python, str(PROBE), *args],
            env={**side.env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=out.parent,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def probes() -> Iterator[dict[tuple, Any]]:
    """Run every probe process concurrently; results by side and position."""
    models = [str(get_checkpoint(name)) for name in LOAD_MODELS]
    with tempfile.TemporaryDirectory(prefix="zero-cost-") as tmp:
        jobs: dict[tuple, tuple[subprocess.Popen, Path]] = {}
        for side in (fork(), upstream()):
            for world_size, rank in POSITIONS:
                tag = f"{side.name}-tp{world_size}"
                out = Path(tmp, f"{tag}-rank{rank}.json")
                args = [
                    "layers",
                    f"--world-size={world_size}",
                    f"--rank={rank}",
                    f"--init-method=file://{tmp}/{tag}.init",
                    str(out),
                ]
                # The CPU communicator names its shared memory after this;
                # vLLM's CPU worker sets it the same way.
                ident = f"zero-cost-{tag}-{os.getpid()}"
                proc = _spawn(side, args, out, VLLM_DIST_IDENT=ident)
                jobs[(side.name, world_size, rank)] = (proc, out)
        out = Path(tmp, "fork-load.json")
        jobs[("load",)] = (_spawn(fork(), ["load", str(out), *models], out), out)
        results: dict[tuple, Any] = {}
        try:
            for key, (proc, out) in jobs.items():
                code = proc.wait(TIMEOUT_S)
                log = out.with_suffix(".log").read_text()[-4000:]
                assert code == 0, f"probe {key} exited with {code}:\n{log}"
                results[key] = json.loads(out.read_text())
        finally:
            for proc, _ in jobs.values():
                _stop(proc)
        yield results


def _counts(probes: dict[tuple, Any], side: str, position: tuple[int, int]) -> dict:
    return probes[(side, *position)]["cases"]


def test_probes_ran_the_intended_trees(probes: dict[tuple, Any]) -> None:
    """A failed PYTHONPATH switch would compare the fork with itself."""
    for world_size, rank in POSITIONS:
        fork_vllm = probes[("fork", world_size, rank)]["vllm"]
        upstream_vllm = probes[("upstream", world_size, rank)]["vllm"]
        assert Path(upstream_vllm["file"]).is_relative_to(pristine_dir())
        assert not Path(fork_vllm["file"]).is_relative_to(pristine_dir())
        assert upstream_vllm["version"] == "0.27.1"
        assert fork_vllm["version"] != upstream_vllm["version"]


@pytest.mark.parametrize("position", POSITIONS, ids=lambda p: f"tp{p[0]}-rank{p[1]}")
def test_layers_sit_at_the_measured_tp_position(
    probes: dict[tuple, Any], position: tuple[int, int]
) -> None:
    world_size, rank = position
    for side in ("fork", "upstream"):
        for case, counts in _counts(probes, side, position).items():
            assert (counts["tp_rank"], counts["tp_size"]) == (rank, world_size), case


@pytest.mark.parametrize("position", POSITIONS, ids=lambda p: f"tp{p[0]}-rank{p[1]}")
def test_unquantized_weight_loader_does_no_more_work(
    probes: dict[tuple, Any], position: tuple[int, int]
) -> None:
    """Per call: fork <= upstream; the edited linear loaders strictly fewer."""
    fork_counts = _counts(probes, "fork", position)
    upstream_counts = _counts(probes, "upstream", position)
    assert fork_counts.keys() == upstream_counts.keys()
    worse, not_cheaper = [], []
    for case, ours in fork_counts.items():
        theirs = upstream_counts[case]
        for metric in ("lines", "opcodes"):
            if ours[metric] > theirs[metric]:
                worse.append(f"{case} {metric}: {ours[metric]} > {theirs[metric]}")
        # The linear layers' weight_loader lost the use_bitsandbytes_4bit
        # lookups on every path (DESIGN.md §4: strictly fewer operations).
        edited = case.endswith("/weight_loader") and not case.startswith("moe")
        if edited and ours["opcodes"] >= theirs["opcodes"]:
            not_cheaper.append(f"{case}: {ours['opcodes']} >= {theirs['opcodes']}")
    assert not worse, worse
    assert not not_cheaper, not_cheaper


def test_unquantized_weight_loaders_do_less_work_in_total(
    probes: dict[tuple, Any],
) -> None:
    for metric in ("lines", "opcodes"):
        totals = {
            side: sum(
                counts[metric]
                for position in POSITIONS
                for counts in _counts(probes, side, position).values()
            )
            for side in ("fork", "upstream")
        }
        assert totals["fork"] < totals["upstream"], (metric, totals)


def _names_shard_indexer(node: ast.AST) -> bool:
    return any(
        isinstance(name, ast.Name) and name.id == "shard_indexer"
        for name in ast.walk(node)
    )


def _shard_indexer_lines(
    source: str, table_functions: list[str]
) -> tuple[set[int], set[int]]:
    """Guard lines, and the lines that run only when a shard_indexer exists.

    A guard is an ``if`` whose test names ``shard_indexer``; its body and the
    bodies of the cached shard-table properties are the machinery. Every
    ``shard_indexer(...)`` call site must lie inside it.
    """
    guards: set[int] = set()
    machinery: set[int] = set()
    call_sites: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body: list[ast.stmt] = []
        if isinstance(node, ast.If) and _names_shard_indexer(node.test):
            guards.add(node.test.lineno)
            body = node.body
        elif isinstance(node, ast.FunctionDef) and node.name in table_functions:
            body = node.body
        elif isinstance(node, ast.Call) and _names_shard_indexer(node.func):
            call_sites.add(node.lineno)
        for statement in body:
            machinery.update(range(statement.lineno, statement.end_lineno + 1))
    assert call_sites and call_sites <= machinery, (call_sites, machinery)
    return guards, machinery


@pytest.mark.parametrize(
    "probe",
    [("load",), *(("fork", *position) for position in POSITIONS)],
    ids=lambda key: "-".join(map(str, key)),
)
def test_unquantized_load_never_enters_shard_indexer_machinery(
    probes: dict[tuple, Any], probe: tuple
) -> None:
    """Whole-model loads and every measured loader call, on the fork.

    The models cover Phi-3's qkv/gate_up fused on disk, Qwen2's qkv biases
    (loaded by the edited ``weight_loader``) and Mixtral's expert loader.
    """
    trace = probes[probe]
    assert not Path(trace["vllm"]["file"]).is_relative_to(pristine_dir())
    assert trace["layers_with_shard_tables"] == []
    for path, executed in trace["executed_lines"].items():
        guards, machinery = _shard_indexer_lines(
            Path(path).read_text(), trace["shard_table_attrs"]
        )
        entered = sorted(machinery.intersection(executed))
        assert not entered, f"{path}: shard_indexer code ran at lines {entered}"
        # Not vacuous: the loaders ran and evaluated at least one guard.
        assert guards.intersection(executed), f"{path}: no guard was evaluated"
