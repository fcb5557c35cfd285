# SPDX-License-Identifier: Apache-2.0
"""Whole-model load time of the fork against what users run without it.

Usage::

    python -m benchmarks.load_time [--quick | --full] [--repeat N] [--out DIR]

Three sides, in one run:

- ``fork``: the installed fork (bitsandbytes as its in-tree plugin);
- ``bnb-plugin``: pristine vLLM 0.32.0 with the out-of-tree
  ``vllm-bnb-plugin``, what users of bitsandbytes run on 0.32.0;
- ``legacy``: pristine vLLM 0.27.1, the last release with bitsandbytes in
  core.

In the unquantized rows the ``bnb-plugin`` side is the reference that
matters, pristine 0.32.0: the plugin is registered there but takes no part in
an unquantized load (its registration cost is in the registration table).

Every load runs in its own process on each side (``load_worker.py``) and is
timed around the model loader alone, so engine start-up does not drown the
difference. The sides alternate within one run: the order rotates with every
repetition and reverses with every case, so over three repetitions every side
takes every place in every case's order once (and two neighbouring cases run
all six orders), and drift on a shared machine hits all sides alike. Each
number is the median of ``N`` repetitions; ratios fork/other come from the
same run. A side that refuses or fails a case is reported as such in the
table; nothing here is asserted: wall times are reported only.

Cases: unquantized, in-flight bitsandbytes 4-bit and pre-quantized nf4 and
8-bit checkpoints, on a synthetic 21M Llama (``--full``: from the 2-layer
test model to 380M). Also measured:
plugin registration (``import vllm``, the engine arguments, then
``load_general_plugins()``, which vLLM calls from there) and the
memory-copy bandwidth of this machine, the ceiling for load throughput.

Without ``--quick``/``--full`` it runs the quick matrix and then generates
text once through the real engine with the fork (the README's main job).
``--full`` also times the engine start of the unquantized tiny model on every
side, alternating: plugin registration in every engine process included.
"""

import argparse
import configparser
import contextlib
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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from tests.fixtures.checkpoints import CHECKPOINTS, cached_build, get_checkpoint
from tests.oracle.harness import (
    REPO,
    Side,
    bnb_plugin,
    cache_dir,
    fork,
    legacy,
    side_identity,
)

WORKER = Path(__file__).with_name("load_worker.py")
# The default and quick matrix: one size, so that three sides and three
# repetitions stay within CI's few minutes.
QUICK_SIZES = ("llama-bench-21m",)
FULL_SIZES = ("llama", "llama-bench-21m", "llama-bench-100m", "llama-bench-380m")
# Multiples of three: every side takes every position in the order equally.
QUICK_REPEAT, FULL_REPEAT = 3, 6
# The model the engine runs (--full's engine starts, the default generation).
ENGINE_MODEL = "llama"
# Engine starts of ENGINE_MODEL, unquantized, per side (--full only).
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
# Per-row statistics compared as fork/other.
RATIO_FIELDS = ("load_s", "min_load_s", "load_cpu_s", "peak_rss_mib")
PLUGIN_GROUP = "vllm.general_plugins"
COPY_BYTES = 2**30
GB = 1e9
# A generous per-request limit: only catches a hung worker.
REQUEST_TIMEOUT_S = 900


def sides() -> list[Side]:
    """The compared sides, the fork first (the first repetition's order)."""
    return [fork(), bnb_plugin(), legacy()]


SIDES = tuple(side.name for side in sides())
# What the fork's numbers are divided by.
REFERENCES = SIDES[1:]


def side_order(ordered: Sequence[Side], rep: int, index: int) -> list[Side]:
    """The order of one case: rotated by repetition, reversed on odd cases.

    For three sides, three repetitions of an even and an odd case run all
    six orders once, so no side always goes first or follows the same one.
    """
    shift = rep % len(ordered)
    rotated = [*ordered[shift:], *ordered[:shift]]
    return rotated if index % 2 == 0 else rotated[::-1]


