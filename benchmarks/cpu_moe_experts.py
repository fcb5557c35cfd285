# SPDX-License-Identifier: Apache-2.0
"""bitsandbytes 4-bit MoE experts on CPU: dequantizing the routed experts
(the plugin) against dequantizing all of them (the plugin before).

Usage (the fork's venv)::

    python -m benchmarks.cpu_moe_experts [--repeat N] [--out FILE.json]

One fused-MoE layer per model, at Mixtral-8x7B and Qwen3-30B-A3B expert
shapes, stored as the plugin stores it after loading: one packed NF4 tensor
(blocks of 64) and one state per projection. Per batch, both sides run
`cpu_moe.run_experts`, what the CPU engine runs after routing, on the same
input and routing (each token `top_k` distinct random experts); they differ
only in how an expert's weights are obtained. Their outputs are checked
equal first. The sides alternate; medians of N. Nothing is asserted.
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.plugins.bitsandbytes.cpu_moe import run_experts
from vllm.plugins.bitsandbytes.moe import _expert_weights

# (name, experts, hidden, intermediate, experts per token)
MODELS = [("Mixtral-8x7B", 8, 4096, 14336, 2), ("Qwen3-30B-A3B", 128, 2048, 768, 8)]
BATCHES = (1, 4, 16)


def fused_moe_layer(experts, hidden, intermediate):
    """A layer holding what the plugin's MoE method reads: packed experts,
    their fused state and shape, routing options."""
    layer = SimpleNamespace(
        expert_map=None,
        apply_router_weight_on_input=False,
        activation=MoEActivation.SILU,
    )
    shapes = {
        "w13_weight": (2 * intermediate, hidden),
        "w2_weight": (hidden, intermediate),
    }
    for name, (rows, columns) in shapes.items():
        weight = torch.randn(experts * rows, columns, dtype=torch.bfloat16) * 0.02
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        param = torch.nn.Parameter(packed.view(experts, -1, 1), requires_grad=False)
        param.bnb_quant_state = state
        param.experts_shape = (experts, rows, columns)
        setattr(layer, name, param)
    return layer


def all_experts(layer):
    """Every expert dequantized with one bitsandbytes call per projection,
    then indexed: the plugin's CPU path before it decoded routed experts."""
    w13, w2 = (
        dequantize_4bit(param.reshape(-1, 1), param.bnb_quant_state).view(
            param.experts_shape
        )
        for param in (layer.w13_weight, layer.w2_weight)
    )
    return lambda expert: (w13[expert], w2[expert])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sides = {"all": all_experts, "routed": _expert_weights}
    rows = []
    for name, experts, hidden, intermediate, top_k in MODELS:
        layer = fused_moe_layer(experts, hidden, intermediate)
        for batch in BATCHES:
            x = torch.randn(batch, hidden, dtype=torch.bfloat16)
            topk_ids = torch.stack(
                [torch.randperm(experts)[:top_k] for _ in range(batch)]
            ).to(torch.int32)
            topk_weights = torch.rand(batch, top_k)
            outputs = [
                run_experts(layer, x, side(layer), topk_weights, topk_ids)
                for side in sides.values()
            ]
            if not torch.equal(*outputs):
                raise AssertionError(f"{name}, batch {batch}: the sides differ")
            samples = {side: [] for side in sides}
            for _ in range(args.repeat):
                for side, weights_of in sides.items():
                    start = time.perf_counter()
                    run_experts(layer, x, weights_of(layer), topk_weights, topk_ids)
                    samples[side].append(time.perf_counter() - start)
            row = {
                "model": name,
                "batch": batch,
                "experts_routed": topk_ids.unique().numel(),
                **{f"{s}_ms": statistics.median(v) * 1e3 for s, v in samples.items()},
            }
            row["routed_over_all"] = row["routed_ms"] / row["all_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
        del layer
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
