# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Load models on the real engine, dequantize their weights, generate.

Tests call `run`, which starts this file as a script on a JSON spec
(``{"cases": [{"model": path, "llm_kwargs": {...}}], "prompts": [[ids]],
"max_tokens": n}``) and reads back, per case, every rank's bitsandbytes
weights dequantized per logical shard (with bitsandbytes' own functions) and
the greedy token ids, and the raw storage and state fields of each weight
(`raw`, for byte-level oracles). Several cases run one after another in one process, so
an engine start is paid once per case, never once per check. The engine runs
through `tests/engine_driver.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# tests/, for engine_driver (stdlib only at import, so collection stays light).
sys.path.append(str(Path(__file__).resolve().parents[2]))
import engine_driver  # noqa: E402

MAX_TOKENS = 16
# Generous: only catches a hung engine.
TIMEOUT_S = 900


def state_fields(state: Any) -> dict[str, Any]:
    """What a 4-bit `QuantState` holds, as plain values; int8 scales as is."""
    if isinstance(state, torch.Tensor):
        return {"scales": state.cpu()}
    return {
        "absmax": state.absmax.cpu(),
        "code": state.code.cpu(),
        "blocksize": state.blocksize,
        "shape": tuple(state.shape),
        "dtype": str(state.dtype),
        "quant_type": state.quant_type,
        "nested": state.nested,
    }


def dequantized_shards(worker: Any) -> dict[str, Any]:
    """Runs in every TP worker: each bnb weight as logical per-shard matrices.

    Fused-MoE weights come as one `[experts, rows, cols]` tensor.
    """
    from bitsandbytes.functional import dequantize_4bit

    shards: dict[str, list[torch.Tensor]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for name, param in worker.get_model().named_parameters():
        states = getattr(param, "bnb_quant_state", None)
        if states is None:
            continue
        raw[name] = {
            "data": param.data.cpu().clone(),
            "states": state_fields(states)
            if not isinstance(states, dict)
            else {index: state_fields(state) for index, state in states.items()},
        }
        if not isinstance(states, dict):
            # Fused-MoE experts: one state for all experts' packed bytes.
            whole = dequantize_4bit(param.data.reshape(-1, 1), states)
            shards[name] = [whole.reshape(param.experts_shape).float().cpu()]
            continue
        offsets = param.bnb_shard_offsets.tolist()
        parts = []
        for index in range(len(states)):
            data = param.data[offsets[index] : offsets[index + 1]]
            if data.dtype == torch.int8:
                scale = states[index].float().unsqueeze(1) / 127
                parts.append(data.float().cpu() * scale.cpu())
            else:
                parts.append(dequantize_4bit(data, states[index]).float().cpu())
        shards[name] = parts
    return {"rank": worker.rank, "shards": shards, "raw": raw}


def main(spec_path: str, result_path: str) -> None:
    engine_driver.set_env_defaults()
    with open(spec_path) as f:
        spec = json.load(f)
    results = []
    for case in spec["cases"]:
        with engine_driver.engine(case["model"], case["llm_kwargs"]) as engine:
            ranks = engine.per_rank(dequantized_shards)
            tokens = engine.greedy_token_ids(spec["prompts"], spec["max_tokens"])
        results.append(
            {
                "ranks": [rank["shards"] for rank in ranks],
                "raw": [rank["raw"] for rank in ranks],
                "tokens": tokens,
            }
        )
    torch.save(results, result_path)


def run(
    cases: list[tuple[str, dict[str, Any]]], tp: int, workdir: Path
) -> list[dict[str, Any]]:
    """Run `(checkpoint, extra LLM kwargs)` cases with `tp` ranks, in order.

    Token-id prompts (the oracle's) and no tokenizer keep the cases
    independent of the fixtures' vocabularies.
    """
    from tests.fixtures.checkpoints import get_checkpoint
    from tests.oracle.harness import ENGINE_ENV, PROMPTS

    spec = {
        "cases": [
            {
                "model": str(get_checkpoint(checkpoint)),
                "llm_kwargs": {
                    "tensor_parallel_size": tp,
                    "enforce_eager": True,
                    "max_model_len": 256,
                    "dtype": "bfloat16",
                    "seed": 0,
                    "skip_tokenizer_init": True,
                    **extra_kwargs,
                },
            }
            for checkpoint, extra_kwargs in cases
        ],
        "prompts": [list(p) for p in PROMPTS],
        "max_tokens": MAX_TOKENS,
    }
    spec_file, result_file = workdir / f"tp{tp}.json", workdir / f"tp{tp}.pt"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(ENGINE_ENV)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(tp)))
    subprocess.run(
        [sys.executable, __file__, str(spec_file), str(result_file)],
        env=env,
        cwd=workdir,
        check=True,
        timeout=TIMEOUT_S,
    )
    return torch.load(result_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