def describe(side: Side) -> str:
    """What a side runs: the installed vllm, or the dists of its trees."""
    if not side.trees:
        return f"installed vllm {importlib.metadata.version('vllm')}"
    dists = [
        dist_info.name.removesuffix(".dist-info")
        for tree in side.trees
        for dist_info in sorted(tree.glob("*.dist-info"))
    ]
    return "pristine " + " + ".join(dists)


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
    """Fingerprints of every side's vllm tree and key dependencies, afresh."""
    side_identity.cache_clear()
    # The identity also hashes the oracle's run_case.py, which no load runs.
    return {
        side.name: {k: v for k, v in side_identity(side).items() if k != "run_case"}
        for side in sides()
    }


def declared_plugins(side: Side) -> str:
    """The general plugins the side's own distributions declare.

    All sides run in one environment, which also holds the fork's entry
    points and the test suite's toy plugin; each side is limited to what the
    dist-infos of its own trees declare (pristine vLLM: its two LoRA
    resolvers; with ``vllm-bnb-plugin``: those and its ``bitsandbytes``; the
    fork: the resolvers and its in-tree ``bitsandbytes``), so every side
    registers exactly what its installation would.
    """
    if not side.trees:
        return ",".join(
            entry_point.name
            for entry_point in importlib.metadata.distribution("vllm").entry_points
            if entry_point.group == PLUGIN_GROUP
        )
    names: list[str] = []
    for tree in side.trees:
        for entry_points in sorted(tree.glob("*.dist-info/entry_points.txt")):
            parser = configparser.ConfigParser()
            parser.read(entry_points)
            if parser.has_section(PLUGIN_GROUP):
                names += parser.options(PLUGIN_GROUP)
    return ",".join(dict.fromkeys(names))


def worker_env(side: Side) -> dict[str, str]:
    """Environment of a side's worker: its own plugins and its own cache.

    vLLM caches what it learns about a model class under ``VLLM_CACHE_ROOT``
    keyed by the class's source; sides whose sources differ would evict each
    other's entries, and every load after another side's would spend seconds
    re-inspecting the class in a subprocess. A user's single installation
    keeps its entries, so each side gets its own lasting cache.
    """
    env = side.env()
    env["VLLM_PLUGINS"] = declared_plugins(side)
    env["VLLM_CACHE_ROOT"] = str(cache_dir().parent / "benchmark-vllm" / side.name)
    return env


class Zygote:
    """A ``load_worker.py serve`` process of one side; forks one load each.

    A worker that dies or hangs is not fatal: its registration and every
    load asked of it afterwards become an error, which the table reports.
    """

    def __init__(self, side: Side, log: IO[str]) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [side.python, str(WORKER), "serve", str(write_fd)],
            env=worker_env(side),
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
        self.error: str | None = None
        self.registration = self._response()

    def _response(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.responses], [], [], REQUEST_TIMEOUT_S)
        line = self.responses.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.error = (
                f"WorkerDied: load worker died or hung (exit code "
                f"{self.proc.wait()}); see {self.log.name}"
            )
            return {"error": self.error}
        return json.loads(line)

    def load(self, model: Path, quantization: str | None) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        assert self.proc.stdin is not None
        request = {"model": str(model), "quantization": quantization}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: _response says so
        return self._response()

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(REQUEST_TIMEOUT_S)
        self.responses.close()


@contextmanager
def zygotes(ordered: list[Side], logs: Path, tag: str) -> Iterator[dict[str, Zygote]]:
    """Start one zygote per side, one after another (their imports are timed)."""
    with ExitStack() as stack:
        started = {}
        for side in ordered:
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
        ordered = side_order(sides(), rep, 0)
        with zygotes(ordered, logs, f"rep{rep}") as running:
            for side in ordered:
                registrations.append(
                    {"side": side.name, "rep": rep, **running[side.name].registration}
                )
            for index, key in enumerate(matrix):
                warm_page_cache(paths[key])
                for side in side_order(sides(), rep, index):
                    quantization = CASES[key[1]][0]
                    result = running[side.name].load(paths[key], quantization)
                    loads.append(
                        {"side": side.name, "size": key[0], "case": key[1]}
                        | {"rep": rep, "bytes": checkpoint_bytes(paths[key])}
                        | result
                    )
                    shown = result.get("error") or f"{result['load_s']:.3f} s"
                    print(f"  rep {rep} {side.name:10} {key[0]:17} {key[1]:14} {shown}")
    return loads, registrations


