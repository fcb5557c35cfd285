# SPDX-License-Identifier: Apache-2.0
r"""Subprocess probe of ``tests/test_step_cost.py``: count what decoding executes.

Usage::

    python step_cost_probe.py OUT.json MODEL_DIR [--quantization Q] \
        [--prompts '[[1, 12, 37], [1, 200, 3]]'] [--max-tokens N]

Starts ``vllm.LLM`` for one checkpoint, warms up with one ``generate`` and
then measures the same ``generate`` twice. Each measurement counts the
operators dispatched (a ``TorchDispatchMode``; ops of custom operators such as
``vllm::*`` and ``bitsandbytes::*`` are entered, so the bitsandbytes kernels
and the aten ops inside them are seen too) and the Python function calls
(``sys.setprofile`` "call" events) per code object. Wall time on a shared
2-core machine says little about per-step cost; these counts are exact, so
two measurements of one process must agree and two code trees can be
compared call for call.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and TP=1 the engine core and the
worker run in this process and thread, which the probe checks (every model
forward must run in the measuring thread).

Like ``tests/oracle/run_case.py`` it imports nothing but stdlib, torch, vllm
and ``tests/engine_driver.py``, so it measures whichever vllm the interpreter
resolves: the installed fork, or pristine upstream (plus
``vllm-bnb-plugin``) through ``PYTHONPATH``.
"""

import argparse
import gc
import importlib.util
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # tests/, see engine_driver
import engine_driver  # noqa: E402

engine_driver.set_env_defaults()

import torch  # noqa: E402
from torch._C import DispatchKey  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

# Namespaces whose ops are C++ kernels: counted, not entered.
LEAF_NAMESPACES = ("aten", "prim", "prims")
DEFAULT_PROMPTS = [[1, 12, 37, 99, 5], [1, 200, 3]]
DEFAULT_MAX_TOKENS = 8
MEASUREMENTS = 2
BELOW_PYTHON = torch._C._dispatch_keyset_full_after(DispatchKey.Python)


class OpCounter(TorchDispatchMode):
    """Counts every operator call that reaches the dispatcher, by name.

    Calls made from Python (``aten::mm``, ``vllm::*`` custom ops, the
    ``bitsandbytes::*`` kernels) are counted; what a C++ kernel calls inside
    is not. A dispatch mode is popped while it handles an op, so the ops a
    Python custom-op kernel runs would go unseen: non-aten ops are therefore
    redispatched to their backend kernel with the mode pushed again, and both
    the custom op and what it calls are counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        namespace = func.namespace
        self.counts[f"{namespace}::{func._opname}"] += 1
        if namespace in LEAF_NAMESPACES:
            return func(*args, **kwargs)
        keys = torch._C._dispatch_tls_local_include_set()
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                keys = keys | torch._C._dispatch_keys(leaf)
        # The backend kernel; BackendSelect is a fallthrough for custom ops.
        keys = (keys & BELOW_PYTHON).remove(DispatchKey.BackendSelect)
        with self:
            return func.redispatch(keys, *args, **kwargs)


class CallCounter:
    """Python function calls (``sys.setprofile`` "call" events) per code."""

    def __init__(self) -> None:
        self.calls: Counter[CodeType] = Counter()

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.calls[frame.f_code] += 1

    @contextmanager
    def profiling(self) -> Iterator[None]:
        sys.setprofile(self._profile)
        try:
            yield
        finally:
            sys.setprofile(None)


def package_dir(module_name: str) -> Path:
    """Directory of the package that ships a quantization method's module.

    In-tree plugins live in ``vllm.plugins.<name>``; an out-of-tree plugin is
    its own top-level package.
    """
    parts = module_name.split(".")
    top = ".".join(parts[:3] if parts[0] == "vllm" else parts[:1])
    return Path(sys.modules[top].__file__).parent


def linear_methods(worker: Any) -> dict[str, Any]:
    """Which quantization method classes serve the model's linear layers."""
    from vllm.model_executor.layers.linear import LinearBase

    methods: Counter[str] = Counter()
    for module in worker.get_model().modules():
        if isinstance(module, LinearBase):
            method = type(module.quant_method)
            methods[f"{method.__module__}.{method.__qualname__}"] += 1
    return {"rank": worker.rank, "linear_methods": dict(methods)}


def _within(path: str, root: Path) -> bool:
    return path.startswith(str(root) + os.sep)


def _by_function(calls: Counter[CodeType], root: Path) -> dict[str, int]:
    """Calls of the functions under ``root``, by ``file:qualname``.

    No line numbers: the same function sits at different lines in the two
    trees, and the names are compared across them.
    """
    named: Counter[str] = Counter()
    for code, n in calls.items():
        if _within(code.co_filename, root):
            rel = os.path.relpath(code.co_filename, root)
            named[f"{rel}:{code.co_qualname}"] += n
    return dict(sorted(named.items()))


