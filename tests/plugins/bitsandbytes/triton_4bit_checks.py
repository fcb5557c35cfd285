# SPDX-License-Identifier: Apache-2.0
"""Checks of the CUDA 4-bit path (`triton_4bit`) against bitsandbytes.

Without CUDA, Triton's interpreter runs the kernels on the CPU at small
shapes; on a GPU the same checks run compiled, at Llama-3-8B shapes, and
under CUDA-graph capture. Triton fixes whether a kernel is interpreted when
it (or triton itself) is imported, so `test_triton_4bit.py` runs this module
in its own process. It needs only torch, triton and bitsandbytes, as the
kernels do, so on a GPU machine without vLLM it runs directly:
``python3 -m pytest tests/plugins/bitsandbytes/triton_4bit_checks.py``.

The reference for the weights is `bitsandbytes.functional.dequantize_4bit`
of each shard as stored: the Triton kernel must multiply by exactly those
bfloat16 values, and a float32 matmul of them is the reference for its
products. Below `MIN_TRITON_TOKENS` the path is bitsandbytes' own
`matmul_4bit`, called once for the merged layer instead of once per shard.
"""

import pytest
import torch
from bitsandbytes import matmul_4bit
from bitsandbytes.functional import (
    QuantState,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
)

from vllm.plugins.bitsandbytes import triton_4bit as kernels

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


class MergedLayer:
    """A merged linear layer stored as a bitsandbytes checkpoint stores it.

    Each shard (q, k, v or gate, up) is quantized on its own, as transformers
    does, and its double-quantized absmax expanded to float32 as the plugin
    keeps it; `merge_shards` makes one matrix of them, as the plugin does
    after loading.
    """

    def __init__(self, shard_rows, columns, quant_type, double_quant, blocksize):
        generator = torch.Generator().manual_seed(sum(shard_rows) * columns)
        self.shards, weights = [], []
        for rows in shard_rows:
            weight = torch.randn(rows, columns, generator=generator) * 0.02
            data, state = quantize_4bit(
                weight.to(DEVICE, torch.bfloat16),
                blocksize=blocksize,
                quant_type=quant_type,
                compress_statistics=double_quant,
            )
            weights.append(dequantize_4bit(data, state))
            if state.nested:
                absmax = dequantize_blockwise(state.absmax, state.state2)
                absmax += state.offset
                state = QuantState(
                    absmax=absmax.float(),
                    shape=state.shape,
                    code=state.code,
                    blocksize=blocksize,
                    quant_type=quant_type,
                    dtype=state.dtype,
                )
            self.shards.append((data, state))
        # What bitsandbytes multiplies by: its dequantization of every shard.
        self.reference = torch.cat(weights)
        self.merged = kernels.merge_shards(
            torch.cat([data.reshape(-1) for data, _ in self.shards]),
            [state for _, state in self.shards],
        )

    def dequantize(self):
        merged = self.merged
        return kernels.dequantize(
            merged.packed, merged.state.absmax, merged.table, merged.state.blocksize
        )

    def bitsandbytes_per_shard(self, x):
        """Today's path: one `matmul_4bit` per shard."""
        return torch.cat(
            [matmul_4bit(x, data.t(), state) for data, state in self.shards], dim=1
        )


if ON_GPU:
    # Llama-3-8B: q/k/v, o, gate/up, down.
    SHAPES = [([4096, 1024, 1024], 4096), ([4096], 4096), ([14336] * 2, 4096)]
    SHAPES.append(([4096], 14336))
    TRITON_BATCHES = [4, 16, 17, 64, 256]
else:
    # Unequal shards, and a row count the kernel's tile does not divide.
    SHAPES = [([48, 16, 16], 128), ([40, 24], 192), ([24], 64)]
    TRITON_BATCHES = [kernels.MIN_TRITON_TOKENS, 17]
FORMATS = [
    ("nf4", True, 64),
    ("nf4", False, 64),
    ("fp4", True, 64),
    ("fp4", False, 128),
    ("nf4", False, 32),
]


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: "-".join(map(str, f)))
def layers(request):
    quant_type, double_quant, blocksize = request.param
    return [
        MergedLayer(rows, columns, quant_type, double_quant, blocksize)
        for rows, columns in SHAPES
        if columns % blocksize == 0
    ]


