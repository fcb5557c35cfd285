# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes linear method: 4-bit (NF4/FP4) and LLM.int8() weights.

Weights are stored exactly as bitsandbytes produces them so pre-quantized
checkpoints load by plain copy. The model loader attaches to every weight
`bnb_quant_state` (logical shard index -> bitsandbytes state) and
`bnb_shard_offsets` (where each shard starts in the storage). On CUDA a
merged 4-bit layer is prepared after loading to run as one matrix
(`triton_4bit`); elsewhere it runs one bitsandbytes matmul per shard.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig, require_bitsandbytes
from vllm.plugins.bitsandbytes.shard_indexer import (
    VALUES_PER_PACKED_BYTE,
    ProportionalShardIndexer,
)
from vllm.utils.torch_utils import direct_register_custom_op

logger = init_logger(__name__)

# bitsandbytes computes in bfloat16 for both weight formats.
COMPUTE_DTYPE = torch.bfloat16
# The first forward is the memory-profiling run and the second the first real
# step; LLM.int8() matmul state is rebuilt for both and reused afterwards.
INT8_STATE_REBUILD_CALLS = 2


class Packed4BitWeight(nn.Parameter):
    """Packed uint8 storage that reports the model's dtype.

    Code that infers the model dtype from its parameters (LoRA, dtype checks)
    must see the activation dtype, not the packing type. It is fixed when the
    weight is created: the loader quantizes under a float32 default dtype.
    """

    model_dtype: torch.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.model_dtype


def packed_4bit_size(num_values: int) -> int:
    """Bytes bitsandbytes needs for `num_values` 4-bit values."""
    if num_values % VALUES_PER_PACKED_BYTE:
        raise ValueError(
            f"A bitsandbytes 4-bit weight needs an even number of values, got "
            f"{num_values}; leave this layer unquantized with "
            "llm_int8_skip_modules."
        )
    return num_values // VALUES_PER_PACKED_BYTE


def _matmul_4bit_shards(x: Tensor, weight: Tensor, starts: Tensor, out: Tensor) -> None:
    """Multiply by a packed weight into `out`: as one matrix where it was
    merged after loading, else each shard into its columns.

    `starts` is the weight's `bnb_shard_offsets`, passed explicitly because a
    custom op's schema only describes its tensor arguments. Writing through
    slices (not `matmul_4bit(out=...)`) avoids
    https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1235.
    """
    merged = weight.bnb_merged
    if merged is not None:
        from vllm.plugins.bitsandbytes import triton_4bit

        triton_4bit.matmul(x, merged, out=out)
        return

    from bitsandbytes import matmul_4bit

    quant_states = weight.bnb_quant_state
    column = 0
    for index in range(len(quant_states)):
        state = quant_states[index]
        rows = state.shape[0]
        shard = weight[starts[index] : starts[index + 1]]
        out[:, column : column + rows] = matmul_4bit(x, shard.t(), state)
        column += rows


# An opaque op keeps torch.compile from tracing into bitsandbytes; under
# tracing it only declares that `out` is written.
direct_register_custom_op(
    op_name="bitsandbytes_matmul_4bit",
    op_func=_matmul_4bit_shards,
    mutates_args=["out"],
    fake_impl=lambda x, weight, starts, out: None,
)


