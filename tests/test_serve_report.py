# SPDX-License-Identifier: Apache-2.0
"""The serve-under-load benchmark's statistics, verdict and table.

The benchmark only reports wall times; these checks make sure what it
reports is computed as documented (percentiles between closest ranks,
throughput over the time to the last completion, fork over bnb-plugin),
that failed and lost requests at the highest concurrency fail the run while
a refusal of the reference side does not, and that the logs are read right.
Every expected value is worked out by hand from the samples.
"""

import pytest

from benchmarks.serve_load import (
    GATE_LEVEL,
    LEVELS,
    REFERENCE,
    SIDES,
    active_loaders,
    failures,
    level_stats,
    percentile,
    root_cause,
    summarize,
    table,
)

OFFLINE = [[5, 6], [7, 8]]
REFUSAL = (
    "server did not start (exit code 1): ValueError: Prequant BitsAndBytes "
    "models with tensor parallelism is not supported."
)


def done(prompt: int, latency_s: float, ended_s: float, tokens: list[int]) -> dict:
    return {
        "prompt": prompt,
        "latency_s": latency_s,
        "ended_s": ended_s,
        "token_ids": tokens,
    }


def level(concurrency: int, samples: list[dict], requested: int = 4) -> dict:
    return {"concurrency": concurrency, "requested": requested, "samples": samples}


def served(seconds_per_level: float, errors_at_gate: int = 0) -> dict:
    """A side that completed 4 two-token requests per level in the time given.

    Latencies 0.2, 0.4, 0.6, 0.8 s; the last request ends at
    ``seconds_per_level``. The gate level has ``errors_at_gate`` of them
    failed instead.
    """
    levels = []
    for concurrency in LEVELS:
        samples = [
            done(i % 2, 0.2 * (i + 1), seconds_per_level * (i + 1) / 4, OFFLINE[i % 2])
            for i in range(4)
        ]
        if concurrency == GATE_LEVEL:
            for sample in samples[:errors_at_gate]:
                sample.clear()
                sample.update(prompt=0, error="APIConnectionError: Connection error.")
        levels.append(level(concurrency, samples))
    return {"error": None, "levels": levels, "offline": OFFLINE}


def refused() -> dict:
    return {
        "error": REFUSAL,
        "levels": [],
        "offline_error": "ValueError: Prequant BitsAndBytes models ...",
    }


def test_percentiles_interpolate_between_the_closest_ranks():
    values = [16.0, 0.0, 8.0, 4.0]
    # Sorted 0, 4, 8, 16: p50 at rank 1.5, halfway from 4 to 8.
    assert percentile(values, 50) == 6.0
    assert percentile(values, 0) == 0.0 and percentile(values, 100) == 16.0
    # Rank 3 * 0.25 = 0.75: 0 + 0.75 * 4.
    assert percentile(values, 25) == 3.0
    # Rank 2.97: 8 + 0.97 * (16 - 8).
    assert percentile(values, 99) == pytest.approx(15.76, rel=1e-12)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_level_statistics_count_what_completed_failed_and_was_lost():
    samples = [
        done(0, 0.1, 0.5, [5, 6]),
        done(1, 0.4, 2.0, [7, 9]),
        {"prompt": 0, "error": "APITimeoutError: Request timed out."},
        done(1, 0.2, 1.0, [7, 8]),
        {"prompt": 1},  # sent, never ended
    ]
    stats = level_stats([level(8, samples, requested=6)], OFFLINE)
    assert stats == {
        "rounds": 1,
        "requested": 6,
        "sent": 5,
        "completed": 3,
        "errors": 1,
        "lost": 1,
        "first_error": "APITimeoutError: Request timed out.",
        # The last completion ended 2.0 s after the round started.
        "round_wall_s": [2.0],
        "round_output_tokens_per_s": [3.0],
        "requests_per_s": 1.5,
        "output_tokens_per_s": 3.0,
        # Latencies 0.1, 0.2, 0.4.
        "p50_latency_s": 0.2,
        "p99_latency_s": pytest.approx(0.2 + 0.98 * 0.2, rel=1e-12),
        # The second completion's tokens differ from prompt 1's offline ones.
        "same_as_offline": 2,
    }
    assert level_stats([level(1, samples)], None)["same_as_offline"] is None