def random_input(tokens, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, columns, generator=generator).to(DEVICE, torch.bfloat16)


def test_shards_that_are_not_one_matrix_are_not_merged():
    data, state = quantize_4bit(
        torch.randn(8, 96, device=DEVICE).to(torch.bfloat16), blocksize=64
    )
    # 96 columns: blocks of 64 straddle rows.
    assert kernels.merge_shards(data.reshape(-1), [state]) is None
    nested = quantize_4bit(
        torch.randn(8, 128, device=DEVICE), blocksize=64, compress_statistics=True
    )
    assert kernels.merge_shards(nested[0].reshape(-1), [nested[1]]) is None


def test_dequantized_weights_equal_bitsandbytes(layers):
    for layer in layers:
        # torch.equal: every value identical (FP4's -0.0 equals 0.0, see
        # decode_table).
        assert torch.equal(layer.dequantize(), layer.reference)


@pytest.mark.parametrize("tokens", TRITON_BATCHES)
def test_matmul_matches_float32_reference(layers, tokens):
    for index, layer in enumerate(layers):
        x = random_input(tokens, layer.reference.shape[1], seed=tokens + index)
        out = kernels.matmul(x, layer.merged)
        expected = x.float() @ layer.reference.float().T
        # The output is rounded to bfloat16: half an ulp, at most 2**-8 of
        # the value. Each side's float32 sum is off by at most
        # K * 2**-24 * sum|x * w|.
        magnitude = x.float().abs() @ layer.reference.float().abs().T
        rounding = 2 * x.shape[1] * 2**-24 * magnitude
        error = (out.float() - expected).abs()
        assert out.dtype == torch.bfloat16
        assert torch.all(error <= 2**-8 * expected.abs() + rounding)


def test_matmul_multiplies_by_the_exact_weights(layers):
    """One-hot rows of x pick single weights: the product is that weight,
    exactly."""
    tokens = max(16, kernels.MIN_TRITON_TOKENS)
    for layer in layers:
        columns = layer.reference.shape[1]
        picked = torch.randperm(columns, generator=torch.Generator().manual_seed(0))
        picked = picked[:tokens].to(DEVICE)
        x = torch.zeros(tokens, columns, dtype=torch.bfloat16, device=DEVICE)
        x[torch.arange(tokens, device=DEVICE), picked] = 1
        out = kernels.matmul(x, layer.merged)
        assert torch.equal(out, layer.reference[:, picked].T)


@pytest.mark.parametrize("tokens", [1, kernels.MIN_TRITON_TOKENS])
def test_matmul_writes_all_of_out(layers, tokens):
    layer = layers[0]
    x = random_input(tokens, layer.reference.shape[1], seed=5)
    out = torch.full(
        (tokens, layer.reference.shape[0]),
        torch.nan,
        dtype=torch.bfloat16,
        device=DEVICE,
    )
    assert kernels.matmul(x, layer.merged, out=out) is out
    assert torch.equal(out, kernels.matmul(x, layer.merged))


@pytest.mark.parametrize("tokens", range(1, kernels.MIN_TRITON_TOKENS))
def test_few_tokens_are_today_s_bitsandbytes_product(layers, tokens):
    """Below MIN_TRITON_TOKENS, one bitsandbytes call on the merged layer
    computes what one call per shard computes."""
    for layer in layers:
        x = random_input(tokens, layer.reference.shape[1], seed=tokens)
        torch.testing.assert_close(
            kernels.matmul(x, layer.merged), layer.bitsandbytes_per_shard(x)
        )


if ON_GPU:

    @pytest.mark.parametrize("tokens", [1, 16, 256])
    def test_cuda_graph_replay(layers, tokens):
        """Captured once, replayed on new inputs: the results of eager calls."""
        layer = layers[0]
        columns = layer.reference.shape[1]
        static_x = random_input(tokens, columns, seed=1)
        kernels.matmul(static_x, layer.merged)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = kernels.matmul(static_x, layer.merged)
        for seed in (2, 3):
            static_x.copy_(random_input(tokens, columns, seed=seed))
            graph.replay()
            assert torch.equal(static_out, kernels.matmul(static_x, layer.merged))
