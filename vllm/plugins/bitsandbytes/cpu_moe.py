# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Routed experts on CPU, for weights that exist only while a forward runs.

On CPU, vLLM's unquantized fused-MoE method does not use the GPU router
(whose top-k kernel is CUDA-only) nor the Triton experts: it is "monolithic",
routing with the torch `select_experts` of `cpu_fused_moe` and then running
experts prepared once from the layer's weights. bitsandbytes' experts are
dequantized anew on every forward, so they cannot be prepared once; this
module routes the same way and runs the routed experts, each dequantized
when its turn comes.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vllm.model_executor.layers.fused_moe.activation import apply_moe_activation
from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts

# The layer attributes that parameterize routing, named as select_experts
# takes them.
ROUTING_OPTIONS = (
    "top_k",
    "use_grouped_topk",
    "renormalize",
    "topk_group",
    "num_expert_group",
    "custom_routing_function",
    "scoring_func",
    "routed_scaling_factor",
    "e_score_correction_bias",
)


def route(layer: nn.Module, x: Tensor, router_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k weights and expert ids, as vLLM's CPU MoE computes them."""
    options = {name: getattr(layer, name) for name in ROUTING_OPTIONS}
    return select_experts(hidden_states=x, router_logits=router_logits, **options)


def run_experts(
    layer: nn.Module,
    x: Tensor,
    expert_weights: Callable[[int], tuple[Tensor, Tensor]],
    topk_weights: Tensor,
    topk_ids: Tensor,
) -> Tensor:
    """Sum of each token's chosen experts, weighted by the router.

    `expert_weights` gives a local expert's `w13`, `[2 * intermediate,
    hidden]` (gate rows, then up rows), and `w2`, `[hidden, intermediate]`,
    this rank's slices; only routed experts are asked for. With
    tensor parallelism the result is this rank's partial sum, which the
    caller all-reduces as for any MoE method. Expert ids are global; an
    expert map (expert parallelism) turns them into local ones, -1 for
    experts held elsewhere.
    """
    if layer.expert_map is not None:
        topk_ids = layer.expert_map[topk_ids.long()]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        if expert < 0:
            continue
        w13, w2 = expert_weights(expert)
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        weights = topk_weights[tokens, slots].float().unsqueeze(1)
        inputs = x[tokens]
        if layer.apply_router_weight_on_input:
            inputs = inputs * weights.to(inputs.dtype)
        gate_up = inputs @ w13.t()
        hidden = gate_up.new_empty(gate_up.shape[0], w2.shape[1])
        apply_moe_activation(layer.activation, hidden, gate_up)
        expert_out = (hidden @ w2.t()).float()
        if not layer.apply_router_weight_on_input:
            expert_out = expert_out * weights
        out.index_add_(0, tokens, expert_out)
    return out.to(x.dtype)