def _median(samples: list[dict[str, Any]], field: str) -> float | None:
    values = [s[field] for s in samples if s.get(field) is not None]
    return statistics.median(values) if values else None


def ratio_of(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _paired_ratio(samples: list[dict[str, Any]], reference: str) -> float | None:
    """Median over repetitions of fork/reference, both from one repetition."""
    by_rep: dict[int, dict[str, float]] = {}
    for sample in samples:
        if "load_s" in sample:
            by_rep.setdefault(sample["rep"], {})[sample["side"]] = sample["load_s"]
    ratios = [
        p["fork"] / p[reference]
        for p in by_rep.values()
        if "fork" in p and reference in p
    ]
    return statistics.median(ratios) if ratios else None


def _geomean(ratios: list[float | None]) -> float | None:
    present = [r for r in ratios if r is not None]
    return statistics.geometric_mean(present) if present else None


def _side_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [s["error"] for s in samples if "error" in s]
    load_s = _median(samples, "load_s")
    times = [s["load_s"] for s in samples if "load_s" in s]
    return {
        "load_s": load_s,
        "min_load_s": min(times, default=None),
        "load_cpu_s": _median(samples, "load_cpu_s"),
        "peak_rss_mib": _median(samples, "peak_rss_mib"),
        "rss_after_load_mib": _median(samples, "rss_after_load_mib"),
        "gbs": samples[0]["bytes"] / load_s / GB if samples and load_s else None,
        "samples": len(samples) - len(errors),
        "error": errors[0] if errors else None,
    }


def _registration_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        field: _median(samples, field) for field in REGISTRATION_FIELDS
    }
    parts = [stats[field] for field in ("import_s", "engine_args_s", "plugins_s")]
    stats["total_s"] = sum(parts) if None not in parts else None
    stats["ready_s"] = (
        stats["total_s"] + stats["loader_imports_s"]
        if stats["total_s"] is not None and stats["loader_imports_s"] is not None
        else None
    )
    errors = [s["error"] for s in samples if "error" in s]
    stats["error"] = errors[0] if errors else None
    return stats


def summarize(
    loads: list[dict[str, Any]], registrations: list[dict[str, Any]]
) -> dict[str, Any]:
    """Medians per side, ratios fork/reference, throughput from median times."""
    rows = []
    keys = dict.fromkeys((s["size"], s["case"]) for s in loads)
    for size, case in keys:
        cell = [s for s in loads if (s["size"], s["case"]) == (size, case)]
        row: dict[str, Any] = {"size": size, "case": case, "bytes": cell[0]["bytes"]}
        for side in SIDES:
            row[side] = _side_stats([s for s in cell if s["side"] == side])
        row["vs"] = {
            reference: {
                **{
                    f"ratio_{field}": ratio_of(
                        row["fork"][field], row[reference][field]
                    )
                    for field in RATIO_FIELDS
                },
                "paired_ratio_load_s": _paired_ratio(cell, reference),
            }
            for reference in REFERENCES
        }
        rows.append(row)
    geomeans = {
        reference: {
            field: {
                "unquantized": _geomean(
                    [
                        r["vs"][reference][field]
                        for r in rows
                        if r["case"] == "unquantized"
                    ]
                ),
                "bitsandbytes": _geomean(
                    [
                        r["vs"][reference][field]
                        for r in rows
                        if r["case"] != "unquantized"
                    ]
                ),
            }
            for field in ("ratio_load_s", "paired_ratio_load_s")
        }
        for reference in REFERENCES
    }
    registration = {
        side: _registration_stats([r for r in registrations if r["side"] == side])
        for side in SIDES
    }
    return {
        "rows": rows,
        "geomean_ratio_load_s": geomeans,
        "registration": registration,
    }


