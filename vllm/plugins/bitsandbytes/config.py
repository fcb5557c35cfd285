# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The bitsandbytes `QuantizationConfig` and the checks every entry point shares."""

from dataclasses import dataclass, field, fields
from functools import cache
from typing import TYPE_CHECKING, Any, get_origin

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = init_logger(__name__)

# The load format of the plugin's model loader, named as in vLLM before.
LOAD_FORMAT = "bitsandbytes"
SUPPORTED_4BIT_QUANT_TYPES = ("nf4", "fp4")
# Block sizes bitsandbytes quantizes with (4-bit values and the 8-bit
# double-quantized absmax alike).
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Element types the packed 4-bit bytes may be stored as. FSDP-QLoRA stores
# them typed like the model's other parameters so that FSDP can shard them;
# the bytes are the same, the loader reads them as bytes.
SUPPORTED_4BIT_QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
# The tensor transformers packs a 4-bit state's non-tensor fields into, as JSON.
PACKED_STATE_PREFIX = "quant_state.bitsandbytes__"


class BitsAndBytesCheckpointError(ValueError):
    """A bitsandbytes checkpoint that cannot be loaded as stored.

    Raised before the model serves anything, with one sentence naming the
    file, tensor or field at fault, so a broken export fails the load instead
    of yielding a model that computes garbage. `tensor` is the checkpoint
    tensor at fault, if one is, so the loader can name the file holding it.
    """

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


@cache
def require_bitsandbytes() -> None:
    """Fail with an installable instruction unless a usable bitsandbytes exists.

    Called before any weight is created or read, so a missing or old library
    never leaves a half-loaded model behind.
    """
    from packaging import version

    from vllm.platforms import current_platform

    minimum = "0.49.2" if current_platform.is_rocm() else "0.48.1"
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "bitsandbytes quantization needs the bitsandbytes package; install "
            f"it with `pip install 'bitsandbytes>={minimum}'`."
        ) from err
    if version.parse(bitsandbytes.__version__) < version.parse(minimum):
        raise ImportError(
            f"bitsandbytes {bitsandbytes.__version__} is too old for vLLM's "
            f"bitsandbytes quantization; upgrade with "
            f"`pip install -U 'bitsandbytes>={minimum}'`."
        )


def checkpoint_quantization_config(model_config: "ModelConfig") -> dict | None:
    """The `quantization_config` a checkpoint declares, None if unquantized."""
    return model_config.model_arch_config.quantization_config


def settings_argument(model_config: "ModelConfig") -> dict | None:
    """The `--quantization-config` dict given with `--quantization
    bitsandbytes`, which core keeps as `QuantizationConfigArgs.method_settings`
    (see `takes_quantization_config_arg`); None if none."""
    return getattr(model_config.quantization_config, "method_settings", None)


def online_settings(model_config: "ModelConfig") -> dict | None:
    """The settings a user gave for quantizing while loading, None if none.

    Either `--quantization-config '{"load_in_8bit": true}'` with
    `--quantization bitsandbytes` (`settings_argument`), or, as before,
    `hf_overrides={"quantization_config": {...}}`, which stands in for the
    checkpoint's own. The checkpoint is then unquantized.
    """
    if (settings := settings_argument(model_config)) is not None:
        return settings
    overrides = model_config.hf_overrides
    if isinstance(overrides, dict) and "quantization_config" in overrides:
        return checkpoint_quantization_config(model_config)
    return None


def _has_type(value: object, expected: Any) -> bool:
    """Whether a config value has its field's type; JSON has no other check."""
    if expected is bool:
        return isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if get_origin(expected) is list:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, expected)


