# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit fused-MoE method.

All experts of a layer share one packed tensor per projection: `w13_weight`
holds, per expert, the packed gate (w1) rows followed by the packed up (w3)
rows; `w2_weight` the packed down projection. The loader fuses the experts'
quantization states into one state per tensor, in whole blocks per expert.

A forward pass dequantizes only the experts its tokens are routed to (a
token picks `top_k` of them, so a decode step of a few tokens needs a few
experts, not all) and runs the unquantized fused-MoE kernel on them. A
forward of at most PAIRS_PER_EXPERT (token, expert) pairs per expert skips
the decode: each pair is multiplied by its expert's 4-bit weights in
registers (`fragment_4bit.routed_matmul`). On CPU, where the fused-MoE
kernel and its router are CUDA-only, the torch routine of `cpu_moe` runs
instead.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vllm.logger import init_logger
from vllm.model_executor.layers import fused_moe
from vllm.model_executor.layers.fused_moe.activation import (
    MoEActivation,
    apply_moe_activation,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig, require_bitsandbytes
from vllm.plugins.bitsandbytes.linear import packed_4bit_size
from vllm.plugins.bitsandbytes.shard_indexer import ProportionalShardIndexer

logger = init_logger(__name__)

# Most (token, expert) pairs per expert of the layer that a forward
# multiplies pair by pair in registers, each pair reading its expert's 4-bit
# weights, instead of decoding the routed experts for the fused-MoE kernel.
# Measured on an H100 (docs/benchmarks.md, section 5): at 4 pairs per expert
# 0.54x the decode's time at Mixtral-8x7B shapes (32 pairs, 8 experts) and
# 0.20x at Qwen3-30B-A3B (512 pairs, 128 experts); at 8 per expert 1.04x.
PAIRS_PER_EXPERT = 4


class BitsAndBytesMoEMethod(fused_moe.FusedMoEMethodBase):
    """Packed 4-bit expert weights, dequantized on the fly."""

    def __init__(
        self, quant_config: BitsAndBytesConfig, moe: fused_moe.FusedMoEConfig
    ) -> None:
        super().__init__(moe)
        require_bitsandbytes()
        if quant_config.load_in_8bit:
            raise ValueError(
                "bitsandbytes 8-bit quantization does not support MoE experts; "
                "use a 4-bit checkpoint or quantize online from the "
                "unquantized one."
            )
        self.quant_config = quant_config

    def get_fused_moe_quant_config(
        self, layer: nn.Module
    ) -> fused_moe.FusedMoEQuantConfig | None:
        # Weights are dequantized before the unquantized kernel runs.
        return None

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        logical_shapes = {
            # gate and up projections stacked, column parallel
            "w13_weight": (2 * intermediate_size_per_partition, hidden_size),
            # down projection, row parallel
            "w2_weight": (hidden_size, intermediate_size_per_partition),
        }
        for name, (rows, columns) in logical_shapes.items():
            size = packed_4bit_size(rows * columns)
            weight = nn.Parameter(
                torch.empty(num_experts, size, 1, dtype=torch.uint8),
                requires_grad=False,
            )
            set_weight_attrs(
                weight,
                {
                    **extra_weight_attrs,
                    "shard_indexer": ProportionalShardIndexer(size),
                    # The loader quantizes each rank's part of every expert.
                    "weight_loader": layer.indexed_weight_loader,
                    "experts_shape": (num_experts, rows, columns),
                },
            )
            layer.register_parameter(name, weight)

    def apply(
        self,
        layer: nn.Module,
        x: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        shared_experts: fused_moe.SharedExperts | None,
        shared_experts_input: Tensor | None,
    ) -> Tensor:
        if _multiplies_pairs(layer, x, topk_ids):
            return _pair_products(layer, x, topk_weights, topk_ids)
        w13, w2, topk_ids, num_experts = _experts_for(layer, topk_ids)
        return fused_moe.fused_experts(
            x,
            w13,
            w2,
            topk_weights,
            topk_ids,
            activation=layer.activation,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=num_experts,
            expert_map=layer.expert_map,
            quant_config=None,
        )

    @property
    def is_monolithic(self) -> bool:
        # On CPU, route and run the experts in torch like vLLM's own CPU MoE:
        # the modular path's router needs a CUDA-only top-k kernel.
        return current_platform.is_cpu()

    def apply_monolithic(
        self,
        layer: nn.Module,
        x: Tensor,
        router_logits: Tensor,
        input_ids: Tensor | None = None,
    ) -> Tensor:
        from vllm.plugins.bitsandbytes.cpu_moe import route, run_experts

        topk_weights, topk_ids = route(layer, x, router_logits)
        return run_experts(layer, x, _expert_weights(layer), topk_weights, topk_ids)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """On CUDA, let the plugin's Triton kernel decode bfloat16 experts."""
        for weight in (layer.w13_weight, layer.w2_weight):
            weight.bnb_merged = None
            state = weight.bnb_quant_state
            if current_platform.is_cuda() and state.dtype == torch.bfloat16:
                from vllm.plugins.bitsandbytes import triton_4bit

                weight.bnb_merged = triton_4bit.merge_shards(
                    weight.data.reshape(-1), [state]
                )


def _multiplies_pairs(layer: nn.Module, x: Tensor, topk_ids: Tensor) -> bool:
    """Whether `_pair_products` computes this forward: few pairs per expert,
    bfloat16 experts prepared for the Triton kernels, in shapes the fragment
    kernel takes, all experts local, SiLU, router weights on the outputs."""
    num_experts = layer.w13_weight.experts_shape[0]
    if not (
        0 < topk_ids.numel() <= PAIRS_PER_EXPERT * num_experts
        and x.dtype == torch.bfloat16
        and layer.expert_map is None
        and not layer.apply_router_weight_on_input
        and layer.activation == MoEActivation.SILU
    ):
        return False
    from vllm.plugins.bitsandbytes import fragment_4bit

    return all(
        weight.bnb_merged is not None
        and fragment_4bit.supports_routed(weight.bnb_merged, weight.experts_shape[1])
        for weight in (layer.w13_weight, layer.w2_weight)
    )


def _pair_products(
    layer: nn.Module, x: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> Tensor:
    """Each token's routed experts' outputs, weighted by the router and
    summed, one (token, expert) product at a time (this rank's partial sum
    under tensor parallelism, as `fused_experts` returns)."""
    from vllm.plugins.bitsandbytes import fragment_4bit

    tokens, top_k = topk_ids.shape
    experts = topk_ids.reshape(-1)
    pairs = torch.arange(experts.numel(), device=x.device, dtype=torch.int32)
    gate_up_rows = layer.w13_weight.experts_shape[1]
    gate_up = fragment_4bit.routed_matmul(
        x, layer.w13_weight.bnb_merged, experts, pairs // top_k, gate_up_rows
    )
    hidden = gate_up.new_empty(gate_up.shape[0], gate_up_rows // 2)
    apply_moe_activation(layer.activation, hidden, gate_up)
    down = fragment_4bit.routed_matmul(
        hidden,
        layer.w2_weight.bnb_merged,
        experts,
        pairs,
        layer.w2_weight.experts_shape[1],
    )
    weighted = down.view(tokens, top_k, -1).float() * topk_weights[..., None]
    return weighted.sum(dim=1).to(x.dtype)


def _experts_for(
    layer: nn.Module, topk_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The dequantized `w13` and `w2` that `topk_ids` needs, the ids into
    them, and how many experts they hold.

    Only the routed experts where the Triton kernel decodes (bfloat16 models
    on CUDA) and a batch routes to fewer slots than there are experts; all
    of them otherwise, and under expert parallelism, whose expert map
    numbers the experts.
    """
    num_experts = layer.global_num_experts
    routed = None
    if (
        layer.expert_map is None
        and topk_ids.numel() < num_experts
        and layer.w13_weight.bnb_merged is not None
        and layer.w2_weight.bnb_merged is not None
    ):
        from vllm.plugins.bitsandbytes.triton_4bit import compact_routing

        routed, topk_ids = compact_routing(topk_ids, num_experts)
        num_experts = routed.numel()
    w13 = _dequantize(layer.w13_weight, routed)
    return w13, _dequantize(layer.w2_weight, routed), topk_ids, num_experts


def _dequantize(weight: nn.Parameter, routed: Tensor | None) -> Tensor:
    """The experts of `routed`, in that order, or all experts if it is None.

    The Triton kernel decodes where `process_weights_after_loading` prepared
    it (`routed` needs it), bitsandbytes elsewhere."""
    num_experts, rows, columns = weight.experts_shape
    merged = weight.bnb_merged
    if merged is None:
        from bitsandbytes.functional import dequantize_4bit

        flat = dequantize_4bit(weight.reshape(-1, 1), weight.bnb_quant_state)
        return flat.reshape(num_experts, rows, columns)
    from vllm.plugins.bitsandbytes import triton_4bit

    state = merged.state
    flat = triton_4bit.dequantize(
        merged.packed, state.absmax, merged.table, state.blocksize, routed, rows
    )
    return flat.reshape(-1, rows, columns)


def _expert_weights(layer: nn.Module) -> Callable[[int], tuple[Tensor, Tensor]]:
    """A function from a local expert id to its dequantized w13 and w2."""
    return lambda expert: (
        _dequantize_expert(layer.w13_weight, expert),
        _dequantize_expert(layer.w2_weight, expert),
    )


def _dequantize_expert(weight: nn.Parameter, expert: int) -> Tensor:
    """One expert of a fused weight, by bitsandbytes (the loader checked that
    its blocks lie within it)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    _, rows, columns = weight.experts_shape
    state = weight.bnb_quant_state
    size = rows * columns
    blocks = size // state.blocksize
    packed = weight.data.reshape(-1)[expert * size // 2 : (expert + 1) * size // 2]
    expert_state = QuantState(
        absmax=state.absmax[expert * blocks : (expert + 1) * blocks],
        shape=torch.Size((rows, columns)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return dequantize_4bit(packed.reshape(-1, 1), expert_state)