def test_throughput_is_the_median_of_the_rounds_latency_over_all_requests():
    rounds = [
        # 2 tokens in 1.0 s; 6 in 2.0 s (the round of 3 requests); 4 in 0.5 s.
        level(8, [done(0, 1.0, 1.0, [5, 6])], requested=1),
        level(8, [done(1, 0.5, 1.5, [7, 8]), done(0, 3.0, 2.0, [5, 6, 6, 6])]),
        level(8, [done(0, 0.25, 0.5, [5, 6, 1, 2])]),
    ]
    stats = level_stats(rounds, OFFLINE)
    assert stats["round_output_tokens_per_s"] == [2.0, 3.0, 8.0]
    assert stats["output_tokens_per_s"] == 3.0
    # 1.0, 1.0 (two requests in 2.0 s) and 2.0 requests/s.
    assert stats["requests_per_s"] == 1.0
    # Latencies 0.25, 0.5, 1.0, 3.0: rank 1.5 lies halfway from 0.5 to 1.0.
    assert stats["p50_latency_s"] == 0.75
    assert (stats["rounds"], stats["requested"], stats["completed"]) == (3, 9, 4)
    assert stats["same_as_offline"] == 2


def test_a_level_without_completions_has_no_rates():
    stats = level_stats([level(32, [{"prompt": 0, "error": "E: x"}])], OFFLINE)
    assert stats["round_wall_s"] == [None] and stats["output_tokens_per_s"] is None
    assert stats["p50_latency_s"] is None and stats["errors"] == 1


def test_ratio_is_fork_over_the_reference_throughput_per_level():
    runs = [{"case": "c", "sides": {"fork": served(1.0), REFERENCE: served(2.0)}}]
    rows = summarize(runs)
    assert [row["concurrency"] for row in rows] == list(LEVELS)
    for row in rows:
        # 8 tokens in 1.0 s against 8 tokens in 2.0 s.
        assert row["fork"]["output_tokens_per_s"] == 8.0
        assert row[REFERENCE]["output_tokens_per_s"] == 4.0
        assert row["ratio_output_tokens_per_s"] == 2.0
    assert failures(runs, rows) == []


def test_failed_requests_fail_the_run_only_at_the_highest_concurrency():
    runs = [{"case": "c", "sides": {"fork": served(1.0, 1), REFERENCE: served(1.0)}}]
    assert failures(runs, summarize(runs)) == [
        (
            f"c fork N={GATE_LEVEL}: 1 failed (APIConnectionError: Connection "
            "error.), 0 lost"
        )
    ]
    ok = served(1.0)
    ok["levels"][0]["samples"][0] = {"prompt": 0, "error": "E: at N=1"}
    runs = [{"case": "c", "sides": {"fork": ok, REFERENCE: served(1.0)}}]
    assert failures(runs, summarize(runs)) == []


def test_a_reference_refusal_is_recorded_but_a_fork_that_cannot_serve_fails():
    runs = [{"case": "c", "sides": {"fork": served(1.0), REFERENCE: refused()}}]
    rows = summarize(runs)
    assert failures(runs, rows) == []
    assert all(row["ratio_output_tokens_per_s"] is None for row in rows)
    assert rows[0][REFERENCE] == {"error": REFUSAL}
    # The same failure without an offline refusal is the reference's bug...
    broken = refused() | {"error": "server not ready after 300 s; see x.log"}
    del broken["offline_error"]
    runs = [{"case": "c", "sides": {"fork": served(1.0), REFERENCE: broken}}]
    assert failures(runs, summarize(runs)) == [
        f"c {REFERENCE}: server not ready after 300 s; see x.log"
    ]
    # ...and on the fork side any failure counts.
    runs = [{"case": "c", "sides": {"fork": refused(), REFERENCE: served(1.0)}}]
    assert failures(runs, summarize(runs)) == [f"c fork: {REFUSAL}"]


