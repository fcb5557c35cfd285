# SPDX-License-Identifier: Apache-2.0
"""The load-time benchmark's arithmetic and plugin selection.

The benchmark itself only reports; these checks make sure what it reports is
computed as documented (medians, ratios of medians, paired ratios) and that
each side registers only what its own distribution declares.
"""

import math

from benchmarks.load_time import declared_plugins, summarize, table
from tests.oracle.harness import fork, upstream


def load(side: str, rep: int, seconds: float, case: str = "unquantized") -> dict:
    return {
        "side": side,
        "size": "llama",
        "case": case,
        "rep": rep,
        "bytes": 2_000_000_000,
        "load_s": seconds,
        "load_cpu_s": seconds,
        "peak_rss_mib": 100.0,
    }


def registration(side: str, seconds: float) -> dict:
    return {
        "side": side,
        "import_s": seconds,
        "engine_args_s": seconds,
        "plugins_s": seconds,
        "loader_imports_s": seconds,
    }


def test_ratios_are_of_medians_and_pairs_are_per_repetition():
    fork_s, upstream_s = [1.0, 2.0, 9.0], [2.0, 2.0, 3.0]
    loads = [load("fork", rep, t) for rep, t in enumerate(fork_s)]
    loads += [load("upstream", rep, t) for rep, t in enumerate(upstream_s)]
    summary = summarize(
        loads, [registration("fork", 1.0), registration("upstream", 2.0)]
    )
    (row,) = summary["rows"]
    assert row["fork"]["load_s"] == 2.0 and row["upstream"]["load_s"] == 2.0
    assert row["ratio_load_s"] == 1.0
    assert row["ratio_min_load_s"] == 0.5
    # Per repetition 0.5, 1.0, 3.0: the median pair, not the ratio of medians.
    assert row["paired_ratio_load_s"] == 1.0
    assert math.isclose(row["fork"]["gbs"], 1.0)
    assert summary["registration"]["fork"]["total_s"] == 3.0
    assert summary["registration"]["upstream"]["ready_s"] == 8.0
    summary["code_changed_during_run"] = False
    assert "| registration total | 3.000 | 6.000 | 0.50 |" in table(summary, 10.0, None)


def test_a_failed_side_is_reported_not_averaged():
    failed = {"side": "upstream", "size": "llama", "case": "unquantized", "rep": 0}
    loads = [
        load("fork", 0, 1.0),
        {**failed, "bytes": 1, "error": "ValueError: broken"},
    ]
    summary = summarize(
        loads, [registration("fork", 1.0), registration("upstream", 1.0)]
    )
    (row,) = summary["rows"]
    assert row["upstream"]["load_s"] is None and row["ratio_load_s"] is None
    summary["code_changed_during_run"] = False
    assert "llama unquantized upstream: ValueError: broken" in table(summary, 1.0, None)


def test_each_side_registers_only_its_own_distributions_plugins():
    ours = set(declared_plugins(fork()).split(","))
    theirs = set(declared_plugins(upstream()).split(","))
    assert "bitsandbytes" in ours and "bitsandbytes" not in theirs
    assert theirs and theirs < ours
    # The test suite's toy plugin is installed alongside, but belongs to neither.
    assert not any("toy" in name for name in ours | theirs)
