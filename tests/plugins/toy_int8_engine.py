# SPDX-License-Identifier: Apache-2.0
"""Run engine cases for test_toy_int8.py in this process; dump what they did.

Usage: ``python toy_int8_engine.py SPEC.json OUT_DIR``

SPEC is ``{"cases": [case, ...]}`` with, per case, ``name``, ``model``,
``llm_kwargs``, ``prompts`` (token ids) and ``max_tokens``. For each case this
writes ``OUT_DIR/<name>.json``: ``{"status": "error", "error": "Type:
message"}``, or ``{"status": "ok", "token_ids": [...], "ranks": [...],
"weight_byte_size": {...}}`` with, per TP rank, the configuration its worker
ran with (load format, eager mode, compilation mode) and the quantization
method of each linear layer, and the bytes per weight vLLM's performance
metrics use per component. A run that loaded also writes
``OUT_DIR/<name>-rank<r>.safetensors`` with every int8 parameter of that TP
rank's model (the toy_int8 storage). Before each case a line ``=== case <name>`` goes to
stdout, so the caller can tell which case logged what. Cases run one after
another, through ``tests/engine_driver.py``; the caller groups them by
environment (e.g. ``VLLM_PLUGINS``, OpenMP binding).
"""

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

# tests/, for engine_driver; appended, so it cannot shadow the installed vllm.
sys.path.append(str(Path(__file__).resolve().parents[1]))
import engine_driver  # noqa: E402


def worker_state(worker: Any) -> dict[str, Any]:
    """Runs in each TP worker: its rank and configuration, its int8 parameters.

    The parameters come under ``int8_params``. Only the int8 storage can be
    read back: on CPU, an unquantized linear layer's weight is repacked for
    the GEMM kernel and the parameter emptied.
    """
    from vllm.model_executor.layers.linear import LinearBase

    vllm_config = worker.vllm_config
    model = worker.get_model()
    return {
        "rank": worker.rank,
        "load_format": vllm_config.load_config.load_format,
        "enforce_eager": vllm_config.model_config.enforce_eager,
        "compilation_mode": vllm_config.compilation_config.mode.name,
        "linear_methods": {
            name: type(module.quant_method).__name__
            for name, module in model.named_modules()
            if isinstance(module, LinearBase)
        },
        "int8_params": {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if param.dtype == torch.int8
        },
    }


def metrics_weight_byte_size(vllm_config: Any) -> dict[str, float]:
    """Bytes per weight of each component vLLM's performance metrics cover."""
    from vllm.v1.metrics.perf import ModelMetrics

    return {
        metric.component_type(): metric.weight_byte_size
        for metric in ModelMetrics(vllm_config).metrics
        if hasattr(metric, "weight_byte_size")
    }


def run_case(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Start the engine for one case, dump its workers' state and generate."""
    from safetensors.torch import save_file

    print(f"=== case {case['name']}", flush=True)
    try:
        with engine_driver.engine(case["model"], case["llm_kwargs"]) as engine:
            ranks = engine.per_rank(worker_state)
            for rank in ranks:
                rank_file = f"{case['name']}-rank{rank['rank']}.safetensors"
                save_file(rank.pop("int8_params"), out_dir / rank_file)
            outputs = engine.generate_greedy(
                case["prompts"], case["max_tokens"], logprobs=2
            )
            return {
                "status": "ok",
                "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
                # Per step, how far the chosen token led the runner-up.
                "margins": [
                    [_margin(step) for step in out.outputs[0].logprobs]
                    for out in outputs
                ],
                "ranks": ranks,
                "weight_byte_size": metrics_weight_byte_size(engine.vllm_config),
            }
    except Exception as exc:
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def _margin(step: dict[int, Any]) -> float:
    """Logprob of the best token minus that of the second best."""
    best, second = sorted((lp.logprob for lp in step.values()), reverse=True)[:2]
    return best - second


def main(argv: list[str]) -> int:
    engine_driver.set_env_defaults()
    spec = json.loads(Path(argv[1]).read_text())
    out_dir = Path(argv[2])
    for case in spec["cases"]:
        result = run_case(case, out_dir)
        engine_driver.write_json_atomic(out_dir / f"{case['name']}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
