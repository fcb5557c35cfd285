# SPDX-License-Identifier: Apache-2.0
"""Memory of every kind of load, the fork against the fork without patch 0010.

Usage::

    python -m benchmarks.load_memory [--repeat N] [--out FILE.json]

Patch 0010 freezes the objects that exist before ``load_model`` out of its
two ``gc.collect()`` calls. ``benchmarks.load_time`` compares the fork with
pristine 0.32.0 and 0.27.1, which cannot run every case the fork runs. This
compares the installed fork with the same fork minus patch 0010, for every
case: unquantized, online 4-bit and 8-bit, pre-quantized nf4 and int8 (the
21M Llama; nf4 also at 380M), a MoE model (the tiny Mixtral, unquantized and
online 4-bit) and TP=2 (unquantized and nf4, both ranks).

``without-0010`` is the installed fork's package, hard-linked into
``build/without-0010/`` with the two files patch 0010 changes
(``base_loader.py``, ``gc_utils.py``) taken from ``build/pristine``, and put
first on ``PYTHONPATH``; nothing is patched at run time. Per repetition each
side starts one process that imports vLLM, prepares as
``load_worker.serve`` does, and forks one process per load and rank. The
sides alternate. Each sample is the loading process's peak RSS
(``ru_maxrss``) and its RSS once ``load_model`` has returned (the steady
state), the larger of the two ranks for TP=2, and the load's wall time.
Medians of ``N`` samples. Nothing is asserted.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WITHOUT = REPO / "build" / "without-0010"
PATCHED_FILES = (
    "vllm/model_executor/model_loader/base_loader.py",
    "vllm/utils/gc_utils.py",
)
SIZE = "llama-bench-21m"
LARGE = "llama-bench-380m"
INT8_CONFIG = {"load_in_8bit": True}
SIDES = ("fork", "without-0010")
FIELDS = ("load_s", "peak_rss_mib", "rss_after_load_mib")


def cases() -> dict[str, tuple[str, dict[str, Any], int]]:
    """case -> (model directory, EngineArgs keyword arguments, TP size)."""
    from benchmarks.load_time import checkpoint
    from tests.fixtures.checkpoints import get_checkpoint

    plain = str(checkpoint(SIZE, "unquantized"))
    nf4 = str(checkpoint(SIZE, "nf4-prequant"))
    moe = str(get_checkpoint("mixtral"))
    bnb = {"quantization": "bitsandbytes"}
    return {
        "unquantized": (plain, {}, 1),
        "bnb4-online": (plain, bnb, 1),
        "bnb8-online": (plain, {**bnb, "quantization_config": INT8_CONFIG}, 1),
        "nf4-prequant": (nf4, {}, 1),
        "int8-prequant": (str(checkpoint(SIZE, "int8-prequant")), {}, 1),
        "moe-unquantized": (moe, {}, 1),
        "moe-bnb4-online": (moe, bnb, 1),
        "tp2-unquantized": (plain, {}, 2),
        "tp2-nf4-prequant": (nf4, {}, 2),
        # The largest model of benchmarks.load_time --full.
        "nf4-prequant-380m": (str(checkpoint(LARGE, "nf4-prequant")), {}, 1),
    }


def make_without_0010() -> Path:
    """The installed fork's package with patch 0010's files from pristine."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec and spec.origin
    installed = Path(spec.origin).parent
    shutil.rmtree(WITHOUT, ignore_errors=True)
    WITHOUT.mkdir(parents=True)
    shutil.copytree(installed, WITHOUT / "vllm", copy_function=os.link)
    for path in PATCHED_FILES:
        (WITHOUT / path).unlink()
        shutil.copy2(REPO / "build" / "pristine" / path, WITHOUT / path)
    return WITHOUT


def _load_in_rank(model: str, kwargs: dict[str, Any], tp: int, rank: int, init: str):
    from benchmarks import load_worker
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader

    config = EngineArgs(
        model=model,
        enforce_eager=True,
        max_model_len=256,
        tensor_parallel_size=tp,
        **kwargs,
    ).create_engine_config()
    with set_current_vllm_config(config):
        load_worker.engine_driver.init_distributed(tp, rank, init)
        try:
            loader = get_model_loader(config.load_config)
            start = time.perf_counter()
            loader.load_model(vllm_config=config, model_config=config.model_config)
            load_s = time.perf_counter() - start
            return {
                "load_s": load_s,
                "peak_rss_mib": load_worker._peak_rss_mib(),
                "rss_after_load_mib": load_worker._rss_mib(),
            }
        finally:
            cleanup_dist_env_and_memory()


