# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The bitsandbytes quantization config and its hooks."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig, require_bitsandbytes


def model_config(
    quantization_config: dict | None,
    enforce_eager: bool = False,
    quantization_config_arg: dict | None = None,
):
    """The ModelConfig fields the hooks read: the checkpoint's (or overridden)
    `quantization_config` and the `--quantization-config` argument."""
    return SimpleNamespace(
        model="/models/m",
        model_arch_config=SimpleNamespace(quantization_config=quantization_config),
        quantization_config=quantization_config_arg,
        hf_overrides={},
        enforce_eager=enforce_eager,
    )


def test_in_flight_defaults_match_upstream_empty_config():
    # vLLM 0.27.1 built the in-flight config as BitsAndBytesConfig.from_config({});
    # 0.32.0 builds BitsAndBytesConfig() for a method without config files.
    from_empty = BitsAndBytesConfig.from_config({})
    assert BitsAndBytesConfig.get_config_filenames() == []
    for config in (from_empty, BitsAndBytesConfig()):
        assert config.load_in_4bit is True
        assert config.load_in_8bit is False
        assert config.bnb_4bit_quant_type == "fp4"
        assert config.bnb_4bit_use_double_quant is False
        assert config.bnb_4bit_compute_dtype == "float32"
        assert config.bnb_4bit_quant_storage == "uint8"
        assert config.llm_int8_skip_modules == []
        assert config.llm_int8_threshold == 6.0
        assert config.llm_int8_has_fp16_weight is False


def test_reads_a_transformers_quantization_config():
    from transformers import BitsAndBytesConfig as HFConfig

    saved = HFConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ).to_dict()
    config = BitsAndBytesConfig.from_config(saved)
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == "bfloat16"
    # transformers writes null for the unset skip list.
    assert saved["llm_int8_skip_modules"] is None
    assert config.llm_int8_skip_modules == []


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="nf4"):
        BitsAndBytesConfig.from_config({"bnb_4bit_quant_type": "int4"})
    with pytest.raises(ValueError, match="uint8, bfloat16"):
        BitsAndBytesConfig(bnb_4bit_quant_storage="int32")
    # 8-bit checkpoints carry transformers' unused 4-bit fields.
    assert BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_quant_type="x").load_in_8bit


@pytest.mark.parametrize(
    ("skip", "prefix", "skipped"),
    [
        (["lm_head"], "lm_head", True),
        (["down_proj"], "model.layers.3.mlp.down_proj", True),
        (["model.vision_tower"], "model.vision_tower.blocks.0.fc1", True),
        (["model.layers.1"], "model.layers.11.mlp.down_proj", False),
        (["mlp.down"], "model.layers.3.mlp.down_proj", False),
        ([], "model.layers.3.mlp.down_proj", False),
    ],
)
def test_skip_modules(skip, prefix, skipped):
    assert BitsAndBytesConfig(llm_int8_skip_modules=skip).is_skipped(prefix) is skipped


def test_declared_capabilities():
    assert BitsAndBytesConfig.get_name() == "bitsandbytes"
    assert BitsAndBytesConfig.get_required_load_format() == "bitsandbytes"
    assert BitsAndBytesConfig().get_weight_byte_size() == 0.5
    assert BitsAndBytesConfig(load_in_8bit=True).get_weight_byte_size() == 1.0
    assert BitsAndBytesConfig().supports_any_weight_shape()


@pytest.mark.parametrize(
    ("checkpoint", "eager_after"),
    [
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, True),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, False),
        (None, False),
    ],
)
def test_8bit_checkpoints_run_eagerly(checkpoint, eager_after):
    config = model_config(checkpoint)
    BitsAndBytesConfig.verify_model_config(config)
    assert config.enforce_eager is eager_after


def test_quantization_config_argument_asks_for_online_int8():
    config = model_config(None, quantization_config_arg={"load_in_8bit": True})
    assert BitsAndBytesConfig.takes_quantization_config_arg()
    BitsAndBytesConfig.verify_model_config(config)
    assert config.enforce_eager is True


def test_quantization_config_argument_is_refused_for_a_quantized_checkpoint():
    checkpoint = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config = model_config(checkpoint, quantization_config_arg={"load_in_8bit": True})
    with pytest.raises(ValueError, match="already quantized; drop --quantization"):
        BitsAndBytesConfig.verify_model_config(config)


def test_checkpoint_settings_are_checked_before_loading():
    bad = {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "int4"}
    with pytest.raises(ValueError, match="int4"):
        BitsAndBytesConfig.verify_model_config(model_config(bad))


@pytest.fixture
def fresh_library_check():
    require_bitsandbytes.cache_clear()
    yield
    require_bitsandbytes.cache_clear()


def test_missing_bitsandbytes_says_how_to_install(monkeypatch, fresh_library_check):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'bitsandbytes>="):
        require_bitsandbytes()


def test_old_bitsandbytes_says_how_to_upgrade(monkeypatch, fresh_library_check):
    old = types.ModuleType("bitsandbytes")
    old.__version__ = "0.45.0"
    monkeypatch.setitem(sys.modules, "bitsandbytes", old)
    with pytest.raises(ImportError, match=r"0\.45\.0 is too old.*pip install -U"):
        require_bitsandbytes()


def test_installed_bitsandbytes_is_accepted(fresh_library_check):
    require_bitsandbytes()
