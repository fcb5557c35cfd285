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
products. Below `MIN_TRITON_TOKENS`, for layers neither register kernel
takes, the path is bitsandbytes' own `matmul_4bit`, called once for the
merged layer instead of once per shard.

The register kernels, `fragment_4bit` (which `matmul` runs up to 16 tokens)
and `fused_4bit` (up to 128), are also checked on their own, at every token
count and split of K. Their decode is inline PTX, which the interpreter
cannot run (it runs a table-load decode instead). `PtxEmulator` executes
that PTX instruction by instruction on the CPU, as the PTX ISA defines each
instruction, so the decode the GPU runs is checked here too; likewise
`fragment_4bit._mma` computes what `mma.sync` computes from its lanes.
"""

import operator

import numpy as np
import pytest
import torch
from bitsandbytes import matmul_4bit
from bitsandbytes.functional import (
    QuantState,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
)

from vllm.plugins.bitsandbytes import fragment_4bit, fused_4bit, wgmma_4bit
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


class PtxEmulator:
    """Runs the straight-line PTX of `triton_4bit` on numpy uint32 lanes.

    Only the instructions that PTX uses, with the semantics of the PTX ISA:
    `prmt` in its default mode (selector bit 3 replicates the chosen byte's
    sign bit), `lop3` with its truth table, `cvt.rn.bf16x2.f32` (first
    source in the upper half, round to nearest even), `mul.rn.f32`.
    """

    SHIFTS_AND_MASKS = {
        "and.b32": operator.and_,
        "shl.b32": operator.lshift,
        "shr.b32": operator.rshift,
    }

    def __init__(self, operands):
        # $i -> uint32 lanes (float32 operands are kept as float32 lanes)
        self.registers = {f"${i}": value for i, value in enumerate(operands)}

    def value(self, token):
        token = token.strip()
        if token in self.registers:
            return self.registers[token]
        return np.uint32(int(token, 0))

    @staticmethod
    def prmt(a, b, selector):
        source = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
        out = np.zeros_like(a, dtype=np.uint32)
        for byte in range(4):
            nibble = (selector >> (4 * byte)) & 15
            picked = (source >> (8 * (nibble & 7)).astype(np.uint64)) & 0xFF
            sign = np.where(picked & 0x80, 0xFF, 0)
            picked = np.where(nibble & 8, sign, picked).astype(np.uint32)
            out |= picked << (8 * byte)
        return out

    @staticmethod
    def lop3(a, b, c, table):
        out = np.zeros_like(a, dtype=np.uint32)
        for term in range(8):
            if table >> term & 1:
                out |= (
                    (a if term & 4 else ~a)
                    & (b if term & 2 else ~b)
                    & (c if term & 1 else ~c)
                )
        return out

    @staticmethod
    def bfloat16_bits(value):
        rounded = torch.from_numpy(np.asarray(value, np.float32)).to(torch.bfloat16)
        return rounded.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF

    def run(self, ptx):
        for line in ptx.splitlines():
            line = line.strip().rstrip(";")
            if line in ("{", "}") or line.startswith(".reg"):
                continue
            opcode, rest = line.split(None, 1)
            target, *args = [token.strip() for token in rest.split(",")]
            if opcode == "mul.rn.f32":
                a, b = (np.float32(self.value(arg)) for arg in args)
                self.registers[target] = a * b
                continue
            if opcode == "cvt.rn.bf16x2.f32":
                high, low = (self.bfloat16_bits(self.value(arg)) for arg in args)
                result = (high << 16) | low
            elif opcode == "prmt.b32":
                result = self.prmt(*(self.value(arg) for arg in args))
            elif opcode == "lop3.b32":
                a, b, c = (self.value(arg) for arg in args[:3])
                result = self.lop3(a, b, c, int(args[3], 0))
            else:
                a, b = (self.value(arg) for arg in args)
                result = self.SHIFTS_AND_MASKS[opcode](a, b)
            self.registers[target] = np.asarray(result).astype(np.uint32)
        return self.registers


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_ptx_gives_bitsandbytes_weights(quant_type):
    """The compiled kernel's decode, emulated: every nibble value at every
    position of a word, and random words, under random block absmax."""
    generator = torch.Generator().manual_seed(3)
    every_value = [value * 0x11111111 for value in range(16)]
    random_words = torch.randint(0, 2**32, (8 * 126,), generator=generator)
    words = np.array(every_value + random_words.tolist(), dtype=np.uint32)
    absmax = (torch.rand(len(words) // 8, generator=generator) * 4 + 1e-3).float()
    # bitsandbytes' weights: 8 words (64 values) per block of absmax.
    state = QuantState(
        absmax=absmax,
        shape=(8 * len(words),),
        blocksize=64,
        quant_type=quant_type,
        dtype=torch.bfloat16,
    )
    packed = torch.from_numpy(words.view(np.uint8).copy()).reshape(-1, 1)
    expected = dequantize_4bit(packed, state).reshape(-1, 8)

    codes = kernels.decode_table(quant_type, torch.device("cpu")).numpy()
    word_absmax = absmax.repeat_interleave(8).numpy()
    tables = PtxEmulator([None] * 8 + [word_absmax, *codes]).run(
        kernels.TABLE_PTX.value
    )
    registers = PtxEmulator(
        [None] * 4 + [words] + [tables[f"${i}"] for i in range(8)]
    ).run(kernels.DECODE_PTX.value)
    # Each pair holds two consecutive columns, the first in its low half.
    pairs = np.stack([registers[f"${i}"] for i in range(4)], axis=1)
    bits = np.stack([pairs & 0xFFFF, pairs >> 16], axis=2).astype(np.uint16)
    bits = bits.reshape(-1, 8).astype(np.int16)
    decoded = torch.from_numpy(bits).view(torch.bfloat16)
    # torch.equal: every value identical (FP4's -0.0 equals 0.0).
    assert torch.equal(decoded, expected)


if ON_GPU:
    # Llama-3-8B: q/k/v, o, gate/up, down.
    SHAPES = [([4096, 1024, 1024], 4096), ([4096], 4096), ([14336] * 2, 4096)]
    SHAPES.append(([4096], 14336))
    FRAGMENT_SHAPES = SHAPES
    TRITON_BATCHES = [2, 4, 16, 17, 64, 65, 96, 128, 129, 256]
    FUSED_BATCHES = [1, 2, 4, 16, 17, 64, 256]
    # (None: as many ranges of K as fill the GPU)
    FUSED_SPLITS = [None, 1]
    # Rows per expert when a layer is read as a stack of experts (MoE).
    EXPERT_ROWS = 1024
    ROUTED_SHAPES = SHAPES
else:
    # Unequal shards, and a row count the kernel's tile does not divide.
    SHAPES = [([48, 16, 16], 128), ([40, 24], 192), ([24], 64)]
    # `fragment_4bit` takes steps of 256 columns.
    FRAGMENT_SHAPES = [([48, 16, 16], 512), ([24], 256)]
    TRITON_BATCHES = [2, kernels.MIN_TRITON_TOKENS, 17, 130]
    FUSED_BATCHES = [1, 3, 17, 130]
    FUSED_SPLITS = [1, 3]
    # Fewer than a program of the decode kernel covers, so one program
    # gathers rows of several experts.
    EXPERT_ROWS = 8
    # Three experts of one routed fragment program's rows each.
    ROUTED_SHAPES = [([128] * 3, 256)]
FORMATS = [
    ("nf4", True, 64),
    ("nf4", False, 64),
    ("fp4", True, 64),
    ("fp4", False, 128),
    ("nf4", False, 32),
]


def merged_layers(layer_format, shapes):
    """A MergedLayer of each of `shapes` whose columns the format's blocks
    divide."""
    quant_type, double_quant, blocksize = layer_format
    return [
        MergedLayer(rows, columns, quant_type, double_quant, blocksize)
        for rows, columns in shapes
        if columns % blocksize == 0
    ]


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: "-".join(map(str, f)))
def layers(request):
    return merged_layers(request.param, SHAPES)


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


def test_dequantize_refuses_rows_of_partial_words():
    """The decode reads int32 words of 8 values: rows of 6 columns are an
    error, not a misread."""
    packed = torch.zeros(2, 3, dtype=torch.uint8, device=DEVICE)
    absmax = torch.ones(2, dtype=torch.float32, device=DEVICE)
    table = kernels.decode_table("nf4", torch.device(DEVICE))
    with pytest.raises(ValueError, match="words of 8 columns"):
        kernels.dequantize(packed, absmax, table, 6)


def assert_matches_float32_reference(out, x, reference):
    expected = x.float() @ reference.float().T
    # The output is rounded to bfloat16: half an ulp, at most 2**-8 of the
    # value. Each side's float32 sum is off by at most
    # K * 2**-24 * sum|x * w|.
    magnitude = x.float().abs() @ reference.float().abs().T
    rounding = 2 * x.shape[1] * 2**-24 * magnitude
    error = (out.float() - expected).abs()
    assert out.dtype == torch.bfloat16
    assert torch.all(error <= 2**-8 * expected.abs() + rounding)


@pytest.mark.parametrize("tokens", TRITON_BATCHES)
def test_matmul_matches_float32_reference(layers, tokens):
    for index, layer in enumerate(layers):
        x = random_input(tokens, layer.reference.shape[1], seed=tokens + index)
        assert_matches_float32_reference(
            kernels.matmul(x, layer.merged), x, layer.reference
        )


def fused_layers(layers):
    """The layers the fused kernel takes; it refuses the others."""
    for layer in layers:
        if fused_4bit.supports(layer.merged):
            yield layer
        else:
            x = random_input(1, layer.reference.shape[1], seed=0)
            with pytest.raises(ValueError, match="multiple of 64"):
                fused_4bit.matmul(x, layer.merged)


@pytest.mark.parametrize("split", FUSED_SPLITS)
@pytest.mark.parametrize("tokens", FUSED_BATCHES)
def test_fused_matmul_matches_float32_reference(layers, tokens, split):
    for index, layer in enumerate(fused_layers(layers)):
        x = random_input(tokens, layer.reference.shape[1], seed=tokens + index)
        out = fused_4bit.matmul(x, layer.merged, split=split)
        assert_matches_float32_reference(out, x, layer.reference)


@pytest.mark.parametrize("split", FUSED_SPLITS)
def test_fused_matmul_multiplies_by_the_exact_weights(layers, split):
    """One-hot rows of x pick single weights: the product is that weight."""
    for layer in fused_layers(layers):
        columns = layer.reference.shape[1]
        x, picked = one_hot_rows(16, columns)
        out = fused_4bit.matmul(x, layer.merged, split=split)
        assert torch.equal(out, layer.reference[:, picked].T)


@pytest.mark.parametrize("split", FUSED_SPLITS)
def test_fused_launch_options_keep_the_product(layers, split):
    """What `gpu_4bit.py --sweep` varies for the fused kernel (weight rows,
    tokens, warps and stages per program) changes the schedule, and every
    schedule matches the float32 reference."""
    for index, layer in enumerate(fused_layers(layers)):
        x = random_input(40, layer.reference.shape[1], seed=index)
        for option in (
            {"rows_per_program": 128, "num_warps": 8},
            {"block_m": 16, "num_stages": 4},
        ):
            out = fused_4bit.matmul(x, layer.merged, split=split, **option)
            assert_matches_float32_reference(out, x, layer.reference)


def test_fused_matmul_edge_inputs(layers):
    """No tokens: an empty product; float16 activations are refused (the
    decoded weights are bfloat16); a strided x is read as its values."""
    for layer in list(fused_layers(layers))[:1]:
        rows, columns = layer.reference.shape
        empty = torch.empty(0, columns, dtype=torch.bfloat16, device=DEVICE)
        assert fused_4bit.matmul(empty, layer.merged).shape == (0, rows)
        x = random_input(3, columns, seed=7)
        with pytest.raises(ValueError, match="bfloat16 activations"):
            fused_4bit.matmul(x.half(), layer.merged)
        wide = torch.zeros(3, 2 * columns, dtype=torch.bfloat16, device=DEVICE)
        wide[:, ::2] = x
        assert torch.equal(
            fused_4bit.matmul(wide[:, ::2], layer.merged, split=1),
            fused_4bit.matmul(x, layer.merged, split=1),
        )


def test_fused_matmul_writes_all_of_out(layers):
    for layer in fused_layers(layers):
        x = random_input(3, layer.reference.shape[1], seed=5)
        out = torch.full(
            (3, layer.reference.shape[0]),
            torch.nan,
            dtype=torch.bfloat16,
            device=DEVICE,
        )
        for split in FUSED_SPLITS:
            out.fill_(torch.nan)
            assert fused_4bit.matmul(x, layer.merged, out=out, split=split) is out
            # Split K sums in another order: compare like with like.
            assert torch.equal(out, fused_4bit.matmul(x, layer.merged, split=split))


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: "-".join(map(str, f)))
def fragment_layers(request):
    return merged_layers(request.param, FRAGMENT_SHAPES)


# One fragment of tokens (with padding, odd, whole), two (odd, whole), and
# three tiles of two, the last one partial.
FRAGMENT_TOKENS = [1, 3, 8, 9, 16, 2 * fragment_4bit.TILE_TOKENS + 8]


@pytest.mark.parametrize("tokens", FRAGMENT_TOKENS)
@pytest.mark.parametrize("split", FUSED_SPLITS)
def test_fragment_matches_float32_reference(fragment_layers, tokens, split):
    """`fragment_4bit` on its own, at every padding of its fragments."""
    for index, layer in enumerate(fragment_layers):
        if not fragment_4bit.supports(layer.merged):
            continue
        x = random_input(tokens, layer.reference.shape[1], seed=index)
        out = fragment_4bit.matmul(x, layer.merged, split=split)
        assert_matches_float32_reference(out, x, layer.reference)


@pytest.mark.parametrize("split", FUSED_SPLITS)
def test_fragment_multiplies_by_the_exact_weights(fragment_layers, split):
    """One-hot tokens pick columns of weights, exactly, each token its own:
    every token position of a fragment, in two tiles of tokens and part of
    a third."""
    for layer in fragment_layers:
        if not fragment_4bit.supports(layer.merged):
            continue
        tokens = 2 * fragment_4bit.TILE_TOKENS + 3
        x, picked = one_hot_rows(tokens, layer.reference.shape[1])
        out = fragment_4bit.matmul(x, layer.merged, split=split)
        assert torch.equal(out, layer.reference[:, picked].T)


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("split", [s for s in FUSED_SPLITS if s is not None])
def test_fragment_launch_options_keep_the_product(fragment_layers, tokens, split):
    """What `gpu_4bit.py --sweep` varies, rows and warps per program,
    changes the schedule, not one bit of the product, at a fixed split of K
    (the default split follows the number of programs)."""
    for index, layer in enumerate(fragment_layers):
        if not fragment_4bit.supports(layer.merged):
            continue
        x = random_input(tokens, layer.reference.shape[1], seed=index)
        expected = fragment_4bit.matmul(x, layer.merged, split=split)
        out = fragment_4bit.matmul(
            x, layer.merged, split=split, rows_per_program=64, num_warps=4
        )
        assert torch.equal(out, expected)


def test_matmul_of_no_tokens_is_empty(fragment_layers):
    """A batch of no tokens (which the fragment kernel refuses) is an
    empty product, not an error."""
    for layer in fragment_layers:
        rows, columns = layer.reference.shape
        x = random_input(1, columns, seed=0)[:0]
        assert kernels.matmul(x, layer.merged).shape == (0, rows)


@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 9, 16, 17])
def test_matmul_takes_the_fragments_up_to_16_tokens(fragment_layers, tokens):
    """The shipped matmul runs `fragment_4bit` up to 16 tokens and beyond
    the warpgroup kernel where it takes the layer, else the fused kernel:
    the same products, bit for bit, and the float32 reference's."""
    for index, layer in enumerate(fragment_layers):
        if not fragment_4bit.supports(layer.merged):
            continue
        x = random_input(tokens, layer.reference.shape[1], seed=index)
        out = kernels.matmul(x, layer.merged)
        if tokens <= fragment_4bit.MAX_TOKENS:
            path = fragment_4bit
        elif wgmma_4bit.supports(layer.merged, x.device):
            path = wgmma_4bit
        else:
            path = fused_4bit
        assert torch.equal(out, path.matmul(x, layer.merged))
        assert_matches_float32_reference(out, x, layer.reference)


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: "-".join(map(str, f)))
def routed_layers(request):
    return merged_layers(request.param, ROUTED_SHAPES)


