# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Pre-quantized bitsandbytes MoE checkpoints as transformers 4.x wrote them.

Every expert projection (and every other `nn.Linear` but `lm_head`, MoE
routers included) is its own 2-D 4-bit weight with its state companions;
see `tests/fixtures/transformers4_bnb.py`. Upstream 0.27.1 and
vllm-bnb-plugin 0.0.3 load none of them on CPU. They load here with no
flags, at TP=1 and TP=2, and are checked against two exact oracles:

- bitsandbytes' own reading of the checkpoint: every rank's experts,
  dequantized, equal the rank's slice of what `QuantState.from_dict` and
  `dequantize_4bit` make of the stored expert. vLLM rebuilds saved states
  under the model dtype (0.27.1 and vllm-bnb-plugin do the same, and the
  oracle tests hold the fork to them), so the oracle does too;
- the in-flight load of the same weights: for NF4 every rank's packed
  storage of every quantized layer is byte-identical to quantizing the
  unquantized checkpoint while loading (its routers round-tripped, as the
  pre-quantized checkpoint holds them). Codes depend only on each block's
  exact absmax, which double quantization does not change.

Tokens of a flat random model change with the last bit of any scale, so
they are required only to be generated in full.
"""

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.checkpoints import get_checkpoint
from tests.plugins.bitsandbytes import bnb_engine_probe
from tests.plugins.bitsandbytes.test_bnb_moe_cpu import EXPERT_NAMES, IN_FLIGHT

pytestmark = pytest.mark.engine

VARIANTS = {
    1: {"mixtral": ("nf4-dq", "nf4", "fp4", "fp4-dq"), "qwen2_moe": ("nf4-dq", "fp4")},
    2: {"mixtral": ("nf4-dq", "fp4"), "qwen2_moe": ("nf4-dq",)},
}
CASES = [
    (tp, model, variant)
    for tp, by_model in VARIANTS.items()
    for model, variants in by_model.items()
    for variant in variants
]


def checkpoint_name(model: str, variant: str) -> str:
    return f"{model}-bnb-{variant}-tf4"


def reference_name(model: str) -> str:
    return f"{model}-bnb-nf4-dq-tf4-reference"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`(tp, checkpoint) -> probe result`, one process per TP size."""
    workdir = tmp_path_factory.mktemp("transformers4_moe")
    out = {}
    for tp, by_model in VARIANTS.items():
        cases = [
            (checkpoint_name(model, variant), {})
            for model, variants in by_model.items()
            for variant in variants
        ] + [(reference_name(model), IN_FLIGHT) for model in by_model]
        for (name, _), result in zip(
            cases, bnb_engine_probe.run(cases, tp, workdir), strict=True
        ):
            out[tp, name] = result
    return out


def read_as_bitsandbytes(checkpoint: dict, weight: str) -> torch.Tensor:
    """A stored 4-bit weight as bitsandbytes itself reads it back.

    `QuantState.from_dict` runs under the model dtype, bfloat16, as vLLM's
    loaders rebuild saved states.
    """
    components = {
        key.removeprefix(weight + "."): value
        for key, value in checkpoint.items()
        if key.startswith(weight + ".")
    }
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        state = F.QuantState.from_dict(components, device="cpu")
    finally:
        torch.set_default_dtype(default)
    return F.dequantize_4bit(checkpoint[weight], state)


@pytest.mark.parametrize(
    ("tp", "model", "variant"), CASES, ids=[f"{m}-{v}-tp{t}" for t, m, v in CASES]
)
def test_experts_equal_bitsandbytes_reading_of_the_checkpoint(
    tp: int, model: str, variant: str, results
):
    checkpoint = load_file(
        get_checkpoint(checkpoint_name(model, variant)) / "model.safetensors"
    )
    gate, up, down = EXPERT_NAMES[model]
    result = results[tp, checkpoint_name(model, variant)]
    checked = 0
    for rank, shards in enumerate(result["ranks"]):
        w13_names = [name for name in shards if name.endswith(".w13_weight")]
        assert w13_names, "no bitsandbytes expert weights were found"
        for w13_name in w13_names:
            (w13,) = shards[w13_name]
            (w2,) = shards[w13_name.removesuffix("w13_weight") + "w2_weight"]
            parent = w13_name[: w13_name.index(".experts.")]
            for expert in range(w13.shape[0]):
                stem = f"{parent}.experts.{expert}."
                whole = {
                    name: read_as_bitsandbytes(checkpoint, f"{stem}{name}.weight")
                    for name in (gate, up, down)
                }
                expected_w13 = torch.cat(
                    [whole[name].chunk(tp, dim=0)[rank] for name in (gate, up)]
                )
                expected_w2 = whole[down].chunk(tp, dim=1)[rank]
                assert torch.equal(w13[expert], expected_w13.float()), stem
                assert torch.equal(w2[expert], expected_w2.float()), stem
                checked += 1
    assert checked == tp * len(w13_names) * w13.shape[0]
    tokens = result["tokens"]
    assert tokens and all(len(t) == bnb_engine_probe.MAX_TOKENS for t in tokens)


NF4_CASES = [case for case in CASES if case[2].startswith("nf4")]


@pytest.mark.parametrize(
    ("tp", "model", "variant"),
    NF4_CASES,
    ids=[f"{m}-{v}-tp{t}" for t, m, v in NF4_CASES],
)
def test_nf4_storage_is_byte_identical_to_in_flight(
    tp: int, model: str, variant: str, results
):
    loaded = results[tp, checkpoint_name(model, variant)]["raw"]
    in_flight = results[tp, reference_name(model)]["raw"]
    assert len(loaded) == len(in_flight) == tp
    for rank, (ours, theirs) in enumerate(zip(loaded, in_flight, strict=True)):
        assert ours.keys() == theirs.keys()
        assert any(name.endswith(".w13_weight") for name in ours)
        for name in ours:
            assert torch.equal(ours[name]["data"], theirs[name]["data"]), (
                f"{name} rank {rank}"
            )
