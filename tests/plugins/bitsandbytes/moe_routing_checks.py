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

from vllm.plugins.bitsandbytes import triton_4bit
from vllm.plugins.bitsandbytes.moe import _experts_for

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


def moe_layer(prepared=True, expert_map=None):
    w13, w13_reference = fused_weight(2 * INTERMEDIATE, HIDDEN, 0, prepared)
    w2, w2_reference = fused_weight(HIDDEN, INTERMEDIATE, 1, prepared)
    layer = SimpleNamespace(
        global_num_experts=NUM_EXPERTS,
        expert_map=expert_map,
        w13_weight=w13,
        w2_weight=w2,
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
