# SPDX-License-Identifier: Apache-2.0
"""Checks of the fused-MoE method's choice of experts to dequantize.

On CUDA, `moe._experts_for` decodes only the experts a batch is routed to
and renumbers the routing into them. vLLM's fused-MoE kernel, which then
runs, is CUDA-only, so these checks stop before it: the weights and ids it
would receive must select, for every token, exactly bitsandbytes' weights
of the experts the router chose. `test_triton_4bit.py` runs this module in
its own process, under Triton's interpreter without CUDA (the decode kernel
is Triton), compiled with it.
"""

from types import SimpleNamespace

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.plugins.bitsandbytes import triton_4bit
from vllm.plugins.bitsandbytes.moe import (
    PAIRS_PER_EXPERT,
    _experts_for,
    _multiplies_pairs,
    _pair_products,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_EXPERTS, HIDDEN, INTERMEDIATE = 16, 128, 64


def fused_weight(rows, columns, seed, prepared):
    """One projection of all experts stored as the plugin stores it, with
    the Triton decode prepared (`process_weights_after_loading` on CUDA for
    bfloat16 models) or not; and bitsandbytes' dequantization of it."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_EXPERTS * rows, columns, generator=generator) * 0.02
    packed, state = quantize_4bit(weight.to(DEVICE, torch.bfloat16), blocksize=64)
    param = torch.nn.Parameter(packed.view(NUM_EXPERTS, -1, 1), requires_grad=False)
    param.bnb_quant_state = state
    param.experts_shape = (NUM_EXPERTS, rows, columns)
    param.bnb_merged = (
        triton_4bit.merge_shards(packed.reshape(-1), [state]) if prepared else None
    )
    return param, dequantize_4bit(packed, state).view(param.experts_shape)


def moe_layer(prepared=True, expert_map=None, hidden=HIDDEN, intermediate=INTERMEDIATE):
    w13, w13_reference = fused_weight(2 * intermediate, hidden, 0, prepared)
    w2, w2_reference = fused_weight(hidden, intermediate, 1, prepared)
    layer = SimpleNamespace(
        global_num_experts=NUM_EXPERTS,
        expert_map=expert_map,
        w13_weight=w13,
        w2_weight=w2,
        activation=MoEActivation.SILU,
        apply_router_weight_on_input=False,
    )
    return layer, w13_reference, w2_reference


def routing(tokens, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    picks = [
        torch.randperm(NUM_EXPERTS, generator=generator)[:top_k] for _ in range(tokens)
    ]
    return torch.stack(picks).to(DEVICE, torch.int32)


@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 4), (2, 2)])
def test_few_tokens_decode_only_their_experts(tokens, top_k):
    layer, w13_reference, w2_reference = moe_layer()
    topk_ids = routing(tokens, top_k, seed=tokens)
    if tokens == 2:
        topk_ids[1] = topk_ids[0]  # shared experts leave slots to fill
    w13, w2, ids, num_experts = _experts_for(layer, topk_ids)
    assert num_experts == topk_ids.numel() == w13.shape[0] == w2.shape[0]
    assert ids.dtype == topk_ids.dtype
    assert torch.equal(w13[ids.long()], w13_reference[topk_ids.long()])
    assert torch.equal(w2[ids.long()], w2_reference[topk_ids.long()])


@pytest.mark.parametrize(
    "layer_options, tokens",
    [
        ({}, 8),  # 16 routed slots, as many as experts
        ({"prepared": False}, 1),  # bitsandbytes decodes
        ({"expert_map": torch.arange(NUM_EXPERTS)}, 1),  # expert parallelism
    ],
    ids=["every-slot", "bitsandbytes", "expert-map"],
)
def test_otherwise_every_expert_is_decoded(layer_options, tokens):
    layer, w13_reference, w2_reference = moe_layer(**layer_options)
    topk_ids = routing(tokens, 2, seed=5)
    w13, w2, ids, num_experts = _experts_for(layer, topk_ids)
    assert num_experts == NUM_EXPERTS
    assert ids is topk_ids
    assert torch.equal(w13, w13_reference)
    assert torch.equal(w2, w2_reference)


# Shapes the routed fragment kernel takes: experts of whole programs of
# rows, rows of whole steps of columns.
PAIR_HIDDEN, PAIR_INTERMEDIATE = 256, 256


@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 4), (12, 4)])
def test_decode_steps_multiply_each_pair(tokens, top_k):
    """A decode step's output, pair by pair in registers, is the float32
    MoE of bitsandbytes' weights: the routed experts' SwiGLU MLPs weighted
    by the router, up to bfloat16 rounding (the gate/up products and the
    SiLU product are rounded to bfloat16 as the fused-MoE kernel rounds
    them, each within 2**-8 relative, and so is the output)."""
    layer, w13_reference, w2_reference = moe_layer(
        hidden=PAIR_HIDDEN, intermediate=PAIR_INTERMEDIATE
    )
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, PAIR_HIDDEN, generator=generator).to(DEVICE, torch.bfloat16)
    topk_ids = routing(tokens, top_k, seed=tokens)
    topk_weights = torch.randn(tokens, top_k, generator=generator).softmax(-1)
    topk_weights = topk_weights.to(DEVICE)
    assert _multiplies_pairs(layer, x, topk_ids)
    out = _pair_products(layer, x, topk_weights, topk_ids)

    gate, up = (
        torch.einsum("th,tkih->tki", x.float(), w13_reference[topk_ids.long()].float())
        .bfloat16()
        .float()
        .chunk(2, dim=-1)
    )
    hidden = (torch.nn.functional.silu(gate) * up).bfloat16().float()
    down = torch.einsum("tki,tkhi->tkh", hidden, w2_reference[topk_ids.long()].float())
    expected = (down * topk_weights[..., None]).sum(dim=1)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    error = (out.float() - expected).norm() / expected.norm()
    assert error < 2**-6, error


@pytest.mark.parametrize(
    "change",
    ["too-many-pairs", "bitsandbytes", "expert-map", "router-weight-on-input"],
)
def test_other_forwards_decode_experts(change):
    """Where the pair products do not apply, `apply` decodes experts."""
    layer, _, _ = moe_layer(
        prepared=change != "bitsandbytes",
        hidden=PAIR_HIDDEN,
        intermediate=PAIR_INTERMEDIATE,
    )
    # Two experts per token: one pair past the limit, or one token short.
    tokens = PAIRS_PER_EXPERT * NUM_EXPERTS // 2 + (change == "too-many-pairs")
    topk_ids = routing(tokens, 2, seed=1)
    x = torch.zeros(tokens, PAIR_HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    if change == "expert-map":
        layer.expert_map = torch.arange(NUM_EXPERTS, device=DEVICE)
    layer.apply_router_weight_on_input = change == "router-weight-on-input"
    assert not _multiplies_pairs(layer, x, topk_ids)
    # The shapes of the other layers are not the fragment kernel's.
    small, _, _ = moe_layer()
    assert not _multiplies_pairs(small, x[:1, :HIDDEN], topk_ids[:1])
