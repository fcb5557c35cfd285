# SPDX-License-Identifier: Apache-2.0
"""Serving with the fork's bitsandbytes plugin costs no more per step.

The reference is what users run today: pristine vLLM 0.32.0 with the
out-of-tree ``vllm-bnb-plugin`` 0.0.3. Both run the same bitsandbytes
kernels, so the plugin's glue must not add work to a decode step. Wall time
on a shared 2-core machine cannot show that; ``step_cost_probe.py`` counts it
instead: for one ``generate`` (same checkpoint, same token-id prompts) the
operators dispatched and the Python calls made, once per side, each in its
own process. Every count is measured twice per process and must repeat, so
the comparison is exact.

``python -m tests.test_step_cost`` runs the same probes and prints the table
of ``docs/benchmarks.md`` (wrap it in ``flock /tmp/engine.lock``).
"""

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import (
    BNB_PLUGIN_DIR,
    PROMPTS,
    Side,
    bnb_plugin,
    fork,
    pristine_dir,
    start_in_session,
    stop_session,
)

pytestmark = pytest.mark.engine

PROBE = Path(__file__).with_name("step_cost_probe.py")
# Two ragged prompts, eight tokens each: one prefill and seven decode steps.
STEP_PROMPTS = [list(p) for p in PROMPTS[:2]]
MAX_TOKENS = 8
# Only catches hangs; one probe takes ~20 s.
TIMEOUT_S = 300
BNB_NAMESPACE = "bitsandbytes::"
FORK_METHOD_PACKAGE = "vllm.plugins.bitsandbytes."
PLUGIN_METHOD_PACKAGE = "vllm_bnb_plugin."


class StepCase(NamedTuple):
    """A checkpoint and the ``quantization`` argument it is served with."""

    checkpoint: str
    quantization: str | None


CASES = {
    "nf4": StepCase("llama-bnb-nf4", None),
    "online-4bit": StepCase("llama", "bitsandbytes"),
}
SIDES = (fork(), bnb_plugin())


def _spawn(side: Side, case: StepCase, out: Path) -> subprocess.Popen:
    """Start the probe for ``case`` on ``side``; its log goes next to ``out``."""
    args = [side.python, str(PROBE), str(out), str(get_checkpoint(case.checkpoint))]
    args += ["--prompts", json.dumps(STEP_PROMPTS), f"--max-tokens={MAX_TOKENS}"]
    if case.quantization:
        args.append(f"--quantization={case.quantization}")
    return start_in_session(args, side.env(), out.with_suffix(".log"), out.parent)


def run_probes() -> dict[tuple[str, str], dict[str, Any]]:
    """Probe every case on both sides; results by (case id, side name).

    The two sides of a case run concurrently: the counts do not depend on
    timing, and two engines fit the machine.
    """
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="step-cost-") as tmp:
        for case_id, case in CASES.items():
            jobs = {}
            for side in SIDES:
                out = Path(tmp, f"{case_id}-{side.name}.json")
                jobs[side.name] = (_spawn(side, case, out), out)
            try:
                for name, (proc, out) in jobs.items():
                    code = proc.wait(TIMEOUT_S)
                    log = out.with_suffix(".log").read_text()[-4000:]
                    assert code == 0, f"{case_id} on {name} exited with {code}:\n{log}"
                    results[(case_id, name)] = json.loads(out.read_text())
            finally:
                for proc, _ in jobs.values():
                    stop_session(proc)
    return results


@pytest.fixture(scope="module")
def probes() -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    yield run_probes()


def _bnb_ops(measurement: dict[str, Any]) -> dict[str, int]:
    return {
        name: n
        for name, n in measurement["ops"].items()
        if name.startswith(BNB_NAMESPACE)
    }


def _differences(ours: dict[str, int], theirs: dict[str, int]) -> list[str]:
    """Keys whose counts differ, as ``key: fork N, bnb-plugin M``."""
    return [
        f"{key}: fork {ours.get(key, 0)}, bnb-plugin {theirs.get(key, 0)}"
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key, 0) != theirs.get(key, 0)
    ]


def _first(probes: dict, case_id: str, side: str) -> dict[str, Any]:
    return probes[(case_id, side)]["measurements"][0]


@pytest.mark.parametrize("case_id", CASES)
def test_each_side_ran_its_own_plugin(probes: dict, case_id: str) -> None:
    """A failed PYTHONPATH switch would compare the fork with itself."""
    ours, theirs = probes[(case_id, "fork")], probes[(case_id, "bnb-plugin")]
    assert not Path(ours["vllm"]["file"]).is_relative_to(pristine_dir())
    assert Path(theirs["vllm"]["file"]).is_relative_to(pristine_dir())
    assert theirs["vllm"]["version"] == "0.32.0"
    assert Path(theirs["plugin_dir"]).is_relative_to(BNB_PLUGIN_DIR)
    for result, package in (
        (ours, FORK_METHOD_PACKAGE),
        (theirs, PLUGIN_METHOD_PACKAGE),
    ):
        (rank,) = result["linear_methods"]
        methods = rank["linear_methods"]
        assert methods and all(m.startswith(package) for m in methods), methods
        assert all(m.endswith(".BitsAndBytesLinearMethod") for m in methods)