@dataclass(eq=False)
class BitsAndBytesConfig(QuantizationConfig):
    """bitsandbytes 4-bit (NF4/FP4, QLoRA) and LLM.int8() quantization.

    The fields and their defaults are those of `transformers.BitsAndBytesConfig`,
    which a pre-quantized checkpoint stores as its `quantization_config`: a
    field it leaves out or writes as null is read as transformers and vLLM
    0.27.1 read it (e.g. fp4 without double quantization).

    The defaults do not describe online quantization: an unquantized
    checkpoint quantized while loading to 4 bits is always NF4 with
    double-quantized statistics, whatever `bnb_4bit_quant_type` and
    `bnb_4bit_use_double_quant` say.

    `bnb_4bit_compute_dtype` is accepted and not used: the linear layers
    compute in bfloat16, as in vLLM 0.27.1. `llm_int8_enable_fp32_cpu_offload`
    must be false (vLLM keeps no layer in float32 on the CPU).
    See https://arxiv.org/abs/2305.14314 (QLoRA).
    """

    load_in_8bit: bool = False
    load_in_4bit: bool = True
    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_quant_storage: str = "uint8"
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    llm_int8_skip_modules: list[str] = field(default_factory=list)
    llm_int8_threshold: float = 6.0

    @classmethod
    def get_name(cls) -> str:
        return "bitsandbytes"

    def __post_init__(self) -> None:
        super().__init__()
        for setting in fields(self):
            value = getattr(self, setting.name)
            if not _has_type(value, setting.type):
                raise ValueError(
                    f"quantization_config has {setting.name}={value!r}, which is "
                    f"not a {setting.type}; fix the checkpoint's config.json."
                )
        if self.llm_int8_enable_fp32_cpu_offload:
            raise ValueError(
                "quantization_config has llm_int8_enable_fp32_cpu_offload=true, "
                "asking for layers kept in float32 on the CPU, which vLLM cannot "
                "do; set it to false in config.json or --quantization-config."
            )
        if self.bnb_4bit_quant_storage not in SUPPORTED_4BIT_QUANT_STORAGE:
            raise ValueError(
                f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage!r} is not "
                f"supported; use one of {', '.join(SUPPORTED_4BIT_QUANT_STORAGE)}."
            )
        if (
            not self.load_in_8bit
            and self.bnb_4bit_quant_type not in SUPPORTED_4BIT_QUANT_TYPES
        ):
            raise ValueError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not "
                f"supported; use one of {', '.join(SUPPORTED_4BIT_QUANT_TYPES)}."
            )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BitsAndBytesConfig":
        """Build from a transformers `quantization_config` dict.

        transformers writes `null` for unset fields, so a missing key and a
        `None` value both keep the default; keys of other libraries' versions
        of the config are ignored.
        """
        if config.get("load_in_4bit") is True and config.get("load_in_8bit") is True:
            raise ValueError(
                "quantization_config sets both load_in_4bit and load_in_8bit; "
                "a bitsandbytes checkpoint is one or the other, fix its config.json."
            )
        if config.get("load_in_4bit") is False and not config.get("load_in_8bit"):
            raise ValueError(
                "quantization_config sets neither load_in_4bit nor load_in_8bit; "
                "set the one the checkpoint was quantized with in its config.json."
            )
        names = {setting.name for setting in fields(cls)}
        return cls(
            **{
                name: value
                for name, value in config.items()
                if name in names and value is not None
            }
        )

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Pre-quantized checkpoints carry the config inside config.json; for an
        # unquantized one vLLM then builds `cls()`, the online 4-bit config.
        return []

    @classmethod
    def get_required_load_format(cls) -> str:
        return LOAD_FORMAT

    @classmethod
    def takes_quantization_config_arg(cls) -> bool:
        # `--quantization-config '{"load_in_8bit": true}'` asks for LLM.int8().
        return True

    @classmethod
    def verify_and_update_model_config(cls, model_config: "ModelConfig") -> None:
        """Check library and checkpoint early; keep LLM.int8() with outlier
        decomposition out of CUDA graphs.

        With `llm_int8_threshold` > 0 bitsandbytes splits off the outlier
        columns of every input, whose number depends on the data, so CUDA
        graph capture fails and those models run eagerly. At threshold 0 the
        int8 matmul has fixed shapes and is captured (measured on an H200:
        docs/benchmarks.md).
        """
        require_bitsandbytes()
        checkpoint_config = checkpoint_quantization_config(model_config)
        if checkpoint_config is not None and settings_argument(model_config):
            raise ValueError(
                "--quantization-config sets how bitsandbytes quantizes an "
                f"unquantized checkpoint while loading, but {model_config.model} "
                "is already quantized; drop --quantization-config."
            )
        settings = online_settings(model_config) or checkpoint_config
        if settings is None:
            return
        # Validates the settings before any worker starts.
        config = cls.from_config(settings)
        if (
            config.load_in_8bit
            and config.llm_int8_threshold > 0
            and not model_config.enforce_eager
        ):
            logger.warning(
                "bitsandbytes 8-bit models with llm_int8_threshold > 0 cannot "
                "run under CUDA graphs; falling back to eager mode "
                "(llm_int8_threshold=0 keeps them)."
            )
            model_config.enforce_eager = True

    @property
    def quant_storage_dtype(self) -> torch.dtype:
        """The element type a pre-quantized checkpoint stores 4-bit bytes as."""
        return getattr(torch, self.bnb_4bit_quant_storage)

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import (
            LinearBase,
            UnquantizedLinearMethod,
        )

        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                return UnquantizedLinearMethod()
            from vllm.plugins.bitsandbytes.linear import BitsAndBytesLinearMethod

            return BitsAndBytesLinearMethod(self)
        if isinstance(layer, RoutedExperts):
            from vllm.plugins.bitsandbytes.moe import BitsAndBytesMoEMethod

            return BitsAndBytesMoEMethod(self, layer.moe_config)
        return None

    def is_skipped(self, prefix: str) -> bool:
        """Whether `llm_int8_skip_modules` keeps the layer at `prefix` unquantized.

        An entry matches one dotted component of the prefix (`"lm_head"`) or a
        leading run of components (`"model.vision_tower"`), as transformers
        interprets the list.
        """
        parts = prefix.split(".")
        leading = {".".join(parts[: i + 1]) for i in range(len(parts))}
        return any(
            skip in parts or skip in leading for skip in self.llm_int8_skip_modules
        )

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    def get_weight_byte_size(self) -> float:
        return 1.0 if self.load_in_8bit else 0.5

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    def supports_any_weight_shape(self) -> bool:
        return True
