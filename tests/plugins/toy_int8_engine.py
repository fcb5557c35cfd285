# SPDX-License-Identifier: Apache-2.0
"""Run engine cases for test_toy_int8.py in this process; dump what they did.

Usage: ``python toy_int8_engine.py SPEC.json OUT_DIR``

SPEC is ``{"cases": [case, ...]}`` with, per case, ``name``, ``model``,
``llm_kwargs``, ``prompts`` (token ids) and ``max_tokens``. For each case this
writes ``OUT_DIR/<name>.json``: ``{"status": "ok", "token_ids": [...]}`` or
``{"status": "error", "error": "Type: message"}``, and, for a run that
loaded, ``OUT_DIR/<name>-rank<r>.safetensors`` with every int8 parameter of
that TP rank's model (the toy_int8 storage). Cases run one after another;
the caller groups them by environment (e.g. ``VLLM_PLUGINS``, OpenMP binding).
"""

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch


def int8_parameters(worker: Any) -> tuple[int, dict[str, torch.Tensor]]:
    """Runs in each TP worker: its rank and its int8 parameters."""
    params = {
        name: param.detach().clone()
        for name, param in worker.get_model().named_parameters()
        if param.dtype == torch.int8
    }
    return worker.rank, params


def run_case(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Start the engine for one case, dump its int8 storage and generate."""
    from safetensors.torch import save_file

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = None
    try:
        llm = LLM(model=case["model"], **case["llm_kwargs"])
        for rank, params in llm.collective_rpc(int8_parameters):
            save_file(params, out_dir / f"{case['name']}-rank{rank}.safetensors")
        sampling = SamplingParams(
            temperature=0.0, max_tokens=case["max_tokens"], ignore_eos=True
        )
        prompts = [{"prompt_token_ids": ids} for ids in case["prompts"]]
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        return {
            "status": "ok",
            "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
        }
    except Exception as exc:
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        del llm
        cleanup_dist_env_and_memory()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    out_dir = Path(argv[2])
    for case in spec["cases"]:
        result = run_case(case, out_dir)
        (out_dir / f"{case['name']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
