# SPDX-License-Identifier: Apache-2.0
"""`vllm serve` under concurrent load: the fork against vllm-bnb-plugin.

Usage::

    python -m benchmarks.serve_load [--quick | --full] [--out DIR]

Two sides, in one run, one after the other on the same machine:

- ``fork``: the installed fork (bitsandbytes as its in-tree plugin);
- ``bnb-plugin``: pristine vLLM 0.32.0 with the out-of-tree
  ``vllm-bnb-plugin``, what users of bitsandbytes serve with on 0.32.0.

For every case each side starts an OpenAI-compatible server (``vllm serve``,
engine core and workers in their own processes, as users run it) on a free
port of 127.0.0.1. Clients of the ``openai`` package then send greedy
completions of token-id prompts, ``MAX_TOKENS`` tokens each (``ignore_eos``),
in rounds of levels of 1, then 8, then 32 concurrent clients; each level
stops after a number of requests or a time budget, whichever comes first.
Reported per side and level: requests/s and output tokens/s (completed
requests over the round's wall time, median over the rounds), p50/p99
latency over all requests, failed and lost requests, and how many
completions at N=1 equal the side's own offline ``LLM.generate`` of the
same prompt (token ids, generated one sequence at a time in a separate
process by the oracle harness). The
ratio fork/bnb-plugin of output tokens/s comes from the same run. Wall times
are reported, never asserted; the exit status is non-zero when a request
fails or is lost at the highest concurrency, or the fork does not serve.

``--quick`` (the default, CI): the pre-quantized nf4 tiny Llama at TP=1.
``--full`` adds the synthetic 21M Llama pre-quantized (nf4) and quantized
in flight (``--quantization bitsandbytes``), each at TP=1 and TP=2, with
more requests per level. vllm-bnb-plugin refuses pre-quantized checkpoints
with TP > 1; that refusal is recorded in the table.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from benchmarks.load_time import (
    CASES,
    checkpoint,
    code_identities,
    describe,
    format_value,
    markdown_row,
    ratio_of,
    side_order,
    worker_env,
)
from tests.oracle.harness import (
    PROMPTS,
    REPO,
    Case,
    Side,
    bnb_plugin,
    fork,
    free_port,
    run_case,
)

# Concurrent clients, in the order they run against one server.
LEVELS = (1, 8, 32)
# Failed or lost requests at this level make the exit status non-zero.
GATE_LEVEL = LEVELS[-1]
# The level compared with offline generation: one sequence at a time.
OFFLINE_LEVEL = LEVELS[0]
MAX_TOKENS = 16
REFERENCE = "bnb-plugin"
# The first throughput ratio users of the plugin would notice.
TARGET_RATIO = 0.98
# Generous limits: they only catch a hung server.
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# The BNB model loader each side must register: exactly one plugin active.
EXPECTED_LOADERS = {
    "fork": "vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader",
    "bnb-plugin": "vllm_bnb_plugin.bitsandbytes_loader.BitsAndBytesModelLoader",
}
LOADER_LINE = re.compile(
    r"Registered model loader `(?:<class ')?([\w.]+)(?:'>)?` "
    r"with load format `bitsandbytes`"
)
# A traceback's last line, bare or as the message of a vLLM log line.
EXCEPTION_LINE = re.compile(r"(?:^|\] )([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


@dataclasses.dataclass(frozen=True)
class Load:
    """Requests per concurrency level, the time budget of one level, and how
    many rounds of all levels one server runs (throughput: their median)."""

    requests: dict[int, int]
    budget_s: float
    rounds: int


QUICK_LOAD = Load({1: 4, 8: 16, 32: 64}, 15.0, rounds=5)
FULL_LOAD = Load({1: 16, 8: 64, 32: 128}, 60.0, rounds=3)


@dataclasses.dataclass(frozen=True)
class ServeCase:
    """A checkpoint served at a TP size (``case`` as in ``load_time.CASES``)."""

    size: str
    case: str
    tp: int = 1

    @property
    def name(self) -> str:
        return f"{self.size} {self.case} TP={self.tp}"

    @property
    def quantization(self) -> str | None:
        return CASES[self.case][0]


QUICK_CASES = (ServeCase("llama", "nf4-prequant"),)
FULL_CASES = (
    *QUICK_CASES,
    ServeCase("llama-bench-21m", "nf4-prequant"),
    ServeCase("llama-bench-21m", "bnb4-inflight"),
    ServeCase("llama-bench-21m", "nf4-prequant", tp=2),
    ServeCase("llama-bench-21m", "bnb4-inflight", tp=2),
)


@dataclasses.dataclass(frozen=True)
class OfflineCase(Case):
    """The oracle's engine run, generating as many tokens as the server."""

    def spec(self) -> dict[str, Any]:
        return super().spec() | {"max_tokens": MAX_TOKENS}


