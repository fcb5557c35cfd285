# SPDX-License-Identifier: Apache-2.0
"""Subprocess entry point of the oracle: run cases on the real vLLM engine.

Usage: ``python run_case.py SPEC.json|- RESULT.json``.

The spec is one case or ``{"cases": [...]}``; the result mirrors it (one
result object, or ``{"results": [...]}``). A case is::

    {"model": "/path", "llm_kwargs": {...}, "prompts": [[int, ...], ...],
     "max_tokens": 8, "logprobs": 5}

This file and ``tests/engine_driver.py``, the only other file it imports,
use stdlib + torch + vllm alone: they run under whichever ``vllm`` the
interpreter resolves (pristine upstream via PYTHONPATH, the installed fork,
or a perturbed tree), so nothing else of the fork's repository may be
imported. Every failure is recorded in the result instead of crashing, so an
upstream crash is data for the harness.
"""

import copy
import gc
import hashlib
import json
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# tests/, for engine_driver; appended, so it cannot shadow the vllm under test.
sys.path.append(str(Path(__file__).resolve().parents[1]))
import engine_driver  # noqa: E402

# How deep the quant-state walk follows nested containers/objects; BNB needs 3
# (dict shard -> QuantState -> state2 QuantState), a margin guards cycles.
_MAX_DEPTH = 6
_SCALARS = (bool, int, float, str, type(None))


