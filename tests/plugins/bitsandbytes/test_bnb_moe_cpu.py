# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes 4-bit experts load and run on the CPU engine.

Mixtral (experts `w1`/`w3`/`w2`) and Qwen2-MoE (experts `gate_proj`/
`up_proj`/`down_proj` next to a shared expert) are quantized while loading,
with TP=1 and TP=2. Every rank's fused expert weights, dequantized by
bitsandbytes, must equal bitsandbytes' own NF4 quantization (with
double-quantized statistics, computed in float32 as the loader documents) of
that rank's slice of each checkpoint expert, dequantized. Generation must run;
tokens are not compared with anything (upstream cannot run these models).
"""

from pathlib import Path

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.checkpoints import get_checkpoint
from tests.plugins.bitsandbytes import bnb_engine_probe

pytestmark = pytest.mark.engine


# model -> checkpoint names of the gate, up and down projections
EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
}
IN_FLIGHT = {"quantization": "bitsandbytes"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    workdir = tmp_path_factory.mktemp("moe_cpu")
    cases = [(model, IN_FLIGHT) for model in EXPERT_NAMES]
    return {
        tp: dict(
            zip(EXPERT_NAMES, bnb_engine_probe.run(cases, tp, workdir), strict=True)
        )
        for tp in (1, 2)
    }


def quantized_reference(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 round trip of `weight`, float32 statistics."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        packed, state = F.quantize_4bit(
            weight.contiguous(), quant_type="nf4", compress_statistics=True
        )
    finally:
        torch.set_default_dtype(default)
    return F.dequantize_4bit(packed, state).float()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", list(EXPERT_NAMES))
def test_experts_equal_bitsandbytes_quantization(model: str, tp: int, results):
    checkpoint: dict[str, torch.Tensor] = {}
    for path in sorted(Path(get_checkpoint(model)).glob("*.safetensors")):
        checkpoint.update(load_file(path))
    gate, up, down = EXPERT_NAMES[model]
    result = results[tp][model]
    experts_checked = 0
    for rank, shards in enumerate(result["ranks"]):
        w13_names = [name for name in shards if name.endswith(".w13_weight")]
        assert w13_names, "no bitsandbytes expert weights were found"
        for w13_name in w13_names:
            (w13,) = shards[w13_name]
            (w2,) = shards[w13_name.removesuffix("w13_weight") + "w2_weight"]
            # "<parent>.experts.routed_experts.w13_weight" holds what the
            # checkpoint stores as "<parent>.experts.<id>.<projection>.weight".
            parent = w13_name[: w13_name.index(".experts.")]
            for expert in range(w13.shape[0]):
                stem = f"{parent}.experts.{expert}."
                rows = [
                    checkpoint[f"{stem}{name}.weight"].chunk(tp, dim=0)[rank]
                    for name in (gate, up)
                ]
                expected_w13 = torch.cat([quantized_reference(r) for r in rows])
                expected_w2 = quantized_reference(
                    checkpoint[f"{stem}{down}.weight"].chunk(tp, dim=1)[rank]
                )
                assert torch.equal(w13[expert], expected_w13), f"{stem} rank {rank}"
                assert torch.equal(w2[expert], expected_w2), f"{stem} rank {rank}"
                experts_checked += 1
    assert experts_checked == tp * len(w13_names) * w13.shape[0]
    tokens = result["tokens"]
    assert tokens and all(len(t) == bnb_engine_probe.MAX_TOKENS for t in tokens)
