# SPDX-License-Identifier: Apache-2.0
r"""Subprocess probe of ``tests/test_zero_cost.py``: count what loaders execute.

Usage::

    python zero_cost_probe.py layers --world-size N --rank R \
        --init-method file:///tmp/x OUT.json
    python zero_cost_probe.py load OUT.json MODEL_DIR [MODEL_DIR ...]

``layers`` builds unquantized linear and fused-MoE layers under a real
tensor-parallel group of ``N`` ranks (gloo; ``N`` processes for ``N > 1``)
and counts the Python line and opcode events one weight-loader call executes
in frames of the ``vllm`` package (``linear.py`` and ``routed_experts.py``
and any vLLM helper they call, so work moved into a helper is still seen).
Counts are a deterministic stand-in for the work a call does; wall time on a
shared 2-core machine is not.

``load`` loads whole models through the real model loader.

Both record every executed line of ``linear.py`` and ``routed_experts.py``.

Like ``tests/oracle/run_case.py`` this file imports nothing but stdlib,
torch, vllm and ``tests/engine_driver.py`` (itself stdlib + torch + vllm), so
it measures whichever vllm the interpreter resolves: the installed fork, or
pristine upstream through ``PYTHONPATH``.
"""

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

# tests/, for engine_driver; appended, so it cannot shadow the vllm under test.
sys.path.append(str(Path(__file__).resolve().parent))
import engine_driver  # noqa: E402

# Also this module's API: tests/test_weight_loader_timings.py calls it.
from engine_driver import init_distributed  # noqa: E402

engine_driver.set_env_defaults()

import torch  # noqa: E402

import vllm  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers import linear  # noqa: E402
from vllm.model_executor.layers.fused_moe import (  # noqa: E402
    FusedMoEFactory,
    routed_experts,
)

VLLM_ROOT = str(Path(vllm.__file__).parent) + os.sep
TRACED_FILES = (linear.__file__, routed_experts.__file__)

HIDDEN = 256
HEAD_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_EXPERTS = 4
# Layer loads measured, and the two loader entry points of a linear layer.
LINEAR_LOADS = (
    "column",
    "row",
    "merged-split",
    "merged-fused",
    "qkv-split",
    "qkv-fused",
)
LINEAR_LOADERS = ("weight_loader", "param.weight_loader")
MOE_LOADS = ("moe-w13/weight_loader", "moe-w2/weight_loader")
CASES = (
    *(f"{load}/{loader}" for load in LINEAR_LOADS for loader in LINEAR_LOADERS),
    *MOE_LOADS,
)


class LoaderCase(NamedTuple):
    """One zero-argument weight-loader call and the layer it loads into."""

    call: Callable[[], None]
    layer: torch.nn.Module
    tp_rank: int
    tp_size: int


class Tracer:
    """Counts line (and opcode) events of frames whose code is in ``vllm``.

    Also records which lines of ``TRACED_FILES`` ran.
    """

    def __init__(self, opcodes: bool) -> None:
        self.trace_opcodes = opcodes
        self.lines = 0
        self.opcodes = 0
        self.executed: dict[str, set[int]] = {path: set() for path in TRACED_FILES}

    def _global(self, frame: FrameType, event: str, arg: Any) -> Callable | None:
        if not frame.f_code.co_filename.startswith(VLLM_ROOT):
            return None
        frame.f_trace_opcodes = self.trace_opcodes
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Callable:
        if event == "line":
            self.lines += 1
            if (lines := self.executed.get(frame.f_code.co_filename)) is not None:
                lines.add(frame.f_lineno)
        elif event == "opcode":
            self.opcodes += 1
        return self._local

    @contextmanager
    def tracing(self) -> Iterator[None]:
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)


def load_all(loader: Callable, param: torch.nn.Parameter, calls: list[tuple]) -> None:
    """Make the loader calls a model's ``load_weights`` makes for one weight."""
    for args in calls:
        loader(param, *args)