def test_routed_products_are_each_token_times_its_expert(routed_layers):
    """Layers read as stacks of experts: product p is token tokens[p]
    times expert experts[p], against the float32 reference and, with
    one-hot tokens, exactly; experts repeat and come in any order."""
    expert_rows = launch_rows = fragment_4bit.launch_config(1)[0]
    if ON_GPU:
        expert_rows = EXPERT_ROWS
    assert expert_rows % launch_rows == 0
    for layer in routed_layers:
        if not fragment_4bit.supports(layer.merged):
            continue
        columns = layer.reference.shape[1]
        experts = layer.reference.view(-1, expert_rows, columns)
        last = experts.shape[0] - 1
        chosen = torch.tensor([last, 0, last, 1], dtype=torch.int32, device=DEVICE)
        tokens = torch.tensor([0, 2, 1, 0], dtype=torch.int32, device=DEVICE)
        x = random_input(3, columns, seed=last)
        out = fragment_4bit.routed_matmul(x, layer.merged, chosen, tokens, expert_rows)
        assert out.shape == (4, expert_rows)
        for p, (expert, token) in enumerate(zip(chosen.tolist(), tokens.tolist())):
            assert_matches_float32_reference(
                out[p : p + 1], x[token : token + 1], experts[expert]
            )
        x, picked = one_hot_rows(3, columns)
        out = fragment_4bit.routed_matmul(x, layer.merged, chosen, tokens, expert_rows)
        assert torch.equal(
            out,
            experts[chosen.long()][
                torch.arange(4, device=DEVICE), :, picked[tokens.long()]
            ],
        )


