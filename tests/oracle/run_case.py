# SPDX-License-Identifier: Apache-2.0
"""Subprocess entry point of the oracle: run cases on the real vLLM engine.

Usage: ``python run_case.py SPEC.json|- RESULT.json``.

The spec is one case or ``{"cases": [...]}``; the result mirrors it (one
result object, or ``{"results": [...]}``). A case is::

    {"model": "/path", "llm_kwargs": {...}, "prompts": [[int, ...], ...],
     "max_tokens": 8, "logprobs": 5}

This file is deliberately self-contained (stdlib + torch + vllm only): it runs
under whichever ``vllm`` the interpreter resolves (pristine upstream via
PYTHONPATH, the installed fork, or a perturbed tree) and must not import
anything from the fork's repository. Every failure is recorded in the result
instead of crashing, so an upstream crash is data for the harness.
"""

import copy
import gc
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

# Must be in place before vllm is imported; the harness sets them too, these
# defaults only make a manual run behave the same.
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # collective_rpc ships our digest function to the workers by pickle.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

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
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    result: dict[str, Any] = {"status": "ok", "timings": {}}
    llm = None
    t0 = time.perf_counter()
    try:
        llm = LLM(model=case["model"], **case.get("llm_kwargs", {}))
        t1 = time.perf_counter()
        result["ranks"] = sorted(
            llm.collective_rpc(worker_digest), key=lambda r: r["rank"]
        )
        t2 = time.perf_counter()
        params = SamplingParams(
            temperature=0.0,
            max_tokens=case.get("max_tokens", 8),
            logprobs=case.get("logprobs", 5),
            ignore_eos=True,
        )
        prompts = [{"prompt_token_ids": ids} for ids in case["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
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
    finally:
        # Leave the process as a fresh one for the next case: the in-process
        # engine core keeps the distributed groups (e.g. no EP group for a
        # MoE model after a dense one) unless they are torn down.
        del llm
        cleanup_dist_env_and_memory()
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
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    t0 = time.perf_counter()
    import vllm

    env = {
        "import_s": time.perf_counter() - t0,
        "vllm_version": vllm.__version__,
        "vllm_file": vllm.__file__,
        "python": sys.executable,
    }
    if "cases" not in spec:
        _write(argv[2], dict(run_one(spec), env=env))
        return 0
    results: list[dict[str, Any]] = []
    for case in spec["cases"]:
        results.append(dict(run_one(case), env=env))
        _write(argv[2], {"results": results})
        if results[-1]["status"] != "ok":
            break
    return 0


def _write(path: str, output: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(output, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