def sides() -> list[Side]:
    """The compared sides, the fork first."""
    return [fork(), bnb_plugin()]


SIDES = tuple(side.name for side in sides())


def offline_case(case: ServeCase) -> OfflineCase:
    """The offline reference of the N=1 level.

    One sequence at a time, as the server runs them at N=1: in bfloat16 a
    batch of another size can round differently and flip a greedy token
    (the 21M model does, on both sides).
    """
    return OfflineCase(
        id=case.name.replace(" ", "-"),
        checkpoint=str(checkpoint(case.size, case.case)),
        quantization=case.quantization,
        tp=case.tp,
        llm_kwargs={"max_num_seqs": 1},
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, linear between the two closest ranks.

    The same definition as numpy's default: rank ``(n - 1) * q / 100`` of
    the sorted values, so p50 is the median.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class ServerFailed(RuntimeError):
    """The server exited or hung before it answered ``/health``."""


def root_cause(log_text: str) -> str:
    """The first exception line of a failed start, in the engine's words.

    The fork's own ``bitsandbytes`` entry point fails to import on pristine
    code in every process of the bnb-plugin side (logged, then ignored), so
    that import error is no cause.
    """
    for line in log_text.splitlines():
        match = EXCEPTION_LINE.search(line)
        if match and "vllm.plugins.bitsandbytes" not in match[2]:
            return f"{match[1]}: {match[2].strip()}"
    return "no exception in the log"


def active_loaders(log_text: str) -> list[str]:
    """The BNB model loaders the server's processes registered, in order."""
    return list(dict.fromkeys(LOADER_LINE.findall(log_text)))


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise ServerFailed(
                f"did not start (exit code {proc.returncode}): "
                f"{root_cause(log.read_text(errors='replace'))}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"not ready after {STARTUP_TIMEOUT_S:.0f} s; see {log}"
                ) from None
            time.sleep(1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group: API server, engine core, workers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT_S)
    # Whatever survived the grace period, or outlived its parent.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def server(side: Side, case: ServeCase, model: Path, log: Path) -> Iterator[str]:
    """Serve ``model`` on one side on a free local port; yields the base URL.

    The server leads its own session, so leaving the context by any way
    (an error, Ctrl-C) stops its engine core and workers too.
    """
    env = worker_env(side) | offline_case(case).full_env()
    # The API server runs its engine core in a process of its own, as users
    # run it; the oracle's in-process setting does not apply.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    port = free_port()
    command = [
        side.python, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "256", "--seed", "0",
        "--dtype", "bfloat16", "--tensor-parallel-size", str(case.tp),
    ]  # fmt: skip
    if case.quantization:
        command += ["--quantization", case.quantization]
    # An empty working directory: `-m` puts it first on sys.path, and the
    # repository's vllm/ overlay must not shadow the side's vllm.
    with log.open("w") as output, tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            _wait_healthy(proc, port, log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            _stop(proc)


async def drive(
    client: openai.AsyncOpenAI,
    model: str,
    concurrency: int,
    requests: int,
    budget_s: float,
) -> dict[str, Any]:
    """``concurrency`` clients share ``requests`` completions; raw samples.

    No client starts a request after the budget; a request that has not
    ended ``REQUEST_TIMEOUT_S`` after that is cancelled and counts as lost.
    """
    samples: list[dict[str, Any]] = []
    indices = iter(range(requests))
    started = time.perf_counter()
    deadline = started + budget_s

    async def one_client() -> None:
        for index in indices:
            if time.perf_counter() > deadline:
                return
            prompt = index % len(PROMPTS)
            sample: dict[str, Any] = {"index": index, "prompt": prompt}
            samples.append(sample)
            sent = time.perf_counter()
            try:
                completion = await client.completions.create(
                    model=model,
                    prompt=list(PROMPTS[prompt]),
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
            except openai.OpenAIError as exc:
                sample["error"] = f"{type(exc).__name__}: {exc}"
                continue
            ended = time.perf_counter()
            token_ids = (completion.choices[0].model_extra or {}).get("token_ids")
            if token_ids is None or len(token_ids) != MAX_TOKENS:
                sample["error"] = f"BadCompletion: token ids {token_ids}"
                continue
            sample.update(
                latency_s=ended - sent, ended_s=ended - started, token_ids=token_ids
            )

    clients = [asyncio.create_task(one_client()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(clients, timeout=budget_s + REQUEST_TIMEOUT_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return {"concurrency": concurrency, "requested": requests, "samples": samples}


async def load_levels(base_url: str, model: str, load: Load) -> list[dict[str, Any]]:
    """A warm-up round, then rounds of every level against one server.

    The warm-up round is not counted: it pays what the engine does once
    (the first batches of every size). Rounds rather than one long level
    each: a burst of other work on a shared machine then spoils one round
    of a level, not the level, and the median drops it.
    """
    async with openai.AsyncOpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
    ) as client:
        levels = []
        for round_index in range(-1, load.rounds):
            for concurrency in LEVELS:
                requests = load.requests[concurrency]
                level = await drive(client, model, concurrency, requests, load.budget_s)
                label = f"round {round_index}" if round_index >= 0 else "warm-up"
                print(f"    {label} {level_summary(level)}")
                if round_index >= 0:
                    levels.append(level | {"round": round_index})
        return levels


def level_summary(level: dict[str, Any]) -> str:
    stats = level_stats([level], None)
    return (
        f"N={level['concurrency']:<3} {stats['completed']}/{stats['sent']} completed, "
        f"{format_value(stats['output_tokens_per_s'], '.1f')} tok/s, "
        f"p99 {format_value(stats['p99_latency_s'], '.3f')} s"
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _round_rates(level: dict[str, Any]) -> tuple[float | None, ...]:
    """Wall time, requests/s and output tokens/s of one round of a level.

    The wall time runs from the round's start to its last completion.
    """
    completed = [s for s in level["samples"] if "latency_s" in s]
    wall_s = max((s["ended_s"] for s in completed), default=None)
    if not wall_s:
        return None, None, None
    tokens = sum(len(s["token_ids"]) for s in completed)
    return wall_s, len(completed) / wall_s, tokens / wall_s


def level_stats(
    rounds: list[dict[str, Any]], offline: list[list[int]] | None
) -> dict[str, Any]:
    """Throughput, latency percentiles, failures and offline agreement.

    Throughput is the median over the rounds of the level; latency
    percentiles and counts are over all of its requests. A request that
    neither completed nor failed was lost.
    """
    samples = [s for level in rounds for s in level["samples"]]
    completed = [s for s in samples if "latency_s" in s]
    errors = [s["error"] for s in samples if "error" in s]
    walls, requests_per_s, tokens_per_s = zip(*map(_round_rates, rounds), strict=True)
    latencies = [s["latency_s"] for s in completed]
    return {
        "rounds": len(rounds),
        "requested": sum(level["requested"] for level in rounds),
        "sent": len(samples),
        "completed": len(completed),
        "errors": len(errors),
        "lost": len(samples) - len(completed) - len(errors),
        "first_error": errors[0] if errors else None,
        "round_wall_s": list(walls),
        "round_output_tokens_per_s": list(tokens_per_s),
        "requests_per_s": _median(requests_per_s),
        "output_tokens_per_s": _median(tokens_per_s),
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "same_as_offline": (
            None
            if offline is None
            else sum(s["token_ids"] == offline[s["prompt"]] for s in completed)
        ),
    }


def run_side(side: Side, case: ServeCase, load: Load, logs: Path) -> dict[str, Any]:
    """Offline generation, then the server under every level, of one side."""
    model = checkpoint(case.size, case.case)
    offline = run_case(offline_case(case), side)
    result: dict[str, Any] = {"error": None, "levels": []}
    if offline["status"] == "ok":
        result["offline"] = [g["token_ids"] for g in offline["generation"]]
    else:
        error = offline["error"]
        result["offline_error"] = f"{error['type']}: {error['message']}"
    log = logs / f"serve-{side.name}-{case.name.replace(' ', '-')}.log"
    started = time.perf_counter()
    try:
        with server(side, case, model, log) as base_url:
            result["start_s"] = time.perf_counter() - started
            print(f"  {side.name} serving {case.name} ({result['start_s']:.0f} s)")
            result["levels"] = asyncio.run(load_levels(base_url, str(model), load))
    except ServerFailed as exc:
        result["error"] = f"server {exc}"
        print(f"  {side.name} {case.name}: {result['error']}")
    result["log"] = str(log)
    result["loaders"] = active_loaders(log.read_text(errors="replace"))
    if not result["error"] and result["loaders"] != [EXPECTED_LOADERS[side.name]]:
        result["error"] = f"wrong BNB plugin active: loaders {result['loaders']}"
    return result


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case and level: each side's statistics, fork/reference."""
    rows = []
    for run in runs:
        for concurrency in LEVELS:
            row: dict[str, Any] = {"case": run["case"], "concurrency": concurrency}
            for side in SIDES:
                outcome = run["sides"][side]
                rounds = [
                    level
                    for level in outcome["levels"]
                    if level["concurrency"] == concurrency
                ]
                offline = (
                    outcome.get("offline") if concurrency == OFFLINE_LEVEL else None
                )
                row[side] = (
                    level_stats(rounds, offline)
                    if rounds
                    else {"error": outcome["error"] or "not run"}
                )
            row["ratio_output_tokens_per_s"] = ratio_of(
                row["fork"].get("output_tokens_per_s"),
                row[REFERENCE].get("output_tokens_per_s"),
            )
            rows.append(row)
    return rows


def failures(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """Why the run fails: lost or failed requests at the gate level, a fork
    that does not serve, or a reference that fails where offline it runs.

    A reference side whose offline engine fails too refuses the case (e.g.
    vllm-bnb-plugin with a pre-quantized checkpoint at TP > 1): recorded in
    the table, not a failure of this run.
    """
    found = []
    for run in runs:
        for side in SIDES:
            outcome = run["sides"][side]
            refused = side == REFERENCE and "offline_error" in outcome
            if outcome["error"] and not refused:
                found.append(f"{run['case']} {side}: {outcome['error']}")
    for row in rows:
        if row["concurrency"] != GATE_LEVEL:
            continue
        for side in SIDES:
            stats = row[side]
            if stats.get("errors") or stats.get("lost"):
                found.append(
                    f"{row['case']} {side} N={GATE_LEVEL}: {stats['errors']} failed "
                    f"({stats['first_error']}), {stats['lost']} lost"
                )
    return found


def _side_cells(stats: dict[str, Any]) -> list[str]:
    """req/s, tok/s, p50 ms, p99 ms, failed/lost, offline agreement."""
    if "completed" not in stats:
        return [stats["error"], "-", "-", "-", "-", "-"]
    agreement = stats["same_as_offline"]
    return [
        format_value(stats["requests_per_s"], ".2f"),
        format_value(stats["output_tokens_per_s"], ".1f"),
        format_value(_scaled(stats["p50_latency_s"], 1e3), ".0f"),
        format_value(_scaled(stats["p99_latency_s"], 1e3), ".0f"),
        f"{stats['errors']}/{stats['lost']}",
        "-" if agreement is None else f"{agreement}/{stats['completed']}",
    ]


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def table(rows: list[dict[str, Any]], descriptions: dict[str, str] | None) -> str:
    """Markdown table, one row per case and level, sides side by side."""
    fields = ("req/s", "out tok/s", "p50 ms", "p99 ms", "failed/lost", "= offline")
    headers = ["case", "N", *(f"{side} {f}" for side in SIDES for f in fields)]
    headers.append(f"fork/{REFERENCE} tok/s")
    lines = [markdown_row(headers), "|---|" + "--:|" * (len(headers) - 1)]
    for row in rows:
        cells = [row["case"], str(row["concurrency"])]
        for side in SIDES:
            cells += _side_cells(row[side])
        cells.append(format_value(row["ratio_output_tokens_per_s"], ".2f"))
        lines.append(markdown_row(cells))
    lines += [
        "",
        (
            f"{MAX_TOKENS} output tokens per request; N concurrent clients; "
            "req/s and tok/s: median over the rounds, latencies over all requests; "
            "failed/lost = requests that failed / never ended; "
            f"= offline: completions at N={OFFLINE_LEVEL} with the token ids of the "
            "side's own offline `LLM.generate`, one sequence at a time; "
            f"target fork/{REFERENCE} >= {TARGET_RATIO}."
        ),
    ]
    differing = [
        f"{row['case']} {side}"
        for row in rows
        for side in SIDES
        if row[side].get("same_as_offline") not in (None, row[side].get("completed"))
    ]
    if differing:
        lines += [
            "",
            (
                f"WARNING: at N={OFFLINE_LEVEL} completions differ from offline "
                f"generation: {', '.join(differing)}."
            ),
        ]
    if descriptions:
        lines += [
            "",
            "Sides: "
            + "; ".join(f"{side} = {text}" for side, text in descriptions.items())
            + ".",
        ]
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Output tokens/s and p99 latency against concurrency, per case and side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        ("output_tokens_per_s", "output tokens/s", 1.0),
        ("p99_latency_s", "p99 latency (ms)", 1e3),
    )
    for ax, (field, title, factor) in zip(axes, panels, strict=True):
        for case in dict.fromkeys(row["case"] for row in rows):
            for side, style in zip(SIDES, ("-o", "--s"), strict=True):
                points = [
                    (row["concurrency"], row[side][field] * factor)
                    for row in rows
                    if row["case"] == case and row[side].get(field) is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=f"{side} {case}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(LEVELS), [str(n) for n in LEVELS])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"vllm serve under load: fork vs {REFERENCE}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="nf4 tiny model, TP=1 (CI, default)"
    )
    mode.add_argument(
        "--full", action="store_true", help="+ 21M in-flight and nf4, TP=2"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "benchmarks", help="output dir"
    )
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick"
    cases, load = (FULL_CASES, FULL_LOAD) if args.full else (QUICK_CASES, QUICK_LOAD)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    load_before = os.getloadavg()
    code_before = code_identities()
    descriptions = {side.name: describe(side) for side in sides()}
    runs = []
    for index, case in enumerate(cases):
        print(f"{case.name}:")
        outcomes = {
            side.name: run_side(side, case, load, logs)
            for side in side_order(sides(), 0, index)
        }
        runs.append({"case": case.name, "sides": outcomes})
    rows = summarize(runs)
    failed = failures(runs, rows)
    # A reinstall of the fork mid-run would mix two versions in one table.
    code_changed = code_identities() != code_before
    report: dict[str, Any] = {
        "mode": name,
        "command": " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "load": dataclasses.asdict(load),
        "max_tokens": MAX_TOKENS,
        "sides": descriptions,
        "code": code_before,
        "code_changed_during_run": code_changed,
        "rows": rows,
        "failures": failed,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }

    text = table(rows, descriptions)
    refusals = [
        f"- {run['case']} {REFERENCE}: {run['sides'][REFERENCE]['error']}"
        for run in runs
        if run["sides"][REFERENCE]["error"]
        and "offline_error" in run["sides"][REFERENCE]
    ]
    if refusals:
        text += "\n\nRefused by the side (offline too):\n" + "\n".join(refusals)
    if failed:
        text += "\n\nFAILED:\n" + "\n".join(f"- {f}" for f in failed)
    if code_changed:
        text += "\n\nWARNING: a side's vllm tree changed during the run."
    print(text)
    (args.out / f"serve_load_{name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"serve_load_{name}.md").write_text(text + "\n")
    chart(rows, args.out / f"serve_load_{name}.png")
    print(
        f"wrote {args.out}/serve_load_{name}.{{json,md,png}} "
        f"in {report['wall_s']:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
