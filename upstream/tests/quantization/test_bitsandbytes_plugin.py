# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Unit tests of the in-tree bitsandbytes plugin that need no bitsandbytes.

Registration runs in a fresh interpreter, so its imports are observed from
scratch. The expected values come from transformers' `BitsAndBytesConfig`
fields and from the packed 4-bit layout (a `rows x cols` weight takes
`rows * cols / 2` bytes, shards stacked by rows). CPU only; run
`pytest tests/quantization/test_bitsandbytes_plugin.py`.
"""

import json
import subprocess
import sys

import pytest

from vllm.plugins.bitsandbytes.config import BitsAndBytesConfig
from vllm.plugins.bitsandbytes.shard_indexer import ProportionalShardIndexer

REGISTER = """
import json, sys
# Every vLLM process registers plugins after importing the engine arguments,
# the API server too, which never loads a model.
import vllm.engine.arg_utils
before = set(sys.modules)
from vllm.plugins.bitsandbytes import register
register()
register()
registration = sorted(set(sys.modules) - before)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
imported = sorted(
    m for m in sys.modules if m.split(".")[0] == "bitsandbytes"
    or m.startswith("vllm.plugins.bitsandbytes.")
    or m.startswith("vllm.model_executor.model_loader.")
    or m == "vllm.model_executor.layers.linear"
)
registered_loader = _LOAD_FORMAT_TO_MODEL_LOADER.get("bitsandbytes")
from vllm.config.load import LoadConfig
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.model_loader import get_model_loader
config = get_quantization_config("bitsandbytes")
loader = type(get_model_loader(LoadConfig(load_format="bitsandbytes")))
print(json.dumps({
    "method": "bitsandbytes" in QUANTIZATION_METHODS,
    "loader": registered_loader,
    "imported": imported,
    "registration": registration,
    "config": f"{config.__module__}.{config.__qualname__}",
    "loader_class": f"{loader.__module__}.{loader.__qualname__}",
    "bitsandbytes_after_loading_the_loader": "bitsandbytes" in sys.modules,
}))
"""


def test_registration_is_cheap_and_idempotent() -> None:
    result = subprocess.run(
        [sys.executable, "-c", REGISTER], check=True, text=True, stdout=subprocess.PIPE
    )
    registered = json.loads(result.stdout.splitlines()[-1])
    loader = "vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader"
    # What registering imports beyond the engine arguments: the plugin's
    # package and config and core's loader registry.
    assert set(registered.pop("registration")) <= {
        "vllm.plugins.bitsandbytes",
        "vllm.plugins.bitsandbytes.config",
        "vllm.model_executor.model_loader",
    }
    assert registered == {
        "method": True,
        "loader": loader,
        # Neither bitsandbytes nor a loader nor the model layers: only the
        # plugin's config.
        "imported": ["vllm.plugins.bitsandbytes.config"],
        "config": "vllm.plugins.bitsandbytes.config.BitsAndBytesConfig",
        # The registered name resolves to the plugin's loader, and importing
        # it still does not import bitsandbytes.
        "loader_class": loader,
        "bitsandbytes_after_loading_the_loader": False,
    }


PREQUANTIZED_NF4 = {
    # A transformers `BitsAndBytesConfig.to_dict()` as saved in config.json.
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}


def test_config_of_a_prequantized_4bit_checkpoint() -> None:
    config = BitsAndBytesConfig.from_config(PREQUANTIZED_NF4)
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == "bfloat16"
    # `null` keeps the default.
    assert config.llm_int8_skip_modules == []
    assert config.get_weight_byte_size() == 0.5


def test_config_of_an_8bit_checkpoint() -> None:
    config = BitsAndBytesConfig.from_config(
        {"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]}
    )
    assert config.load_in_8bit is True
    assert config.get_weight_byte_size() == 1.0
    assert config.llm_int8_skip_modules == ["lm_head"]


def test_online_default_and_hooks() -> None:
    """No quantization_config: vLLM builds `BitsAndBytesConfig()`."""
    config = BitsAndBytesConfig()
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert BitsAndBytesConfig.get_name() == "bitsandbytes"
    assert BitsAndBytesConfig.get_required_load_format() == "bitsandbytes"
    assert BitsAndBytesConfig.takes_quantization_config_arg() is True
    assert BitsAndBytesConfig.get_config_filenames() == []
    assert config.supports_any_weight_shape() is True


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"load_in_4bit": True, "load_in_8bit": True},
            "sets both load_in_4bit and load_in_8bit",
        ),
        ({"load_in_4bit": False}, "sets neither load_in_4bit nor load_in_8bit"),
        (
            {"bnb_4bit_quant_type": "int4"},
            r"bnb_4bit_quant_type='int4' is not supported; use one of nf4, fp4\.",
        ),
        ({"bnb_4bit_quant_storage": "int32"}, "bnb_4bit_quant_storage='int32'"),
        ({"llm_int8_threshold": "high"}, "llm_int8_threshold='high', which is not"),
    ],
)
def test_invalid_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BitsAndBytesConfig.from_config(settings)


@pytest.mark.parametrize(
    ("prefix", "skipped"),
    [
        ("lm_head", True),
        ("model.vision_tower.encoder.layers.0.mlp.fc1", True),
        ("model.layers.0.mlp.gate_up_proj", False),
        # A component must match whole, not as a substring.
        ("model.vision_tower_2.mlp.fc1", False),
    ],
)
def test_skip_modules_match_components_or_leading_runs(
    prefix: str, skipped: bool
) -> None:
    config = BitsAndBytesConfig(llm_int8_skip_modules=["lm_head", "model.vision_tower"])
    assert config.is_skipped(prefix) is skipped


@pytest.mark.parametrize("columns", [64, 192])
def test_shard_indexer_finds_each_shard_in_the_packed_bytes(columns: int) -> None:
    """q, k, v of 256, 64 and 64 rows, each packed to rows * columns / 2 bytes."""
    rows = {"q": 256, "k": 64, "v": 64}
    total = sum(rows.values())
    indexer = ProportionalShardIndexer(total * columns // 2)
    expected = {
        "q": (0, 256 * columns // 2),
        "k": (256 * columns // 2, 64 * columns // 2),
        "v": (320 * columns // 2, 64 * columns // 2),
    }
    first_rows = {"q": 0, "k": 256, "v": 320}
    for shard, count in rows.items():
        assert indexer(first_rows[shard], count, total) == expected[shard]


def test_shard_indexer_maps_fused_rows_onto_one_ranks_bytes() -> None:
    """A weight fused on disk: global rows of two ranks, one rank's storage."""
    columns, rank_rows = 64, [128, 32]
    indexer = ProportionalShardIndexer(sum(rank_rows) * columns // 2)
    # The global gate/up rows are twice the rank's rows.
    assert indexer(0, 256, 320) == (0, 128 * columns // 2)
    assert indexer(256, 64, 320) == (128 * columns // 2, 32 * columns // 2)