def _sample(model: str, kwargs: dict[str, Any], tp: int) -> dict[str, Any]:
    """One load, one forked process per rank; the larger rank's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/dist-init"
        # The CPU communicator of a TP group names its shared memory after
        # this, which vLLM's CPU worker sets; unique per load.
        os.environ["VLLM_DIST_IDENT"] = Path(tmp).name
        children = []
        for rank in range(tp):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                try:
                    result = _load_in_rank(model, kwargs, tp, rank, init)
                except Exception as exc:  # recorded, not raised
                    result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                with os.fdopen(write_fd, "w") as out:
                    json.dump(result, out)
                os._exit(0)
            os.close(write_fd)
            children.append((pid, read_fd))
        results = []
        for pid, read_fd in children:
            with os.fdopen(read_fd) as answer:
                text = answer.read()
            os.waitpid(pid, 0)
            results.append(json.loads(text) if text else {"error": "load died"})
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {field: max(r[field] for r in results) for field in FIELDS}


def serve(out: str, names: list[str]) -> None:
    """One side, one repetition: every case, each load in its own process."""
    import bitsandbytes  # noqa: F401

    import vllm
    import vllm.engine.arg_utils  # noqa: F401
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    load_general_plugins()
    _set_torch_accelerator_to_noop()
    table = cases()
    results = {"vllm": vllm.__file__}
    for name in names:
        results[name] = _sample(*table[name])
    Path(out).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "build" / "load_memory.json"))
    parser.add_argument("--cases", nargs="*", help="only these cases")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.cases or list(cases())
    if args.serve:
        serve(args.serve, names)
        return 0
    make_without_0010()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        side: {name: [] for name in names} for side in SIDES
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            order = SIDES if rep % 2 == 0 else SIDES[::-1]
            for side in order:
                side_env = dict(env)
                if side == "without-0010":
                    # Before the installed package; the checkout (sys.path[0])
                    # holds only a namespace portion of vllm, which a regular
                    # package anywhere on the path takes precedence over.
                    side_env["PYTHONPATH"] = str(WITHOUT)
                out = Path(tmp) / f"{side}-{rep}.json"
                subprocess.run(
                    [sys.executable, "-m", "benchmarks.load_memory", "--serve",
                     str(out), "--cases", *names],
                    env=side_env, cwd=REPO, check=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                result = json.loads(out.read_text())
                expected = WITHOUT if side == "without-0010" else None
                if expected and not result["vllm"].startswith(str(expected)):
                    raise SystemExit(f"{side} ran {result['vllm']}")
                for name in names:
                    samples[side][name].append(result[name])
    summary = {}
    lines = [
        (
            "| case | fork peak RSS MiB | without-0010 peak RSS MiB | fork RSS after "
            "MiB | without-0010 RSS after MiB | fork load s | without-0010 load s |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name in names:
        row = {}
        for side in SIDES:
            good = [s for s in samples[side][name] if "error" not in s]
            row[side] = {
                field: statistics.median(s[field] for s in good) if good else None
                for field in FIELDS
            }
            errors = [s["error"] for s in samples[side][name] if "error" in s]
            row[side]["error"] = errors[0] if errors else None
        summary[name] = row

        def cell(side: str, field: str, spec: str) -> str:
            value = row[side][field]  # noqa: B023
            return "failed" if value is None else format(value, spec)

        lines.append(
            f"| {name} | {cell('fork', 'peak_rss_mib', '.0f')} | "
            f"{cell('without-0010', 'peak_rss_mib', '.0f')} | "
            f"{cell('fork', 'rss_after_load_mib', '.0f')} | "
            f"{cell('without-0010', 'rss_after_load_mib', '.0f')} | "
            f"{cell('fork', 'load_s', '.3f')} | "
            f"{cell('without-0010', 'load_s', '.3f')} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"repeat": args.repeat, "summary": summary, "samples": samples},
                   indent=1)
    )  # fmt: skip
    print("\n".join(lines))
    for name, row in summary.items():
        for side in SIDES:
            if row[side]["error"]:
                print(f"{name} {side}: {row[side]['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