@pytest.mark.parametrize("side", [side.name for side in SIDES])
@pytest.mark.parametrize("case_id", CASES)
def test_counts_repeat(probes: dict, case_id: str, side: str) -> None:
    """Two measurements in one process agree: the counts are deterministic."""
    result = probes[(case_id, side)]
    assert result["deterministic"], f"measurements differ in {result['differing']}"
    first = result["measurements"][0]
    assert all(f["thread"] == "MainThread" for f in first["forwards"])
    # One prefill and MAX_TOKENS - 1 decode steps, all seen.
    assert len(first["forwards"]) == MAX_TOKENS
    assert first["calls_in_plugin"] > 0 and _bnb_ops(first)


@pytest.mark.parametrize("case_id", CASES)
def test_same_tokens(probes: dict, case_id: str) -> None:
    ours = _first(probes, case_id, "fork")["token_ids"]
    theirs = _first(probes, case_id, "bnb-plugin")["token_ids"]
    assert ours == theirs
    assert all(len(ids) == MAX_TOKENS for ids in ours)


@pytest.mark.parametrize("case_id", CASES)
def test_same_bnb_kernels(probes: dict, case_id: str) -> None:
    """Both sides run the same bitsandbytes kernels, as often."""
    ours = _bnb_ops(_first(probes, case_id, "fork"))
    theirs = _bnb_ops(_first(probes, case_id, "bnb-plugin"))
    assert ours == theirs, _differences(ours, theirs)


@pytest.mark.parametrize("case_id", CASES)
def test_fork_dispatches_no_more_aten_ops(
    probes: dict, case_id: str, record_property: Any
) -> None:
    ours = _first(probes, case_id, "fork")
    theirs = _first(probes, case_id, "bnb-plugin")
    record_property("fork_aten_ops", ours["aten_ops_total"])
    record_property("bnb_plugin_aten_ops", theirs["aten_ops_total"])
    extra = ours["aten_ops_total"] - theirs["aten_ops_total"]
    assert extra <= 0, (
        f"the fork dispatches {extra} more aten ops per generate than "
        f"bnb-plugin ({ours['aten_ops_total']} vs {theirs['aten_ops_total']}, "
        f"{len(ours['forwards'])} forwards); counts that differ: "
        f"{_differences(ours['ops'], theirs['ops'])}"
    )


@pytest.mark.parametrize("case_id", CASES)
def test_fork_plugin_makes_no_more_python_calls(
    probes: dict, case_id: str, record_property: Any
) -> None:
    """Calls in vllm/plugins/bitsandbytes vs in the vllm_bnb_plugin package."""
    ours = _first(probes, case_id, "fork")
    theirs = _first(probes, case_id, "bnb-plugin")
    record_property("fork_plugin_calls", ours["calls_in_plugin"])
    record_property("bnb_plugin_plugin_calls", theirs["calls_in_plugin"])
    assert ours["calls_in_plugin"] <= theirs["calls_in_plugin"], (
        f"fork {ours['calls_in_plugin']} calls: {ours['plugin_functions']}; "
        f"bnb-plugin {theirs['calls_in_plugin']}: {theirs['plugin_functions']}"
    )


def table(probes: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The counts as the Markdown table of docs/benchmarks.md."""
    rows = [
        (
            "| case | side | aten ops | bnb kernel ops | ops per decode forward "
            "| Python calls in plugin package | in vllm + plugin | all Python calls |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case_id in CASES:
        for side in SIDES:
            m = _first(probes, case_id, side.name)
            cells = (
                m["aten_ops_total"],
                sum(_bnb_ops(m).values()),
                m["forwards"][-1]["ops"],
                m["calls_in_plugin"],
                m["calls_in_vllm_or_plugin"],
                m["calls_total"],
            )
            rows.append(f"| {case_id} | {side.name} | {' | '.join(map(str, cells))} |")
    return "\n".join(rows)


def main() -> int:
    """Print the table and, per case, the ops whose counts differ."""
    probes = run_probes()
    print(table(probes))
    for case_id in CASES:
        ours = _first(probes, case_id, "fork")["ops"]
        theirs = _first(probes, case_id, "bnb-plugin")["ops"]
        print(f"\n{case_id}: ops that differ", *_differences(ours, theirs), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
