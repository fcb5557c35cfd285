# SPDX-License-Identifier: Apache-2.0
"""Whole-model load time of the fork against pristine upstream vLLM 0.27.1.

Usage::

    python -m benchmarks.load_time [--quick | --full] [--repeat N] [--out DIR]

Every load runs in its own process on each side (``load_worker.py``) and is
timed around the model loader alone, so engine start-up does not drown the
difference. The sides alternate within one run (the order flips with every
case and repetition) and each number is the median of ``N`` repetitions, so
drift on a shared machine hits both sides alike; ratios fork/upstream come
from the same run. Nothing here is asserted: wall times are reported only.

Cases: unquantized, in-flight bitsandbytes 4-bit and pre-quantized nf4 and
8-bit checkpoints, on synthetic Llamas of increasing size. Also measured:
plugin registration (``import vllm``, the engine arguments, then
``load_general_plugins()``, which vLLM calls from there) and the
memory-copy bandwidth of this machine, the ceiling for load throughput.

Without ``--quick``/``--full`` it runs the quick matrix and then generates
text once through the real engine with the fork (the README's main job).
``--full`` also times the engine start of the unquantized tiny model on both
sides, alternating: plugin registration in every engine process included.
"""

import argparse
import configparser
import dataclasses
import importlib.metadata
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from tests.fixtures.checkpoints import CHECKPOINTS, cached_build, get_checkpoint
from tests.oracle.harness import (
    REPO,
    Side,
    fork,
    side_identity,
    upstream,
)

WORKER = Path(__file__).with_name("load_worker.py")
QUICK_SIZES = ("llama", "llama-bench-21m")
FULL_SIZES = (*QUICK_SIZES, "llama-bench-100m", "llama-bench-380m")
QUICK_REPEAT, FULL_REPEAT = 3, 5
# Engine starts of the unquantized tiny model per side (--full only), ~15 s each.
ENGINE_START_REPEAT = 3
# case -> (quantization= argument, registered BNB checkpoint whose config
# pre-quantizes the size's base model, or None to load the base model).
CASES: dict[str, tuple[str | None, str | None]] = {
    "unquantized": (None, None),
    "bnb4-inflight": ("bitsandbytes", None),
    "nf4-prequant": (None, "llama-bnb-nf4"),
    "int8-prequant": (None, "llama-bnb-int8"),
}
# Timed by each zygote at start-up (see load_worker.serve).
REGISTRATION_FIELDS = ("import_s", "engine_args_s", "plugins_s", "loader_imports_s")
PLUGIN_GROUP = "vllm.general_plugins"
COPY_BYTES = 2**30
GB = 1e9
# A generous per-request limit: only catches a hung worker.
REQUEST_TIMEOUT_S = 900


def checkpoint(size: str, case: str) -> Path:
    """The checkpoint of ``case`` at ``size`` (built and cached on first use)."""
    quantized_like = CASES[case][1]
    if quantized_like is None:
        return get_checkpoint(size)
    spec = dataclasses.replace(CHECKPOINTS[quantized_like], base=size)
    return cached_build(f"{size}{quantized_like.removeprefix('llama')}", spec)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def warm_page_cache(path: Path) -> None:
    """Read the weights once so no side pays for the first disk read."""
    for file in path.glob("*.safetensors"):
        with file.open("rb") as f:
            while f.read(1 << 24):
                pass


def copy_bandwidth_gbs(repeat: int = 5) -> float:
    """Median throughput of copying a 1 GiB tensor (bytes copied per second)."""
    import torch

    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return COPY_BYTES / statistics.median(times) / GB


def code_identities() -> dict[str, Any]:
    """Fingerprints of both sides' vllm trees, read afresh (not cached)."""
    side_identity.cache_clear()
    return {side.name: side_identity(side) for side in (fork(), upstream())}


