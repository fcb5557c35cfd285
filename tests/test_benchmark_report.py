# SPDX-License-Identifier: Apache-2.0
"""The load-time benchmark's arithmetic, side order and plugin selection.

The benchmark itself only reports; these checks make sure what it reports is
computed as documented (medians, ratios of medians, paired ratios, fork over
each reference side), that the sides' order is balanced, and that each side
registers only what its own distributions declare.
"""

import configparser
import itertools
import math
from pathlib import Path

from benchmarks.load_time import (
    PLUGIN_GROUP,
    REFERENCES,
    SIDES,
    declared_plugins,
    side_order,
    summarize,
    table,
)
from tests.oracle.harness import BNB_PLUGIN_DIR, bnb_plugin, fork, legacy, upstream


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


def registrations(seconds: dict[str, float]) -> list[dict]:
    return [registration(side, seconds[side]) for side in SIDES]


def test_the_fork_is_compared_with_the_plugin_and_the_last_in_core_release():
    assert SIDES == ("fork", "bnb-plugin", "legacy")
    assert REFERENCES == ("bnb-plugin", "legacy")


def test_ratios_are_of_medians_and_pairs_are_per_repetition():
    times = {
        "fork": [1.0, 2.0, 9.0],
        "bnb-plugin": [2.0, 2.0, 3.0],
        "legacy": [4.0, 1.0, 8.0],
    }
    loads = [
        load(side, rep, t) for side, ts in times.items() for rep, t in enumerate(ts)
    ]
    summary = summarize(
        loads, registrations({"fork": 1.0, "bnb-plugin": 2.0, "legacy": 4.0})
    )
    (row,) = summary["rows"]
    assert row["fork"]["load_s"] == 2.0 and row["bnb-plugin"]["load_s"] == 2.0
    assert row["legacy"]["load_s"] == 4.0
    plugin, old = row["vs"]["bnb-plugin"], row["vs"]["legacy"]
    assert plugin["ratio_load_s"] == 1.0 and old["ratio_load_s"] == 0.5
    assert plugin["ratio_min_load_s"] == 0.5 and old["ratio_min_load_s"] == 1.0
    # Per repetition 0.5, 1.0, 3.0: the median pair, not the ratio of medians.
    assert plugin["paired_ratio_load_s"] == 1.0
    # Per repetition 0.25, 2.0, 1.125.
    assert old["paired_ratio_load_s"] == 1.125
    assert math.isclose(row["fork"]["gbs"], 1.0)
    assert math.isclose(row["legacy"]["gbs"], 0.5)
    geomeans = summary["geomean_ratio_load_s"]
    assert geomeans["legacy"]["paired_ratio_load_s"]["unquantized"] == 1.125
    assert geomeans["legacy"]["paired_ratio_load_s"]["bitsandbytes"] is None
    assert summary["registration"]["fork"]["total_s"] == 3.0
    assert summary["registration"]["bnb-plugin"]["ready_s"] == 8.0
    summary["code_changed_during_run"] = False
    text = table(summary, 10.0, None)
    assert "| registration total | 3.000 | 6.000 | 12.000 | 0.50 | 0.25 |" in text
    assert "| llama | unquantized | 2000.0 | 2.000 | 2.000 | 4.000 | 1.00 | 1.00 |" in (
        text
    )


def test_pairs_need_both_sides_of_one_repetition():
    loads = [load("fork", 0, 1.0), load("fork", 1, 3.0), load("legacy", 1, 2.0)]
    loads += [load("bnb-plugin", 0, 4.0)]
    summary = summarize(loads, registrations(dict.fromkeys(SIDES, 1.0)))
    (row,) = summary["rows"]
    assert row["vs"]["legacy"]["paired_ratio_load_s"] == 1.5
    assert row["vs"]["bnb-plugin"]["paired_ratio_load_s"] == 0.25


def test_a_failed_side_is_reported_in_words_not_averaged():
    failed = {"side": "bnb-plugin", "size": "llama", "case": "int8-prequant"}
    loads = [
        load("fork", 0, 1.0, "int8-prequant"),
        load("legacy", 0, 2.0, "int8-prequant"),
        {**failed, "rep": 0, "bytes": 1, "error": "ValueError: refused"},
    ]
    died = {"side": "legacy", "error": "WorkerDied: load worker died or hung"}
    summary = summarize(
        loads, [registration("fork", 1.0), registration("bnb-plugin", 1.0), died]
    )
    (row,) = summary["rows"]
    assert row["bnb-plugin"]["load_s"] is None and row["bnb-plugin"]["samples"] == 0
    assert row["vs"]["bnb-plugin"]["ratio_load_s"] is None
    assert row["vs"]["bnb-plugin"]["paired_ratio_load_s"] is None
    assert row["vs"]["legacy"]["ratio_load_s"] == 0.5
    assert summary["registration"]["legacy"]["total_s"] is None
    summary["code_changed_during_run"] = False
    text = table(summary, 1.0, None)
    assert "| 1.000 | failed (ValueError) | 2.000 | - | - | 0.50 | 0.50 |" in text
    assert "llama int8-prequant bnb-plugin: ValueError: refused" in text
    assert "| `import vllm` | 1.000 | 1.000 | failed (WorkerDied) | 1.00 | - |" in text
    assert "registration legacy: WorkerDied: load worker died or hung" in text


def test_every_order_of_the_sides_runs_once_in_three_repetitions():
    orders = [
        tuple(side_order(SIDES, rep, index)) for rep in range(3) for index in (0, 1)
    ]
    assert sorted(orders) == sorted(itertools.permutations(SIDES))


def _entry_point_names(tree: Path) -> set[str]:
    names: set[str] = set()
    for path in tree.glob("*.dist-info/entry_points.txt"):
        parser = configparser.ConfigParser()
        parser.read(path)
        if parser.has_section(PLUGIN_GROUP):
            names |= set(parser.options(PLUGIN_GROUP))
    return names


def test_each_side_registers_only_its_own_distributions_plugins():
    ours = set(declared_plugins(fork()).split(","))
    pristine = set(declared_plugins(upstream()).split(","))
    with_plugin = set(declared_plugins(bnb_plugin()).split(","))
    old = set(declared_plugins(legacy()).split(","))
    # The fork and vllm-bnb-plugin register bitsandbytes as a plugin; pristine
    # vLLM does not (0.27.1 has it in core, 0.32.0 not at all).
    assert "bitsandbytes" in ours and "bitsandbytes" in with_plugin
    assert "bitsandbytes" not in pristine | old
    assert pristine and pristine < ours
    # The plugin side is pristine 0.32.0 plus exactly what the plugin declares.
    assert with_plugin == pristine | _entry_point_names(BNB_PLUGIN_DIR)
    assert _entry_point_names(BNB_PLUGIN_DIR) == {"bitsandbytes"}
    assert old == pristine
    # The test suite's toy plugin is installed alongside, but belongs to none.
    assert not any("toy" in name for name in ours | with_plugin | old)