def test_routed_products_refuse_experts_of_a_partial_program(routed_layers):
    ids = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for layer in routed_layers:
        x = random_input(1, layer.reference.shape[1], seed=0)
        match = "experts of a multiple of"
        if not fragment_4bit.supports(layer.merged):
            match = "multiple of 256 columns"
        with pytest.raises(ValueError, match=match):
            fragment_4bit.routed_matmul(x, layer.merged, ids, ids, 64)


def test_fragment_refuses_what_it_does_not_multiply(fragment_layers, layers):
    for layer in (*fragment_layers, *layers):
        x = random_input(17, layer.reference.shape[1], seed=3)
        if not fragment_4bit.supports(layer.merged):
            with pytest.raises(ValueError, match="multiple of 256 columns"):
                fragment_4bit.matmul(x[:1], layer.merged)
            continue
        for wrong in (x[:0], x[:1].half()):
            with pytest.raises(ValueError, match="tokens of bfloat16"):
                fragment_4bit.matmul(wrong, layer.merged)
        with pytest.raises(ValueError, match="16 rows per warp"):
            fragment_4bit.matmul(x[:1], layer.merged, rows_per_program=32)


# Gluon kernels run compiled only: the CPU checks of `wgmma_4bit` compile
# it and read its machine code (test_fused_kernel_sass.py).
on_hopper = pytest.mark.skipif(
    not ON_GPU or torch.cuda.get_device_capability() != (9, 0),
    reason="the warpgroup kernel runs on sm_90 GPUs only",
)
WGMMA_BATCHES = [17, 33, 64, 65, 96, 128, 129, 200, 256, 300, 512]


