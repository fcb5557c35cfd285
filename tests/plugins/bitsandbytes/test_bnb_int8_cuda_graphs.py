# SPDX-License-Identifier: Apache-2.0
"""LLM.int8() keeps CUDA graphs when it does no outlier decomposition.

At `llm_int8_threshold` 0 the int8 matmul has fixed shapes; on an H200 its
graph replay equals eager execution (`benchmarks/gpu_4bit.py --int8`). A
threshold above 0 still forces eager mode (`test_bnb_config.py`).
"""

from tests.plugins.bitsandbytes.test_bnb_config import model_config
from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig


def test_int8_without_outlier_decomposition_keeps_cuda_graphs():
    checkpoint = {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "llm_int8_threshold": 0.0,
    }
    config = model_config(checkpoint)
    BitsAndBytesConfig.verify_and_update_model_config(config)
    assert config.enforce_eager is False


def test_online_int8_without_outlier_decomposition_keeps_cuda_graphs():
    settings = {"load_in_8bit": True, "llm_int8_threshold": 0}
    config = model_config(None, quantization_config_arg=settings)
    BitsAndBytesConfig.verify_and_update_model_config(config)
    assert config.enforce_eager is False