def test_table_puts_the_sides_next_to_each_other_and_refusals_in_words():
    runs = [{"case": "c", "sides": {"fork": served(2.0), REFERENCE: refused()}}]
    lines = table(summarize(runs), {"fork": "F", REFERENCE: "P"}).splitlines()
    assert SIDES == ("fork", REFERENCE)
    assert lines[0] == (
        "| case | N | fork req/s | fork out tok/s | fork p50 ms | fork p99 ms "
        "| fork failed/lost | fork = offline | bnb-plugin req/s "
        "| bnb-plugin out tok/s | bnb-plugin p50 ms | bnb-plugin p99 ms "
        "| bnb-plugin failed/lost | bnb-plugin = offline "
        "| fork/bnb-plugin tok/s |"
    )
    assert lines[1] == "|---|" + "--:|" * 14
    # 4 requests and 8 tokens in 2.0 s; latencies 200..800 ms: p50 at rank
    # 1.5 = 500 ms, p99 at rank 2.97 = 600 + 0.97 * 200 = 794 ms.
    assert lines[2] == (
        f"| c | 1 | 2.00 | 4.0 | 500 | 794 | 0/0 | 4/4 | {REFUSAL} "
        "| - | - | - | - | - | - |"
    )
    # Only N=1 runs one sequence at a time, as the offline reference does.
    assert lines[3] == (
        f"| c | 8 | 2.00 | 4.0 | 500 | 794 | 0/0 | - | {REFUSAL} "
        "| - | - | - | - | - | - |"
    )
    assert len(lines) == 2 + len(LEVELS) + 4
    assert lines[-1] == "Sides: fork = F; bnb-plugin = P."


def test_table_warns_when_a_completion_differs_from_offline_generation():
    fork_side = served(1.0)
    fork_side["levels"][0]["samples"][1]["token_ids"] = [7, 9]
    runs = [{"case": "c", "sides": {"fork": fork_side, REFERENCE: served(1.0)}}]
    lines = table(summarize(runs), None).splitlines()
    assert lines[2].startswith("| c | 1 | 4.00 | 8.0 | 500 | 794 | 0/0 | 3/4 |")
    assert lines[-1] == (
        "WARNING: at N=1 completions differ from offline generation: c fork."
    )
    assert failures(runs, summarize(runs)) == []


def test_the_root_cause_skips_the_other_plugins_import_error():
    log = "\n".join(
        [
            "Failed to load plugin bitsandbytes",
            "ModuleNotFoundError: No module named 'vllm.plugins.bitsandbytes'",
            (
                "(APIServer pid=1) WARNING 12-01 14:02:01 [system_utils.py:255] Found "
                "ulimit of 20000 ... like `OSError: [Errno 24] Too many open files`."
            ),
            (
                "(EngineCore pid=2) ERROR 12-01 14:02:11 [__init__.py:72] "
                "ModuleNotFoundError: No module named 'vllm.plugins.bitsandbytes'"
            ),
            (
                "(Worker_TP0 pid=3) ERROR 12-01 14:02:21 [multiproc_executor.py:953] "
                "ValueError: Prequant BitsAndBytes models with tensor parallelism is "
                "not supported. Please try with pipeline parallelism."
            ),
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
    )
    assert root_cause(log) == (
        "ValueError: Prequant BitsAndBytes models with tensor parallelism is "
        "not supported. Please try with pipeline parallelism."
    )
    assert root_cause("INFO all fine\n") == "no exception in the log"


def test_active_loaders_are_read_from_every_process_once():
    log = "\n".join(
        [
            (
                "(EngineCore pid=2) INFO 12-01 13:42:28 [__init__.py:113] Registered "
                "model loader `<class 'vllm_bnb_plugin.bitsandbytes_loader."
                "BitsAndBytesModelLoader'>` with load format `bitsandbytes`"
            ),
            (
                "(Worker pid=3) INFO 12-01 13:42:29 [__init__.py:159] Registered "
                "model loader `vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader`"
                " with load format `bitsandbytes`"
            ),
            (
                "(Worker pid=4) INFO 12-01 13:42:29 [__init__.py:113] Registered "
                "model loader `<class 'vllm_bnb_plugin.bitsandbytes_loader."
                "BitsAndBytesModelLoader'>` with load format `bitsandbytes`"
            ),
        ]
    )
    assert active_loaders(log) == [
        "vllm_bnb_plugin.bitsandbytes_loader.BitsAndBytesModelLoader",
        "vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader",
    ]