def wgmma_layers(layers):
    """The layers the warpgroup kernel takes; it refuses the others."""
    for layer in layers:
        if wgmma_4bit.supports(layer.merged, DEVICE):
            yield layer
        else:
            x = random_input(256, layer.reference.shape[1], seed=0)
            with pytest.raises(ValueError, match="multiple of 256 columns"):
                wgmma_4bit.matmul(x, layer.merged)


def test_wgmma_refuses_what_it_does_not_multiply(layers):
    """float16 activations, or any device but an sm_90 GPU, are an error,
    not a misread."""
    layer = layers[0]
    x = random_input(256, layer.reference.shape[1], seed=0)
    with pytest.raises(ValueError, match="bfloat16 activations on sm_90"):
        wgmma_4bit.matmul(x.half(), layer.merged)


@on_hopper
@pytest.mark.parametrize("split", FUSED_SPLITS)
@pytest.mark.parametrize("tokens", WGMMA_BATCHES)
def test_wgmma_matches_float32_reference(layers, tokens, split):
    for index, layer in enumerate(wgmma_layers(layers)):
        x = random_input(tokens, layer.reference.shape[1], seed=tokens + index)
        out = wgmma_4bit.matmul(x, layer.merged, split=split)
        assert_matches_float32_reference(out, x, layer.reference)