def get_model(worker: Any) -> Any:
    """The worker's model (in-process engine: returned as is, not pickled)."""
    return worker.get_model()


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No collector run (and its finalizers) at a random point of a count."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def count_ops(llm: Any, prompts: list[dict], params: Any) -> dict[str, Any]:
    """Ops one ``generate`` dispatches, in total and per model forward.

    Also records the thread of every forward: a forward in another thread
    would escape the (thread-local) dispatch mode.
    """
    (model,) = llm.collective_rpc(get_model)
    ops = OpCounter()
    forwards: list[dict[str, Any]] = []

    def pre_hook(module: Any, args: Any) -> None:
        name = threading.current_thread().name
        forwards.append({"thread": name, "ops": -ops.counts.total()})

    def post_hook(module: Any, args: Any, output: Any) -> None:
        forwards[-1]["ops"] += ops.counts.total()

    handles = [
        model.register_forward_pre_hook(pre_hook),
        model.register_forward_hook(post_hook),
    ]
    try:
        with quiet_gc(), ops:
            outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        for handle in handles:
            handle.remove()
    by_name = dict(sorted(ops.counts.items()))
    return {
        "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
        "ops": by_name,
        "ops_total": sum(by_name.values()),
        "aten_ops_total": sum(
            n for name, n in by_name.items() if name.startswith("aten::")
        ),
        "forwards": forwards,
    }


def count_calls(
    llm: Any, prompts: list[dict], params: Any, roots: dict[str, Path]
) -> dict[str, Any]:
    """Python calls one ``generate`` makes, without the op counter running.

    ``roots`` names the code trees to count separately; the fork's plugin
    lies inside ``vllm/``, ``vllm_bnb_plugin`` outside it, so
    ``vllm_or_plugin`` is the sum that compares the two sides.
    """
    calls = CallCounter()
    with quiet_gc(), calls.profiling():
        outputs = llm.generate(prompts, params, use_tqdm=False)
    result: dict[str, Any] = {
        "token_ids_profiled": [list(out.outputs[0].token_ids) for out in outputs],
        "calls_total": calls.calls.total(),
        "calls_in_vllm_or_plugin": sum(
            n
            for code, n in calls.calls.items()
            if _within(code.co_filename, roots["vllm"])
            or _within(code.co_filename, roots["plugin"])
        ),
    }
    for name, root in roots.items():
        functions = _by_function(calls.calls, root)
        result[f"calls_in_{name}"] = sum(functions.values())
        result[f"{name}_functions"] = functions
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("model")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--prompts", type=json.loads, default=DEFAULT_PROMPTS)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = parser.parse_args(argv)

    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        quantization=args.quantization,
        # As tests/oracle/harness.py's cases.
        enforce_eager=True,
        max_model_len=256,
        dtype="bfloat16",
        seed=0,
        tensor_parallel_size=1,
        skip_tokenizer_init=True,
        # The measured generates repeat the warm-up's prompts; a prefix-cache
        # hit would make them do less than the warm-up.
        enable_prefix_caching=False,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True
    )
    prompts = [{"prompt_token_ids": ids} for ids in args.prompts]
    methods = llm.collective_rpc(linear_methods)
    method_module = next(iter(methods[0]["linear_methods"])).rsplit(".", 1)[0]
    plugin = package_dir(method_module)
    vllm_root = Path(vllm.__file__).parent

    warmup = llm.generate(prompts, params, use_tqdm=False)
    roots = {
        "plugin": plugin,
        "vllm": vllm_root,
        "bitsandbytes": Path(importlib.util.find_spec("bitsandbytes").origin).parent,
        "torch": Path(torch.__file__).parent,
    }
    measurements = [
        {
            **count_ops(llm, prompts, params),
            **count_calls(llm, prompts, params, roots),
        }
        for _ in range(MEASUREMENTS)
    ]
    warmup_ids = [list(out.outputs[0].token_ids) for out in warmup]
    differing = [
        key
        for key in sorted(measurements[0])
        if any(m[key] != measurements[0][key] for m in measurements[1:])
    ]
    # Greedy decoding: every pass must generate the warm-up's tokens.
    if any(
        ids != warmup_ids
        for m in measurements
        for ids in (m["token_ids"], m["token_ids_profiled"])
    ):
        differing.append("token_ids vs warm-up")
    result = {
        "vllm": {"file": vllm.__file__, "version": vllm.__version__},
        "torch": torch.__version__,
        "python": sys.version,
        "linear_methods": methods,
        "plugin_dir": str(plugin),
        "roots": {name: str(root) for name, root in roots.items()},
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "warmup_token_ids": warmup_ids,
        "measurements": measurements,
        "deterministic": not differing,
        "differing": differing,
    }
    engine_driver.write_json_atomic(args.out, result)
    print(
        json.dumps(
            {
                "deterministic": not differing,
                "differing": differing,
                "aten_ops_total": [m["aten_ops_total"] for m in measurements],
                "calls_in_plugin": [m["calls_in_plugin"] for m in measurements],
                "calls_in_vllm": [m["calls_in_vllm"] for m in measurements],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
