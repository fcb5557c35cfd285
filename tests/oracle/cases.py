# SPDX-License-Identifier: Apache-2.0
"""The oracle's case matrix: the bitsandbytes load paths users have, on CPU.

Each case runs on the fork and on its references (``references``): pristine
0.27.1 (``legacy``) always; pristine 0.32.0 with ``vllm-bnb-plugin``
(``bnb-plugin``) for bitsandbytes cases and pristine 0.32.0 alone
(``upstream``) for unquantized ones. Checkpoint names are resolved by
``tests/fixtures/checkpoints.py``. Pre-quantized checkpoints are loaded
without ``quantization=`` (vLLM detects them from the checkpoint's config),
except one explicit case for that code path.
"""

from .harness import Case

BNB = "bitsandbytes"
# In-flight BNB on a fused-MoE model fails on CPU while loading, in 0.27.1
# and with vllm-bnb-plugin: the expert weights reach the flat packed 4-bit
# expert parameters unquantized, and the shape mismatch surfaces differently
# per model and version.
SHAPE_MISMATCH = "RuntimeError: output with shape"
QWEN2_MOE_LEGACY_FAILURE = "ValueError: BitsAndBytes quantization with padded"
# Both refuse pre-quantized checkpoints under tensor parallelism.
PREQUANTIZED_TP_REFUSAL = "Prequant BitsAndBytes models with tensor parallelism"

MATRIX: list[Case] = [
    # Llama: GQA, untied embeddings.
    Case("llama", "llama"),
    Case("llama-bnb4-inflight", "llama", quantization=BNB),
    Case("llama-nf4", "llama-bnb-nf4"),
    Case("llama-nf4-explicit", "llama-bnb-nf4", quantization=BNB),
    Case("llama-fp4", "llama-bnb-fp4"),
    Case("llama-nf4-dq", "llama-bnb-nf4-dq"),
    Case("llama-int8", "llama-bnb-int8"),
    Case("llama-tp2", "llama", tp=2),
    Case("llama-bnb4-inflight-tp2", "llama", quantization=BNB, tp=2),
    # Refused by both references; tests/plugins/bitsandbytes compares the
    # fork's TP=2 load with its TP=1 load instead.
    Case(
        "llama-nf4-tp2",
        "llama-bnb-nf4",
        tp=2,
        expected_failures={
            "legacy": PREQUANTIZED_TP_REFUSAL,
            "bnb-plugin": PREQUANTIZED_TP_REFUSAL,
        },
    ),
    # Qwen2: qkv bias, tied embeddings.
    Case("qwen2", "qwen2"),
    Case("qwen2-bnb4-inflight", "qwen2", quantization=BNB),
    Case("qwen2-nf4", "qwen2-bnb-nf4"),
    # Phi-3: gate_up_proj and qkv_proj already fused on disk.
    Case("phi3", "phi3"),
    Case("phi3-bnb4-inflight", "phi3", quantization=BNB),
    # Mixture of experts; Qwen2-MoE has a shared expert next to the routed
    # ones. Failing cases go last: each failure costs a fresh process.
    Case("mixtral", "mixtral"),
    Case("qwen2-moe", "qwen2_moe"),
    Case(
        "mixtral-bnb4-inflight",
        "mixtral",
        quantization=BNB,
        expected_failures={"legacy": SHAPE_MISMATCH, "bnb-plugin": SHAPE_MISMATCH},
    ),
    Case(
        "qwen2-moe-bnb4-inflight",
        "qwen2_moe",
        quantization=BNB,
        expected_failures={
            "legacy": QWEN2_MOE_LEGACY_FAILURE,
            "bnb-plugin": SHAPE_MISMATCH,
        },
    ),
]

# The case the perturbed tree is run on: its unquantized row-parallel layers
# load through RowParallelLinear.weight_loader_v2, which the perturbation edits.
NEGATIVE_CASE = "llama"


def references(case: Case) -> tuple[str, ...]:
    """The reference sides a case is compared with."""
    uses_bitsandbytes = case.quantization == BNB or "-bnb-" in case.checkpoint
    return ("legacy", "bnb-plugin" if uses_bitsandbytes else "upstream")