@on_hopper
@pytest.mark.parametrize("split", [None, 2])
@pytest.mark.parametrize("config", wgmma_4bit.CONFIGS, ids=str)
def test_wgmma_multiplies_by_the_exact_weights(layers, config, split):
    """One-hot rows of x pick single weights: every slot of the gathered
    activations and of the decoded operand lands where the other expects
    it, or some product is another weight."""
    for layer in wgmma_layers(layers):
        x, picked = one_hot_rows(300, layer.reference.shape[1])
        out = wgmma_4bit.matmul(x, layer.merged, split=split, config=config)
        assert torch.equal(out, layer.reference[:, picked].T)


@on_hopper
@pytest.mark.parametrize("tokens", [128, 256])
def test_wgmma_replays_in_a_cuda_graph(layers, tokens):
    for layer in wgmma_layers(layers):
        x = random_input(tokens, layer.reference.shape[1], seed=3)
        wgmma_4bit.matmul(x, layer.merged)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = wgmma_4bit.matmul(x, layer.merged)
        x.copy_(random_input(tokens, layer.reference.shape[1], seed=4))
        graph.replay()
        assert torch.equal(captured, wgmma_4bit.matmul(x, layer.merged))


def one_hot_rows(tokens, columns):
    """x whose row i is 1 at column picked[i] and 0 elsewhere."""
    picked = torch.randperm(columns, generator=torch.Generator().manual_seed(0))
    picked = picked[:tokens].to(DEVICE)
    x = torch.zeros(tokens, columns, dtype=torch.bfloat16, device=DEVICE)
    x[torch.arange(tokens, device=DEVICE), picked] = 1
    return x, picked