class BitsAndBytesLinearMethod(LinearMethodBase):
    """Creates bitsandbytes weights and runs the matching matmul."""

    def __init__(self, quant_config: BitsAndBytesConfig) -> None:
        require_bitsandbytes()
        self.quant_config = quant_config

    # vLLM's layers pass these by position or by name, so both are fixed by
    # `LinearMethodBase`. Only this rank's rows and columns size the packed
    # weight; the full layer's sizes are not needed.
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **weight_attrs: Any,
    ) -> None:
        rows = sum(output_partition_sizes)
        if self.quant_config.load_in_8bit:
            weight = self._create_int8_weight(rows, input_size_per_partition)
        else:
            weight = self._create_4bit_weight(
                rows, input_size_per_partition, params_dtype
            )
        # Named `weight` like the checkpoint tensors it is loaded from; the
        # layer's weight_loader and the like ride along as its attributes.
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, weight_attrs)

    def _create_4bit_weight(
        self, rows: int, columns: int, model_dtype: torch.dtype
    ) -> Packed4BitWeight:
        size = packed_4bit_size(rows * columns)
        weight = Packed4BitWeight(
            torch.empty(size, 1, dtype=torch.uint8), requires_grad=False
        )
        set_weight_attrs(
            weight,
            {
                "model_dtype": model_dtype,
                "shard_indexer": ProportionalShardIndexer(size),
                "pack_factor": VALUES_PER_PACKED_BYTE,
                # The one storage dimension packs both logical ones.
                "output_dim": 0,
                "input_dim": 0,
                "packed_dim": 0,
                # The loader quantizes or re-shards each rank's part itself.
                "is_sharded_weight": True,
            },
        )
        return weight

    def _create_int8_weight(self, rows: int, columns: int) -> nn.Parameter:
        from bitsandbytes.nn import Int8Params

        weight = Int8Params(
            data=torch.empty(rows, columns, dtype=torch.int8),
            has_fp16_weights=self.quant_config.llm_int8_has_fp16_weight,
            requires_grad=False,
        )
        set_weight_attrs(
            weight,
            {"input_dim": 1, "output_dim": 0, "pack_factor": 1, "generation": 0},
        )
        return weight

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Work out once what every forward needs: the output width and, for
        4-bit weights on CUDA, the merged storage (`triton_4bit`)."""
        weight = layer.weight
        states = [weight.bnb_quant_state[i] for i in range(len(weight.bnb_quant_state))]
        weight.bnb_output_rows = sum(state.shape[0] for state in states)
        if self.quant_config.load_in_8bit:
            return
        weight.bnb_merged = None
        if current_platform.is_cuda():
            from vllm.plugins.bitsandbytes import triton_4bit

            weight.bnb_merged = triton_4bit.merge_shards(weight.data, states)
            if weight.bnb_merged is None:
                logger.debug_once(
                    "A bitsandbytes layer's shards differ in quantization or "
                    "have blocks straddling rows; it runs one matmul per shard."
                )

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
        input_dtype = x.dtype
        # vLLM passes one row per token; flatten only other callers' batches,
        # so a forward step dispatches no reshape it does not need.
        leading_shape = None if x.dim() == 2 else x.shape[:-1]
        x_2d = x if leading_shape is None else x.reshape(-1, x.shape[-1])
        x_2d = x_2d.to(COMPUTE_DTYPE)
        weight = layer.weight
        rows = weight.bnb_output_rows
        if self.quant_config.load_in_8bit:
            out = self._matmul_int8(weight, x_2d, rows)
        else:
            out = torch.empty(x_2d.shape[0], rows, dtype=COMPUTE_DTYPE, device=x.device)
            torch.ops.vllm.bitsandbytes_matmul_4bit(
                x_2d, weight, weight.bnb_shard_offsets, out
            )
        out = out.to(input_dtype)
        if leading_shape is not None:
            out = out.view(*leading_shape, rows)
        if bias is not None:
            out += bias
        return out

    def _matmul_int8(self, weight: nn.Parameter, x_2d: Tensor, rows: int) -> Tensor:
        """LLM.int8() matmul per shard, with one reusable state per shard."""
        from bitsandbytes import MatmulLtState, matmul

        offsets = weight.bnb_shard_offsets.tolist()
        scales = weight.bnb_quant_state
        if weight.generation < INT8_STATE_REBUILD_CALLS:
            weight.matmul_state = []
            for index in range(len(scales)):
                state = MatmulLtState()
                state.CB = weight[offsets[index] : offsets[index + 1]]
                state.SCB = scales[index].to(x_2d.device)
                state.threshold = self.quant_config.llm_int8_threshold
                state.has_fp16_weights = self.quant_config.llm_int8_has_fp16_weight
                state.is_training = False
                state.use_pool = state.threshold > 0.0 and not state.has_fp16_weights
                weight.matmul_state.append(state)

        # bitsandbytes returns float16 from the int8 kernel.
        out = torch.empty(x_2d.shape[0], rows, dtype=torch.float16, device=x_2d.device)
        column = 0
        x_3d = x_2d.unsqueeze(0)
        for index, state in enumerate(weight.matmul_state):
            shard_rows = scales[index].shape[0]
            shard = weight[offsets[index] : offsets[index + 1]]
            out[:, column : column + shard_rows] = matmul(x_3d, shard, state=state)
            column += shard_rows
        weight.generation += 1
        return out
