# SPDX-License-Identifier: Apache-2.0
"""The quantization hooks cost an unquantized load nothing.

Pristine vLLM 0.32.0 has no hooks at all, so "nothing" means equality: every
unquantized weight-loader call must execute exactly what pristine 0.32.0
executes. Wall time on a shared machine cannot show that, so these tests
count it deterministically: ``zero_cost_probe.py`` runs each weight-loader
call under ``sys.settrace`` with opcode tracing and counts the line and
opcode events executed inside the ``vllm`` package, once on the installed
fork and once on pristine 0.32.0 (same interpreter, ``PYTHONPATH`` switch),
each side in its own processes. Layers are built under real gloo
tensor-parallel groups of one and of two ranks, so TP=2 shard positions are
measured without patching any rank lookup.

A second probe loads whole unquantized models through the real loader on
the fork and records every executed line of ``linear.py`` and
``routed_experts.py``; none may fall inside the hooks' code, which sits in
branches only packed or indexed parameters take.
"""

import ast
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import (
    Side,
    fork,
    pristine_dir,
    start_in_session,
    stop_session,
    upstream,
)

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
    return start_in_session(
        [side.python, str(PROBE), *args],
        {**side.env(), **env},
        out.with_suffix(".log"),
        out.parent,
    )


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
                stop_session(proc)
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
        assert upstream_vllm["version"] == "0.32.0"
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
def test_unquantized_weight_loaders_execute_what_upstream_executes(
    probes: dict[tuple, Any], position: tuple[int, int], record_property
) -> None:
    """Per call, lines and opcodes equal pristine 0.32.0's, in every case."""
    fork_counts = _counts(probes, "fork", position)
    upstream_counts = _counts(probes, "upstream", position)
    for side, counts in (("fork", fork_counts), ("upstream", upstream_counts)):
        record_property(
            f"{side}_opcodes", sum(case["opcodes"] for case in counts.values())
        )
    assert fork_counts.keys() == upstream_counts.keys()
    differing = [
        f"{case} {metric}: fork {ours[metric]}, upstream {theirs[metric]}"
        for case, ours in fork_counts.items()
        for theirs in [upstream_counts[case]]
        for metric in ("lines", "opcodes")
        if ours[metric] != theirs[metric]
    ]
    assert not differing, differing


def _mentions_shard_indexer(node: ast.AST) -> bool:
    """Whether an expression names `shard_indexer` (attribute or getattr)."""
    return any(
        (isinstance(part, ast.Attribute) and part.attr == "shard_indexer")
        or (isinstance(part, ast.Constant) and part.value == "shard_indexer")
        for part in ast.walk(node)
    )


def _statement_lines(statements: list[ast.stmt]) -> set[int]:
    return {
        line
        for statement in statements
        for line in range(statement.lineno, statement.end_lineno + 1)
    }


def _hook_lines(source: str) -> tuple[set[int], set[int]]:
    """The lines of the hooks' code, and the guards in front of them.

    Hook code is the body of every ``if`` whose test looks up
    ``shard_indexer`` (the linear loaders), and of every function that is not
    such a branch but calls it directly (the fused-MoE indexed loader). The
    guards are the tests of the ``if`` statements that enclose a hook branch:
    the packed-parameter checks that unquantized loads do evaluate.
    """
    hooks: set[int] = set()
    guards: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        branch = isinstance(node, ast.If) and _mentions_shard_indexer(node.test)
        caller = isinstance(node, ast.FunctionDef) and any(
            isinstance(part, ast.Call) and _mentions_shard_indexer(part.func)
            for part in ast.walk(node)
        )
        if branch or caller:
            hooks |= _statement_lines(node.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(
            isinstance(child, ast.If) and _mentions_shard_indexer(child.test)
            for child in node.body
        ):
            guards.add(node.test.lineno)
    assert hooks, "no shard_indexer hook found: the check would be vacuous"
    return hooks, guards


@pytest.mark.parametrize(
    "probe",
    [("load",), *(("fork", *position) for position in POSITIONS)],
    ids=lambda key: "-".join(map(str, key)),
)
def test_unquantized_load_never_enters_the_hooks(
    probes: dict[tuple, Any], probe: tuple
) -> None:
    """Whole-model loads and every measured loader call, on the fork.

    The models cover Phi-3's qkv/gate_up fused on disk, Qwen2's qkv biases
    (loaded by the v1 ``weight_loader`` that holds the hook) and Mixtral's
    expert loader.
    """
    trace = probes[probe]
    assert not Path(trace["vllm"]["file"]).is_relative_to(pristine_dir())
    evaluated_guard = False
    for path, executed in trace["executed_lines"].items():
        assert executed, f"{path}: no line ran, the trace is vacuous"
        hooks, guards = _hook_lines(Path(path).read_text())
        entered = sorted(hooks.intersection(executed))
        assert not entered, f"{path}: hook code ran at lines {entered}"
        evaluated_guard |= bool(guards.intersection(executed))
    # Not vacuous: the loaders reached the packed-parameter checks.
    assert evaluated_guard