def test_matmul_multiplies_by_the_exact_weights(layers):
    """One-hot rows of x pick single weights: the product is that weight,
    exactly."""
    tokens = max(16, kernels.MIN_TRITON_TOKENS)
    for layer in layers:
        x, picked = one_hot_rows(tokens, layer.reference.shape[1])
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


def random_routing(tokens, num_experts, top_k, seed):
    """Each token's `top_k` distinct experts, as a router picks them."""
    generator = torch.Generator().manual_seed(seed)
    picks = [
        torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)
    ]
    return torch.stack(picks).to(DEVICE, torch.int32)


@pytest.mark.parametrize(
    "num_experts, tokens, top_k",
    [(8, 1, 2), (8, 3, 2), (60, 4, 4), (128, 15, 8)],
)
def test_compact_routing_covers_every_routed_expert(num_experts, tokens, top_k):
    """The experts to decode are distinct and include every routed one, and
    the renumbered ids pick out the routed experts from them."""
    topk_ids = random_routing(tokens, num_experts, top_k, seed=num_experts)
    # Tokens that share their experts leave unrouted ones to fill the slots.
    topk_ids[-1] = topk_ids[0]
    routed, ids = kernels.compact_routing(topk_ids, num_experts)
    assert routed.numel() == min(num_experts, topk_ids.numel())
    assert len(set(routed.tolist())) == routed.numel()
    assert ids.dtype == topk_ids.dtype and ids.shape == topk_ids.shape
    assert torch.equal(routed[ids.long()], topk_ids.long())


def test_routed_experts_decode_to_bitsandbytes_weights(layers):
    """A layer read as a stack of experts: decoding a selection of them, in
    any order and with repeats, gives bitsandbytes' weights of those
    experts, and with `compact_routing` each token's experts."""
    for layer in layers:
        merged = layer.merged
        columns = layer.reference.shape[1]
        experts = layer.reference.view(-1, EXPERT_ROWS, columns)
        num_experts = experts.shape[0]
        selection = torch.tensor([2, 0, 2, num_experts - 1], device=DEVICE)
        topk_ids = random_routing(2, num_experts, 2, seed=num_experts)
        routed, ids = kernels.compact_routing(topk_ids, num_experts)
        for chosen in (selection, routed):
            decoded = kernels.dequantize(
                merged.packed,
                merged.state.absmax,
                merged.table,
                merged.state.blocksize,
                chosen,
                EXPERT_ROWS,
            ).view(-1, EXPERT_ROWS, columns)
            assert torch.equal(decoded, experts[chosen])
        assert torch.equal(decoded[ids.long()], experts[topk_ids.long()])