def tensor_digest(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and sha256 of the raw bytes: equal iff bit-identical.

    The dtype is the storage's: a parameter class may report another one
    (the dtype of the model it serves) for packed storage.
    """
    t = t.detach()
    if t.is_meta:
        return {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": "meta"}
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
    }


def _walk(
    value: Any, path: str, depth: int, seen: set[int]
) -> Iterator[tuple[str, Any]]:
    """Yield (path, leaf) for tensors and scalars reachable from ``value``.

    Leaves are digests (tensors) or JSON scalars. Objects such as
    ``bitsandbytes.functional.QuantState`` are described by their fields so the
    digest does not depend on the class a plugin chose to carry them.
    """
    if isinstance(value, torch.Tensor):
        yield path, tensor_digest(value)
    elif isinstance(value, _SCALARS):
        yield path, value
    elif isinstance(value, torch.dtype):
        yield path, str(value)
    elif isinstance(value, torch.Size):
        yield path, list(value)
    elif depth >= _MAX_DEPTH or id(value) in seen or callable(value):
        return
    elif isinstance(value, dict):
        seen.add(id(value))
        for key in sorted(value, key=str):
            yield from _walk(value[key], f"{path}[{key}]", depth + 1, seen)
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]", depth + 1, seen)
    elif hasattr(value, "__array__"):
        yield from _walk(torch.as_tensor(value.__array__()), path, depth, seen)
    elif hasattr(value, "__dict__"):
        seen.add(id(value))
        for key in sorted(vars(value)):
            if not key.startswith("_"):
                yield from _walk(getattr(value, key), f"{path}.{key}", depth + 1, seen)


def param_state_digest(param: torch.Tensor) -> dict[str, Any]:
    """Digest the tensor-carrying attributes a parameter was given.

    Quantization methods hang their state (e.g. BNB ``bnb_quant_state``,
    ``bnb_shard_offsets``) on the parameter. Attributes that hold no tensor at
    all (``output_dim``, flags) are layout metadata, not loaded state, and
    callables (``weight_loader``) are code, so both are left out.
    """
    out: dict[str, Any] = {}
    for attr in sorted(vars(param)):
        value = getattr(param, attr)
        if callable(value):
            continue
        leaves = dict(_walk(value, attr, 0, set()))
        if any(isinstance(leaf, dict) for leaf in leaves.values()):
            out.update(leaves)
    return out


def model_digest(model: torch.nn.Module, with_state: bool) -> dict[str, Any]:
    """Digest every parameter and buffer (and optionally attached state)."""
    digest: dict[str, Any] = {
        "params": {n: tensor_digest(p) for n, p in model.named_parameters()},
        "buffers": {n: tensor_digest(b) for n, b in model.named_buffers()},
    }
    if with_state:
        digest["param_state"] = {
            f"{n}:{k}": v
            for n, p in model.named_parameters()
            for k, v in param_state_digest(p).items()
        }
    return digest


def _load_unprocessed(worker: Any) -> torch.nn.Module:
    """Load the model again on this worker, stopping before post-processing.

    On CPU, ``process_weights_after_loading`` moves unquantized linear weights
    into opaque oneDNN handles and leaves empty parameters behind, so the
    engine's own model no longer shows what the weight loaders produced. This
    repeats the engine's load (same config, same loader) and stops right after
    ``load_weights``. The scratch compilation config keeps the second set of
    attention/MoE layers out of the engine's layer registry.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = copy.copy(worker.vllm_config)
    config.compilation_config = copy.copy(config.compilation_config)
    config.compilation_config.static_forward_context = {}
    config.compilation_config.static_all_moe_layers = []
    model_config = config.model_config
    device = config.load_config.device or config.device_config.device
    with (
        set_current_vllm_config(config),
        set_default_torch_dtype(model_config.dtype),
    ):
        with torch.device(device):
            model = initialize_model(vllm_config=config, model_config=model_config)
        get_model_loader(config.load_config).load_weights(model, model_config)
    return model


def worker_digest(worker: Any) -> dict[str, Any]:
    """Runs inside each TP worker: digests of the loaded and the final model.

    Attached quant state is digested on the freshly loaded model only: on the
    engine's model, the warm-up forward has already filled runtime caches
    (e.g. BNB 8-bit ``matmul_state``) that are not loaded state.
    ``linear_file`` shows which tree's layer code the worker really ran.
    """
    from vllm.model_executor.layers import linear

    loaded = _load_unprocessed(worker)
    result = {
        "rank": worker.rank,
        "linear_file": linear.__file__,
        "loaded": model_digest(loaded, with_state=True),
        "final": model_digest(worker.get_model(), with_state=False),
    }
    del loaded
    gc.collect()
    return result


def _error(exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(tb)[-4000:],
    }


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    """Start an engine for one case, digest its weights and generate."""
    result: dict[str, Any] = {"status": "ok", "timings": {}}
    t0 = time.perf_counter()
    try:
        model, llm_kwargs = case["model"], case.get("llm_kwargs", {})
        with engine_driver.engine(model, llm_kwargs) as engine:
            t1 = time.perf_counter()
            result["ranks"] = engine.per_rank(worker_digest)
            t2 = time.perf_counter()
            outputs = engine.generate_greedy(
                case["prompts"], case.get("max_tokens", 8), case.get("logprobs", 5)
            )
            t3 = time.perf_counter()
        result["generation"] = [
            {
                "prompt": list(out.prompt_token_ids),
                "token_ids": list(out.outputs[0].token_ids),
                "logprobs": [
                    sorted([lp.rank, tok, lp.logprob] for tok, lp in step.items())
                    for step in out.outputs[0].logprobs
                ],
            }
            for out in outputs
        ]
        result["timings"].update(
            engine_start_s=t1 - t0, digest_s=t2 - t1, generate_s=t3 - t2
        )
    except Exception as exc:  # an upstream failure is a result, not a crash
        result["status"] = "error"
        result["error"] = _error(exc)
        result["timings"]["failed_after_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str]) -> int:
    """Read the spec, run its case(s), write the result JSON.

    With several cases the result file is rewritten after each one and the
    run stops at the first failure, so a crash loses nothing already done and
    no case runs in an engine state a failure may have left behind.
    """
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source = sys.stdin if argv[1] == "-" else open(argv[1])  # noqa: SIM115
    with source:
        spec = json.load(source)
    engine_driver.set_env_defaults()
    t0 = time.perf_counter()
    import vllm

    env = {
        "import_s": time.perf_counter() - t0,
        "vllm_version": vllm.__version__,
        "vllm_file": vllm.__file__,
        "python": sys.executable,
    }
    if "cases" not in spec:
        engine_driver.write_json_atomic(argv[2], dict(run_one(spec), env=env))
        return 0
    results: list[dict[str, Any]] = []
    for case in spec["cases"]:
        results.append(dict(run_one(case), env=env))
        engine_driver.write_json_atomic(argv[2], {"results": results})
        if results[-1]["status"] != "ok":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