def linear_cases() -> dict[str, LoaderCase]:
    """Unquantized linear-layer loads.

    ``weight_loader`` is the method the shard_indexer patch edits (used for
    biases and by quantization methods without ``weight_loader_v2``);
    ``param.weight_loader`` is what an unquantized load calls for a weight
    (``weight_loader_v2``, untouched by the fork). Loaded tensors are full,
    unsharded checkpoint tensors, as a loader reads them from disk.
    """
    column = linear.ColumnParallelLinear(HIDDEN, 2 * HIDDEN, bias=False)
    row = linear.RowParallelLinear(2 * HIDDEN, HIDDEN, bias=False)
    merged = linear.MergedColumnParallelLinear(HIDDEN, [2 * HIDDEN] * 2, bias=False)
    qkv = linear.QKVParallelLinear(
        HIDDEN, HEAD_SIZE, NUM_HEADS, NUM_KV_HEADS, bias=False
    )
    gate_up = torch.randn(4 * HIDDEN, HIDDEN)
    q_size, kv_size = NUM_HEADS * HEAD_SIZE, NUM_KV_HEADS * HEAD_SIZE
    fused_qkv = torch.randn(q_size + 2 * kv_size, HIDDEN)
    # (layer, the arguments after `param` of each loader call) per load.
    loads: list[tuple[linear.LinearBase, list[tuple]]] = [
        (column, [(torch.randn(2 * HIDDEN, HIDDEN),)]),
        (row, [(torch.randn(HIDDEN, 2 * HIDDEN),)]),
        (merged, [(part, index) for index, part in enumerate(gate_up.chunk(2))]),
        (merged, [(gate_up, None)]),
        (
            qkv,
            list(zip(fused_qkv.split([q_size, kv_size, kv_size]), "qkv", strict=True)),
        ),
        (qkv, [(fused_qkv, None)]),
    ]
    cases = {}
    for load, (layer, calls) in zip(LINEAR_LOADS, loads, strict=True):
        entry_points = (layer.weight_loader, layer.weight.weight_loader)
        for name, loader in zip(LINEAR_LOADERS, entry_points, strict=True):
            cases[f"{load}/{name}"] = LoaderCase(
                partial(load_all, loader, layer.weight, calls),
                layer,
                layer.tp_rank,
                layer.tp_size,
            )
    return cases


def moe_cases() -> dict[str, LoaderCase]:
    """Unquantized fused-MoE expert loads, as Mixtral's ``load_weights`` does."""
    runner = FusedMoEFactory(
        num_experts=NUM_EXPERTS,
        top_k=2,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        prefix="probe.experts",
    )
    params = {name.rsplit(".", 1)[-1]: p for name, p in runner.named_parameters()}
    w13, w2 = params["w13_weight"], params["w2_weight"]
    experts = w13.weight_loader.__self__
    config = experts.moe_config

    def calls(*shards: str) -> list[tuple]:
        """(weight, weight_name, shard_id, expert_id, return_success) of expert 1."""
        return [
            (
                torch.randn(HIDDEN, 2 * HIDDEN)
                if shard == "w2"
                else torch.randn(2 * HIDDEN, HIDDEN),
                f"probe.experts.1.{shard}.weight",
                shard,
                1,
                True,
            )
            for shard in shards
        ]

    loads = [(w13, calls("w1", "w3")), (w2, calls("w2"))]
    return {
        name: LoaderCase(
            partial(load_all, param.weight_loader, param, args),
            experts,
            config.tp_rank,
            config.tp_size,
        )
        for name, (param, args) in zip(MOE_LOADS, loads, strict=True)
    }


def _merge(into: dict[str, set[int]], lines: dict[str, set[int]]) -> None:
    for path, numbers in lines.items():
        into[path] |= numbers


def run_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Event counts of every case at this process's TP position."""
    executed: dict[str, set[int]] = {path: set() for path in TRACED_FILES}
    counts: dict[str, dict[str, int]] = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed(args.world_size, args.rank, args.init_method)
        torch.manual_seed(0)
        cases = {**linear_cases(), **moe_cases()}
        for name, case in cases.items():
            case.call()  # warm-up: first-call effects are not per-call work
            measured = []
            for _ in range(2):
                tracer = Tracer(opcodes=True)
                with tracer.tracing():
                    case.call()
                measured.append({"lines": tracer.lines, "opcodes": tracer.opcodes})
                _merge(executed, tracer.executed)
            if measured[0] != measured[1]:
                raise RuntimeError(f"{name}: counts not repeatable: {measured}")
            counts[name] = dict(measured[0], tp_rank=case.tp_rank, tp_size=case.tp_size)
    return {
        "world_size": args.world_size,
        "rank": args.rank,
        "cases": counts,
        "executed_lines": {path: sorted(lines) for path, lines in executed.items()},
    }


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """Lines the loaders executed over whole-model loads."""
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    # What vLLM's CPU model runner does before it loads a model: without an
    # accelerator, the loader's `torch.accelerator.empty_cache()` would raise.
    _set_torch_accelerator_to_noop()

    executed: dict[str, set[int]] = {path: set() for path in TRACED_FILES}
    for model_dir in args.models:
        config = engine_driver.bare_load_config(model_dir)
        with engine_driver.worker_context(config):
            loader = get_model_loader(config.load_config)
            tracer = Tracer(opcodes=False)
            with tracer.tracing():
                loader.load_model(vllm_config=config, model_config=config.model_config)
        _merge(executed, tracer.executed)
    return {
        "executed_lines": {path: sorted(lines) for path, lines in executed.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    layers = commands.add_parser("layers")
    layers.add_argument("--world-size", type=int, default=1)
    layers.add_argument("--rank", type=int, default=0)
    layers.add_argument("--init-method", required=True)
    layers.add_argument("out", type=Path)
    load = commands.add_parser("load")
    load.add_argument("out", type=Path)
    load.add_argument("models", nargs="+")
    args = parser.parse_args()
    result = run_layers(args) if args.command == "layers" else run_load(args)
    result["vllm"] = {"version": vllm.__version__, "file": vllm.__file__}
    engine_driver.write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