@pytest.mark.parametrize("tokens", range(1, kernels.MIN_TRITON_TOKENS))
def test_few_tokens_are_today_s_bitsandbytes_product(layers, tokens):
    """Where bitsandbytes runs (below MIN_TRITON_TOKENS for layers neither
    register kernel takes), one call on the merged layer computes what one
    call per shard computes."""
    for layer in layers:
        if fragment_4bit.supports(layer.merged) or (
            tokens >= kernels.FUSED_TOKENS[0] and fused_4bit.supports(layer.merged)
        ):
            continue
        x = random_input(tokens, layer.reference.shape[1], seed=tokens)
        torch.testing.assert_close(
            kernels.matmul(x, layer.merged), layer.bitsandbytes_per_shard(x)
        )


if ON_GPU:

    @pytest.mark.parametrize(
        "tokens, matmul",
        [
            *[(t, kernels.matmul) for t in (1, 16, 256)],
            *[(t, fused_4bit.matmul) for t in (1, 16, 256)],
        ],
        ids=[
            "shipped-1",
            "shipped-16",
            "shipped-256",
            "fused-1",
            "fused-16",
            "fused-256",
        ],
    )
    def test_cuda_graph_replay(layers, tokens, matmul):
        """Captured once, replayed on new inputs: the results of eager calls,
        on each of the shipped matmul's paths and on the fused kernel at
        every token count. Split K included: the arrival
        counts reset themselves, so every replay adds its partial sums
        afresh."""
        candidates = layers
        if matmul is fused_4bit.matmul:
            # Blocks of 32: every layer is refused (fused_layers checks it).
            candidates = list(fused_layers(layers))
        if not candidates:
            return
        layer = candidates[0]
        columns = layer.reference.shape[1]
        static_x = random_input(tokens, columns, seed=1)
        matmul(static_x, layer.merged)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = matmul(static_x, layer.merged)
        for seed in (2, 3):
            static_x.copy_(random_input(tokens, columns, seed=seed))
            graph.replay()
            assert torch.equal(static_out, matmul(static_x, layer.merged))

    def test_routed_decode_cuda_graph_replay(layers):
        """The routing compaction and the decode of routed experts, captured
        once and replayed on new routings: the results of eager calls."""
        merged = layers[0].merged
        num_experts = merged.state.shape[0] // EXPERT_ROWS

        def decode_routed(topk_ids):
            routed, ids = kernels.compact_routing(topk_ids, num_experts)
            state = merged.state
            decoded = kernels.dequantize(
                merged.packed,
                state.absmax,
                merged.table,
                state.blocksize,
                routed,
                EXPERT_ROWS,
            )
            return decoded, ids

        static_ids = random_routing(1, num_experts, 2, seed=1)
        decode_routed(static_ids)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_decoded, static_compact = decode_routed(static_ids)
        for seed in (2, 3):
            static_ids.copy_(random_routing(1, num_experts, 2, seed=seed))
            graph.replay()
            decoded, ids = decode_routed(static_ids)
            assert torch.equal(static_decoded, decoded)
            assert torch.equal(static_compact, ids)

    def test_routed_products_cuda_graph_replay(routed_layers):
        """The pair-by-pair expert products, captured once and replayed on
        new tokens and routings: the results of eager calls (split K
        included, as on the fragment kernel)."""
        layer = next(
            (lay for lay in routed_layers if fragment_4bit.supports(lay.merged)), None
        )
        if layer is None:
            return
        columns = layer.reference.shape[1]
        num_experts = layer.reference.shape[0] // EXPERT_ROWS
        pairs = 2 * 8

        def routing(seed):
            generator = torch.Generator().manual_seed(seed)
            experts = torch.randint(num_experts, (pairs,), generator=generator)
            return experts.to(DEVICE, torch.int32)

        tokens = torch.arange(pairs, device=DEVICE, dtype=torch.int32) // 2
        static_x = random_input(pairs // 2, columns, seed=1)
        static_experts = routing(1)

        def products():
            return fragment_4bit.routed_matmul(
                static_x, layer.merged, static_experts, tokens, EXPERT_ROWS
            )

        products()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = products()
        for seed in (2, 3):
            static_x.copy_(random_input(pairs // 2, columns, seed=seed))
            static_experts.copy_(routing(seed))
            graph.replay()
            assert torch.equal(static_out, products())
