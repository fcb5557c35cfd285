# SPDX-License-Identifier: Apache-2.0
"""The oracle's case matrix: upstream 0.27.1's BNB load paths, run on CPU.

Each case is run on upstream and on the fork and must give identical
parameter digests, quant states, tokens and logprobs. Checkpoint names are
resolved by ``tests/fixtures/checkpoints.py``. Pre-quantized checkpoints are
loaded without ``quantization=`` (upstream auto-detects them from the
checkpoint's config), except one explicit case for that code path.
"""

from .harness import Case

BNB = "bitsandbytes"
# In-flight BNB on a fused-MoE model fails in upstream 0.27.1 on CPU while
# loading: the expert weights reach the flat packed 4-bit expert parameters
# unquantized, and the shape mismatch surfaces differently per model.
MIXTRAL_BNB_FAILURE = "RuntimeError: output with shape"
QWEN2_MOE_BNB_FAILURE = "ValueError: BitsAndBytes quantization with padded"

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
        expected_upstream_failure=MIXTRAL_BNB_FAILURE,
    ),
    Case(
        "qwen2-moe-bnb4-inflight",
        "qwen2_moe",
        quantization=BNB,
        expected_upstream_failure=QWEN2_MOE_BNB_FAILURE,
    ),
]

# The case the perturbed tree is run on: its BNB linear layers load through
# RowParallelLinear.weight_loader, the method the perturbation edits.
NEGATIVE_CASE = "llama-bnb4-inflight"