def format_value(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(stats: dict[str, Any], field: str, spec: str) -> str:
    """A side's value, or in words why it has none."""
    if stats[field] is None and stats["error"]:
        return f"failed ({stats['error'].split(':')[0]})"
    return format_value(stats[field], spec)


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _side_table(
    title: str,
    by_side: dict[str, dict[str, Any]],
    fields: tuple[tuple[str, str], ...],
    spec: str,
) -> list[str]:
    """Rows of (field, label): one column per side, then fork/reference."""
    headers = [title, *(f"{side} s" for side in SIDES)]
    headers += [f"fork/{ref}" for ref in REFERENCES]
    lines = [markdown_row(headers), "|---|" + "--:|" * (len(headers) - 1)]
    for field, label in fields:
        cells = [label, *(_cell(by_side[side], field, spec) for side in SIDES)]
        cells += [
            format_value(ratio_of(by_side["fork"][field], by_side[ref][field]), ".2f")
            for ref in REFERENCES
        ]
        lines.append(markdown_row(cells))
    return lines


def table(
    summary: dict[str, Any],
    copy_gbs: float,
    engine_start: dict[str, Any] | None,
    descriptions: dict[str, str] | None = None,
) -> str:
    """Markdown table of medians and ratios (also pasted into the docs)."""
    headers = ["model", "case", "ckpt MB", *(f"{side} load s" for side in SIDES)]
    for ref in REFERENCES:
        headers += [f"fork/{ref}", "paired"]
    headers += [f"{side} GB/s" for side in SIDES]
    headers += [f"{side} peak RSS MiB" for side in SIDES]
    headers += [f"{side} RSS after MiB" for side in SIDES]
    lines = [markdown_row(headers), "|---|---|" + "--:|" * (len(headers) - 2)]
    errors = []
    for row in summary["rows"]:
        for side in SIDES:
            if row[side]["error"]:
                errors.append(
                    f"{row['size']} {row['case']} {side}: {row[side]['error']}"
                )
        cells = [row["size"], row["case"], f"{row['bytes'] / 1e6:.1f}"]
        cells += [_cell(row[side], "load_s", ".3f") for side in SIDES]
        for ref in REFERENCES:
            cells += [
                format_value(row["vs"][ref]["ratio_load_s"], ".2f"),
                format_value(row["vs"][ref]["paired_ratio_load_s"], ".2f"),
            ]
        cells += [_cell(row[side], "gbs", ".2f") for side in SIDES]
        cells += [_cell(row[side], "peak_rss_mib", ".0f") for side in SIDES]
        cells += [_cell(row[side], "rss_after_load_mib", ".0f") for side in SIDES]
        lines.append(markdown_row(cells))
    geomeans = "; ".join(
        f"fork/{ref}: "
        + ", ".join(
            f"{field.removesuffix('_load_s').replace('_', ' ')} {group} "
            f"{format_value(value, '.2f')}"
            for field, by_group in by_field.items()
            for group, value in by_group.items()
        )
        for ref, by_field in summary["geomean_ratio_load_s"].items()
    )
    lines += ["", f"Geometric means over the rows: {geomeans}.", ""]
    if descriptions:
        lines += [
            "Sides: "
            + "; ".join(f"{side} = {text}" for side, text in descriptions.items())
            + ". In the unquantized rows bnb-plugin stands for pristine 0.32.0: "
            "the plugin is registered but takes no part in the load.",
            "",
        ]
    lines += [
        (
            f"Memory-copy bandwidth of this machine: {copy_gbs:.2f} GB/s "
            "(median torch copy of a 1 GiB tensor)."
        ),
        "",
    ]
    reg = summary["registration"]
    lines += _side_table(
        "plugin registration",
        reg,
        (
            ("import_s", "`import vllm`"),
            ("engine_args_s", "then `import vllm.engine.arg_utils`"),
            ("plugins_s", "then `load_general_plugins()`"),
            ("total_s", "registration total"),
            ("loader_imports_s", "then import the loader modules"),
            ("ready_s", "total until ready to load"),
        ),
        ".3f",
    )
    errors += [
        f"registration {side}: {reg[side]['error']}"
        for side in SIDES
        if reg[side]["error"]
    ]
    if engine_start:
        start = engine_start["medians"]
        lines += [""]
        lines += _side_table(
            f"engine start, unquantized `{ENGINE_MODEL}`",
            start,
            (
                ("import_s", "`from vllm import LLM`"),
                ("engine_start_s", "`LLM(...)` until ready"),
            ),
            ".2f",
        )
        errors += [
            f"engine start {side}: {start[side]['error']}"
            for side in SIDES
            if start[side]["error"]
        ]
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
    width = 0.8 / len(SIDES)
    fig, axes = plt.subplots(3, 1, figsize=(max(8, len(rows) * 1.1), 12))
    panels = (
        (
            "load_s",
            "median load time (s); numbers: fork/"
            + ", fork/".join(REFERENCES)
            + " ratios of medians",
            True,
        ),
        ("gbs", "load throughput (checkpoint GB / median load s)", True),
        ("peak_rss_mib", "median peak RSS of the loading process (MiB)", False),
    )
    for ax, (field, title, log_scale) in zip(axes, panels, strict=True):
        for n, side in enumerate(SIDES):
            offset = (n - (len(SIDES) - 1) / 2) * width
            values = [r[side][field] or 0 for r in rows]
            ax.bar([i + offset for i in x], values, width=width, label=side)
            for i, row in enumerate(rows):
                if row[side][field] is None and row[side]["error"]:
                    ax.annotate(
                        "failed",
                        (i + offset, 0),
                        xycoords=("data", "axes fraction"),
                        ha="center",
                        rotation=90,
                        fontsize=6,
                    )
        if field == "load_s":
            for i, row in enumerate(rows):
                times = [row[side]["load_s"] for side in SIDES]
                present = [t for t in times if t is not None]
                if present:
                    label = "\n".join(
                        format_value(row["vs"][ref]["ratio_load_s"], ".2f")
                        for ref in REFERENCES
                    )
                    ax.annotate(label, (i, max(present)), ha="center", fontsize=7)
        if field == "gbs":
            ax.axhline(copy_gbs, color="gray", linestyle="--", label="memory copy")
        ax.set_title(title)
        ax.set_xticks(list(x), labels, fontsize=7)
        if log_scale:
            ax.set_yscale("log")
        if field == "load_s":
            # Room above the tallest bar for its two-line label.
            ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.legend(fontsize=8)
    reg = summary["registration"]
    fig.suptitle(
        "fork vs " + " vs ".join(REFERENCES) + ", medians of alternating runs\n"
        "plugin registration "
        + ", ".join(
            f"{side} {format_value(reg[side]['total_s'], '.2f')} s" for side in SIDES
        )
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate(side: Side, model: Path, log: Path) -> dict[str, Any]:
    """Start the real engine on one side and generate greedily."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "generation.json")
        with log.open("w") as output:
            subprocess.run(
                [side.python, str(WORKER), "generate", str(model), str(out)],
                env=worker_env(side),
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
        for side in side_order(sides(), rep, 0):
            log = logs / f"{side.name}-engine{rep}.log"
            try:
                result = generate(side, model, log)
            except (subprocess.SubprocessError, OSError, ValueError) as exc:
                result = {
                    "error": f"{type(exc).__name__}: engine run failed; see {log}"
                }
            samples.append({"side": side.name, "rep": rep, **result})
            shown = result.get("error") or f"{result['engine_start_s']:.2f} s"
            print(f"  engine start {rep} {side.name:10} {shown}")
    medians = {}
    for side in SIDES:
        own = [s for s in samples if s["side"] == side]
        errors = [s["error"] for s in own if "error" in s]
        medians[side] = {
            field: _median(own, field) for field in ("import_s", "engine_start_s")
        } | {"error": errors[0] if errors else None}
    generated = {tuple(s["token_ids"]) for s in samples if "token_ids" in s}
    return {"medians": medians, "same_tokens": len(generated) <= 1, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_time", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="21M model only (CI)")
    mode.add_argument(
        "--full", action="store_true", help="tiny to 380M models, engine starts"
    )
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
    descriptions = {side.name: describe(side) for side in sides()}
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
        "sides": descriptions,
        "code": code_before,
        **summary,
        "samples": {"loads": loads, "registrations": registrations},
    }
    if name == "full":
        report["engine_start"] = engine_starts(
            get_checkpoint(ENGINE_MODEL), ENGINE_START_REPEAT, logs
        )
    if name == "default":
        generation = generate(
            fork(), get_checkpoint(ENGINE_MODEL), logs / "fork-generate.log"
        )
        print(f"fork generated from {generation['prompt']!r}:")
        print(f"  token ids: {generation['token_ids']}")
        print(f"  text: {generation['text']!r}")
        report["generation"] = generation
    report["wall_s"] = time.perf_counter() - started

    text = table(summary, copy_gbs, report.get("engine_start"), descriptions)
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
