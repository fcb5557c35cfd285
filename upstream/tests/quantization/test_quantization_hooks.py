# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The optional `QuantizationConfig` hooks a plugin's method can implement.

Two tiny methods are registered with `register_quantization_config`: one
overrides every hook, one keeps the defaults. The engine config is built from
a local four-layer Llama config, so no model is downloaded and no engine
starts. Run `pytest tests/quantization/test_quantization_hooks.py`.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, SiglipVisionConfig

from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.config.quantization import resolve_quantization_config
from vllm.distributed.parallel_state import (
    cleanup_dist_env_and_memory,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.torchao import TorchAOConfig
from vllm.model_executor.model_loader.weight_utils import get_quant_config
from vllm.model_executor.models.siglip import SiglipMLP
from vllm.model_executor.models.utils import get_tower_quant_config
from vllm.v1.metrics.perf import (
    AttentionQuantizationConfigParser,
    FfnQuantizationConfigParser,
    InvalidComponent,
    ParsedArgs,
)

HOOKED = "test_hooks_method"
PLAIN = "test_hooks_plain"


class MarkedLinearMethod(UnquantizedLinearMethod):
    """Tells which layers a method was asked to quantize."""


class _TestConfig(QuantizationConfig):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = bits

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "_TestConfig":
        return cls(bits=config["bits"])

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        return MarkedLinearMethod() if isinstance(layer, LinearBase) else None


@register_quantization_config(PLAIN)
class PlainConfig(_TestConfig):
    """Keeps every hook's default."""

    @classmethod
    def get_name(cls) -> str:
        return PLAIN


@register_quantization_config(HOOKED)
class HookedConfig(_TestConfig):
    """Implements every hook."""

    @classmethod
    def get_name(cls) -> str:
        return HOOKED

    @classmethod
    def get_required_load_format(cls) -> str:
        return "dummy"

    @classmethod
    def verify_and_update_model_config(cls, model_config: ModelConfig) -> None:
        model_config.enforce_eager = True

    @classmethod
    def takes_quantization_config_arg(cls) -> bool:
        return True

    def get_weight_byte_size(self) -> float:
        return 0.75

    def supports_any_weight_shape(self) -> bool:
        return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory holding only a tiny Llama config."""
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        torch_dtype="float32",
    ).save_pretrained(path)
    return path


def engine_config(model_dir: Path, **kwargs: Any) -> VllmConfig:
    return EngineArgs(
        model=str(model_dir), skip_tokenizer_init=True, **kwargs
    ).create_engine_config()


def test_defaults_change_nothing() -> None:
    assert PlainConfig.get_required_load_format() is None
    assert PlainConfig.takes_quantization_config_arg() is False
    assert PlainConfig().get_weight_byte_size() is None
    assert PlainConfig().supports_any_weight_shape() is False


def test_required_load_format_and_model_config_check(model_dir: Path) -> None:
    config = engine_config(model_dir, quantization=HOOKED, load_format="auto")
    assert config.model_config.quantization == HOOKED
    assert config.load_config.load_format == "dummy"
    assert config.model_config.enforce_eager is True


def test_an_explicit_load_format_the_method_cannot_use_is_refused(
    model_dir: Path,
) -> None:
    assert engine_config(model_dir, quantization=HOOKED, load_format="dummy")
    with pytest.raises(ValueError, match="--load-format safetensors cannot load"):
        engine_config(model_dir, quantization=HOOKED, load_format="safetensors")


def test_defaults_keep_the_users_load_format_and_model_config(
    model_dir: Path,
) -> None:
    config = engine_config(model_dir, quantization=PLAIN, load_format="auto")
    assert config.load_config.load_format == "auto"
    assert config.model_config.enforce_eager is False


def test_quantization_config_argument_holds_the_methods_settings(
    model_dir: Path,
) -> None:
    settings = {"bits": 3}
    assert resolve_quantization_config(HOOKED, settings).method_settings == settings
    config = engine_config(model_dir, quantization=HOOKED, quantization_config=settings)
    quant_config = get_quant_config(config.model_config, config.load_config)
    assert isinstance(quant_config, HookedConfig)
    assert quant_config.bits == 3


def test_quantization_config_argument_follows_vllms_schema_by_default() -> None:
    with pytest.raises(ValueError, match="bits"):
        resolve_quantization_config(PLAIN, {"bits": 3})


def test_method_settings_reach_only_a_method_that_takes_them(
    model_dir: Path,
) -> None:
    with pytest.raises(ValueError, match="takes no method_settings"):
        engine_config(
            model_dir,
            quantization=PLAIN,
            quantization_config={"method_settings": {"bits": 3}},
        )


def test_method_settings_exclude_the_online_fields() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        resolve_quantization_config(
            PLAIN, {"method_settings": {"bits": 3}, "ignore": ["lm_head"]}
        )


@pytest.mark.parametrize(
    "parser", [AttentionQuantizationConfigParser, FfnQuantizationConfigParser]
)
def test_metrics_take_the_declared_weight_byte_size(parser: type) -> None:
    args = parser().parse(ParsedArgs(), VllmConfig(quant_config=HookedConfig()))
    assert args.weight_byte_size == 0.75
    with pytest.raises(InvalidComponent, match=PLAIN):
        parser().parse(ParsedArgs(), VllmConfig(quant_config=PlainConfig()))


# Not vLLM's dist_init (nccl): gloo, kept here so that this PR's tests stand alone.
# Function-scoped, as vLLM's autouse cleanup_fixture ends the group after each test.
@pytest.fixture
def single_rank(tmp_path_factory: pytest.TempPathFactory):
    """A tensor-parallel group of one rank over gloo, for building layers."""
    init_file = tmp_path_factory.mktemp("dist") / "init"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{init_file}",
            backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        yield
    cleanup_dist_env_and_memory()


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize(
    ("quant_config", "quantized"), [(HookedConfig(), True), (PlainConfig(), False)]
)
def test_any_weight_shape_lets_a_tower_quantize_unaligned_layers(
    quant_config: QuantizationConfig, quantized: bool
) -> None:
    """SigLIP quantizes sizes that are not multiples of 64 only if allowed."""
    config = SiglipVisionConfig(hidden_size=40, intermediate_size=72)
    with set_current_vllm_config(VllmConfig()):
        mlp = SiglipMLP(config, quant_config=quant_config, prefix="mlp")
    for layer in (mlp.fc1, mlp.fc2):
        assert isinstance(layer.quant_method, MarkedLinearMethod) is quantized


class CompressedTensorsNamed(PlainConfig):
    """Named like compressed-tensors, with the hook's default."""

    @classmethod
    def get_name(cls) -> str:
        return "compressed-tensors"


ALIGNED = SiglipVisionConfig(hidden_size=64, intermediate_size=128)
UNALIGNED = SiglipVisionConfig(hidden_size=40, intermediate_size=72)


def test_torchao_declares_that_it_quantizes_towers_of_any_shape() -> None:
    torchao = TorchAOConfig(torchao_config=None)
    assert torchao.supports_any_weight_shape() is True
    assert get_tower_quant_config(UNALIGNED, torchao) is torchao


@pytest.mark.parametrize(
    ("tower", "quantized"), [(ALIGNED, True), (UNALIGNED, False), (None, False)]
)
def test_other_methods_quantize_only_towers_of_aligned_sizes(
    tower: SiglipVisionConfig | None, quantized: bool
) -> None:
    config = PlainConfig()
    assert (get_tower_quant_config(tower, config) is config) is quantized
    assert get_tower_quant_config(tower, None) is None


def test_a_method_named_by_the_caller_quantizes_any_shape() -> None:
    """The Gemma 4 towers name compressed-tensors; SigLIP's MLP does not."""
    config = CompressedTensorsNamed()
    assert get_tower_quant_config(UNALIGNED, config) is None
    assert get_tower_quant_config(UNALIGNED, config, ("compressed-tensors",)) is config