def declared_plugins(side: Side) -> str:
    """The general plugins the side's own vllm distribution declares.

    Both sides run in one environment, which also holds the fork's entry
    points and the test suite's toy plugin; each side is limited to what its
    own dist-info declares (upstream: its two LoRA resolvers; the fork: those
    and bitsandbytes), so both register exactly what their installation would.
    """
    if side.tree is None:
        return ",".join(
            entry_point.name
            for entry_point in importlib.metadata.distribution("vllm").entry_points
            if entry_point.group == PLUGIN_GROUP
        )
    names: list[str] = []
    for entry_points in side.tree.glob("*.dist-info/entry_points.txt"):
        parser = configparser.ConfigParser()
        parser.read(entry_points)
        if parser.has_section(PLUGIN_GROUP):
            names += parser.options(PLUGIN_GROUP)
    return ",".join(names)


class Zygote:
    """A ``load_worker.py serve`` process of one side; forks one load each."""

    def __init__(self, side: Side, log: IO[str]) -> None:
        env = side.env()
        env["VLLM_PLUGINS"] = declared_plugins(side)
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [side.python, str(WORKER), "serve", str(write_fd)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            cwd=tempfile.gettempdir(),
            text=True,
        )
        os.close(write_fd)
        self.responses = os.fdopen(read_fd)
        self.log = log
        self.registration = self._response()

    def _response(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.responses], [], [], REQUEST_TIMEOUT_S)
        line = self.responses.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(
                f"load worker died or hung ({self.proc.wait()}); see {self.log.name}"
            )
        return json.loads(line)

    def load(self, model: Path, quantization: str | None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request = {"model": str(model), "quantization": quantization}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._response()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(REQUEST_TIMEOUT_S)
        self.responses.close()


@contextmanager
def zygotes(sides: list[Side], logs: Path, tag: str) -> Iterator[dict[str, Zygote]]:
    """Start one zygote per side, one after another (their imports are timed)."""
    with ExitStack() as stack:
        started = {}
        for side in sides:
            log = stack.enter_context((logs / f"{side.name}-{tag}.log").open("w"))
            started[side.name] = Zygote(side, log)
            stack.callback(started[side.name].close)
        yield started


def measure(
    sizes: tuple[str, ...], repeat: int, logs: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Alternate sides over every (size, case) and repetition: raw samples."""
    matrix = [(size, case) for size in sizes for case in CASES]
    paths = {key: checkpoint(*key) for key in matrix}
    loads: list[dict[str, Any]] = []
    registrations: list[dict[str, Any]] = []
    for rep in range(repeat):
        sides = [fork(), upstream()] if rep % 2 == 0 else [upstream(), fork()]
        with zygotes(sides, logs, f"rep{rep}") as running:
            for side in sides:
                registrations.append(
                    {"side": side.name, "rep": rep, **running[side.name].registration}
                )
            for index, key in enumerate(matrix):
                warm_page_cache(paths[key])
                order = sides if index % 2 == 0 else sides[::-1]
                for side in order:
                    quantization = CASES[key[1]][0]
                    result = running[side.name].load(paths[key], quantization)
                    loads.append(
                        {"side": side.name, "size": key[0], "case": key[1]}
                        | {"rep": rep, "bytes": checkpoint_bytes(paths[key])}
                        | result
                    )
                    shown = result.get("error") or f"{result['load_s']:.3f} s"
                    print(f"  rep {rep} {side.name:8} {key[0]:17} {key[1]:14} {shown}")
    return loads, registrations


def _median(samples: list[dict[str, Any]], field: str) -> float | None:
    values = [s[field] for s in samples if field in s]
    return statistics.median(values) if values else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _paired_ratio(samples: list[dict[str, Any]]) -> float | None:
    """Median over repetitions of fork/upstream, each pair run back to back."""
    by_rep: dict[int, dict[str, float]] = {}
    for sample in samples:
        if "load_s" in sample:
            by_rep.setdefault(sample["rep"], {})[sample["side"]] = sample["load_s"]
    ratios = [p["fork"] / p["upstream"] for p in by_rep.values() if len(p) == 2]
    return statistics.median(ratios) if ratios else None


def _geomean(ratios: list[float | None]) -> float | None:
    present = [r for r in ratios if r is not None]
    return statistics.geometric_mean(present) if present else None


def summarize(
    loads: list[dict[str, Any]], registrations: list[dict[str, Any]]
) -> dict[str, Any]:
    """Medians per side, ratios fork/upstream, throughput from median times."""
    rows = []
    keys = dict.fromkeys((s["size"], s["case"]) for s in loads)
    for size, case in keys:
        row: dict[str, Any] = {"size": size, "case": case}
        for side in ("fork", "upstream"):
            samples = [
                s
                for s in loads
                if (s["side"], s["size"], s["case"]) == (side, size, case)
            ]
            errors = [s["error"] for s in samples if "error" in s]
            load_s = _median(samples, "load_s")
            times = [s["load_s"] for s in samples if "load_s" in s]
            row[side] = {
                "load_s": load_s,
                "min_load_s": min(times, default=None),
                "load_cpu_s": _median(samples, "load_cpu_s"),
                "peak_rss_mib": _median(samples, "peak_rss_mib"),
                "gbs": samples[0]["bytes"] / load_s / GB if load_s else None,
                "samples": len(samples) - len(errors),
                "error": errors[0] if errors else None,
            }
            row["bytes"] = samples[0]["bytes"]
        for field in ("load_s", "min_load_s", "load_cpu_s", "peak_rss_mib"):
            row[f"ratio_{field}"] = _ratio(row["fork"][field], row["upstream"][field])
        row["paired_ratio_load_s"] = _paired_ratio(
            [s for s in loads if (s["size"], s["case"]) == (size, case)]
        )
        rows.append(row)
    geomeans = {
        field: {
            "unquantized": _geomean(
                [r[field] for r in rows if r["case"] == "unquantized"]
            ),
            "bitsandbytes": _geomean(
                [r[field] for r in rows if r["case"] != "unquantized"]
            ),
        }
        for field in ("ratio_load_s", "paired_ratio_load_s")
    }
    registration: dict[str, Any] = {}
    for side in ("fork", "upstream"):
        samples = [r for r in registrations if r["side"] == side]
        stats = {field: _median(samples, field) for field in REGISTRATION_FIELDS}
        stats["total_s"] = sum(
            stats[field] for field in ("import_s", "engine_args_s", "plugins_s")
        )
        stats["ready_s"] = stats["total_s"] + stats["loader_imports_s"]
        registration[side] = stats
    return {
        "rows": rows,
        "geomean_ratio_load_s": geomeans,
        "registration": registration,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(
    summary: dict[str, Any], copy_gbs: float, engine_start: dict[str, Any] | None
) -> str:
    """Markdown table of medians and ratios (also pasted into the docs)."""
    lines = [
        "| model | case | ckpt MB | fork load s | upstream load s | ratio "
        "| paired ratio | ratio of minima | fork GB/s | upstream GB/s "
        "| fork peak RSS MiB | upstream peak RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    errors = []
    for row in summary["rows"]:
        ours, theirs = row["fork"], row["upstream"]
        for side, stats in (("fork", ours), ("upstream", theirs)):
            if stats["error"]:
                errors.append(f"{row['size']} {row['case']} {side}: {stats['error']}")
        lines.append(
            f"| {row['size']} | {row['case']} | {row['bytes'] / 1e6:.1f} "
            f"| {_fmt(ours['load_s'], '.3f')} | {_fmt(theirs['load_s'], '.3f')} "
            f"| {_fmt(row['ratio_load_s'], '.2f')} "
            f"| {_fmt(row['paired_ratio_load_s'], '.2f')} "
            f"| {_fmt(row['ratio_min_load_s'], '.2f')} "
            f"| {_fmt(ours['gbs'], '.2f')} | {_fmt(theirs['gbs'], '.2f')} "
            f"| {_fmt(ours['peak_rss_mib'], '.0f')} "
            f"| {_fmt(theirs['peak_rss_mib'], '.0f')} |"
        )
    reg = summary["registration"]
    geomeans = "; ".join(
        f"{field.removesuffix('_load_s').replace('_', ' ')}: "
        + ", ".join(f"{group} {_fmt(v, '.2f')}" for group, v in by_group.items())
        for field, by_group in summary["geomean_ratio_load_s"].items()
    )
    lines += [
        "",
        f"Geometric means over the rows, fork/upstream: {geomeans}.",
        "",
        f"Memory-copy bandwidth of this machine: {copy_gbs:.2f} GB/s "
        "(median torch copy of a 1 GiB tensor).",
        "",
        "| plugin registration | fork s | upstream s | ratio |",
        "|---|--:|--:|--:|",
    ]
    for field, label in (
        ("import_s", "`import vllm`"),
        ("engine_args_s", "then `import vllm.engine.arg_utils`"),
        ("plugins_s", "then `load_general_plugins()`"),
        ("total_s", "registration total"),
        ("loader_imports_s", "then import the loader modules"),
        ("ready_s", "total until ready to load"),
    ):
        ours, theirs = reg["fork"][field], reg["upstream"][field]
        lines.append(
            f"| {label} | {_fmt(ours, '.3f')} | {_fmt(theirs, '.3f')} "
            f"| {_fmt(_ratio(ours, theirs), '.2f')} |"
        )
    if engine_start:
        start = engine_start["medians"]
        lines += [
            "",
            "| engine start, unquantized `llama` | fork s | upstream s | ratio |",
            "|---|--:|--:|--:|",
        ]
        for field, label in (
            ("import_s", "`from vllm import LLM`"),
            ("engine_start_s", "`LLM(...)` until ready"),
        ):
            ours, theirs = start["fork"][field], start["upstream"][field]
            lines.append(
                f"| {label} | {_fmt(ours, '.2f')} | {_fmt(theirs, '.2f')} "
                f"| {_fmt(_ratio(ours, theirs), '.2f')} |"
            )
        if not engine_start["same_tokens"]:
            lines += ["", "WARNING: the engine starts generated different tokens."]
    if errors:
        lines += ["", "Errors (first per cell):", *(f"- {e}" for e in errors)]
    if summary["code_changed_during_run"]:
        lines += ["", "WARNING: a side's vllm tree changed during the run."]
    return "\n".join(lines)


def chart(summary: dict[str, Any], copy_gbs: float, path: Path) -> None:
    """Bars per (model, case): median load time, throughput, peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [f"{r['size'].removeprefix('llama-bench-')}\n{r['case']}" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, len(rows) * 0.9), 11))
    panels = (
        (
            "load_s",
            "median load time (s); numbers: fork/upstream ratio of medians "
            "(median paired ratio)",
            True,
        ),
        ("gbs", "load throughput (checkpoint GB / median load s)", True),
        ("peak_rss_mib", "median peak RSS of the loading process (MiB)", False),
    )
    for ax, (field, title, log_scale) in zip(axes, panels, strict=True):
        for offset, side in ((-0.2, "fork"), (0.2, "upstream")):
            values = [r[side][field] or 0 for r in rows]
            ax.bar([i + offset for i in x], values, width=0.4, label=side)
        if field == "load_s":
            for i, row in enumerate(rows):
                if row["ratio_load_s"] is not None:
                    top = max(row["fork"]["load_s"], row["upstream"]["load_s"])
                    label = (
                        f"{row['ratio_load_s']:.2f}\n({row['paired_ratio_load_s']:.2f})"
                    )
                    ax.annotate(label, (i, top), ha="center", fontsize=7)
        if field == "gbs":
            ax.axhline(copy_gbs, color="gray", linestyle="--", label="memory copy")
        ax.set_title(title)
        ax.set_xticks(list(x), labels, fontsize=7)
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    reg = summary["registration"]
    fig.suptitle(
        "vLLM 0.27.1 fork vs upstream, medians of alternating runs; plugin "
        f"registration {reg['fork']['total_s']:.2f} s vs "
        f"{reg['upstream']['total_s']:.2f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate(side: Side, model: Path, log: Path) -> dict[str, Any]:
    """Start the real engine on one side and generate greedily."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "generation.json")
        env = side.env()
        env["VLLM_PLUGINS"] = declared_plugins(side)
        with log.open("w") as output:
            subprocess.run(
                [side.python, str(WORKER), "generate", str(model), str(out)],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                check=True,
                timeout=REQUEST_TIMEOUT_S,
            )
        return json.loads(out.read_text())


def engine_starts(model: Path, repeat: int, logs: Path) -> dict[str, Any]:
    """Engine start-up of an unquantized model, sides alternating: medians."""
    samples: list[dict[str, Any]] = []
    for rep in range(repeat):
        for side in [fork(), upstream()] if rep % 2 == 0 else [upstream(), fork()]:
            result = generate(side, model, logs / f"{side.name}-engine{rep}.log")
            samples.append({"side": side.name, "rep": rep, **result})
            print(
                f"  engine start {rep} {side.name:8} {result['engine_start_s']:.2f} s"
            )
    medians = {
        side: {
            field: _median([s for s in samples if s["side"] == side], field)
            for field in ("import_s", "engine_start_s")
        }
        for side in ("fork", "upstream")
    }
    same_tokens = len({tuple(s["token_ids"]) for s in samples}) == 1
    return {"medians": medians, "same_tokens": same_tokens, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_time", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny + 21M models (CI)")
    mode.add_argument("--full", action="store_true", help="add 100M and 380M")
    parser.add_argument("--repeat", type=int, help="repetitions per side and case")
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "benchmarks", help="output dir"
    )
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick" if args.quick else "default"
    sizes = FULL_SIZES if args.full else QUICK_SIZES
    repeat = args.repeat or (FULL_REPEAT if args.full else QUICK_REPEAT)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    code_before = code_identities()
    copy_gbs = copy_bandwidth_gbs()
    print(f"memory-copy bandwidth: {copy_gbs:.2f} GB/s; {name} run, {repeat} reps")
    loads, registrations = measure(sizes, repeat, logs)
    summary = summarize(loads, registrations)
    # A reinstall of the fork mid-run would mix two versions in one table.
    summary["code_changed_during_run"] = code_identities() != code_before
    report: dict[str, Any] = {
        "mode": name,
        "repeat": repeat,
        "command": " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "copy_bandwidth_gbs": copy_gbs,
        },
        "code": code_before,
        **summary,
        "samples": {"loads": loads, "registrations": registrations},
    }
    if name == "full":
        report["engine_start"] = engine_starts(
            get_checkpoint(QUICK_SIZES[0]), ENGINE_START_REPEAT, logs
        )
    if name == "default":
        generation = generate(
            fork(), get_checkpoint(QUICK_SIZES[0]), logs / "fork-generate.log"
        )
        print(f"fork generated from {generation['prompt']!r}:")
        print(f"  token ids: {generation['token_ids']}")
        print(f"  text: {generation['text']!r}")
        report["generation"] = generation
    report["wall_s"] = time.perf_counter() - started

    text = table(summary, copy_gbs, report.get("engine_start"))
    print(text)
    (args.out / f"load_time_{name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"load_time_{name}.md").write_text(text + "\n")
    chart(summary, copy_gbs, args.out / f"load_time_{name}.png")
    print(
        f"wrote {args.out}/load_time_{name}.{{json,md,png}} in {report['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
