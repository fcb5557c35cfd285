# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Model loader for `load_format="bitsandbytes"`.

It reads a checkpoint three ways: an unquantized one is cut per tensor-parallel
rank and quantized to 4 bits on the fly (or to LLM.int8() when the user asks
for `load_in_8bit` with `--quantization-config` or `hf_overrides`); a
pre-quantized 4-bit or LLM.int8() checkpoint is copied as stored. The model's
own `load_weights` places the tensors (through each parameter's
`shard_indexer`); afterwards the collected quantization states are attached to
the parameters that own them.

Pre-quantized checkpoints are stored for a single rank. Under tensor
parallelism each rank cuts its part out of the quantized storage and state
(`reshard`), on the same `RankSplit`s the online path uses.
"""

import dataclasses
from typing import Any

import torch
from torch import nn

from vllm.config import LoadConfig, ModelConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.plugins.bitsandbytes.checkpoint import (
    CheckpointTensors,
    read_prequantized_4bit,
    read_prequantized_int8,
)
from vllm.plugins.bitsandbytes.checkpoint_files import CheckpointFiles
from vllm.plugins.bitsandbytes.config import (
    BitsAndBytesCheckpointError,
    BitsAndBytesConfig,
    checkpoint_quantization_config,
    online_settings,
    require_bitsandbytes,
)
from vllm.plugins.bitsandbytes.layout import ModelLayout
from vllm.plugins.bitsandbytes.online import quantize_online_4bit, quantize_online_int8
from vllm.plugins.bitsandbytes.state_checks import readable_checkpoint
from vllm.plugins.bitsandbytes.states import attach_quant_states

logger = init_logger(__name__)


class BitsAndBytesModelLoader(BaseModelLoader):
    """Loads weights into bitsandbytes storage and attaches their states."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        # Finding, downloading and iterating checkpoint files is exactly the
        # default loader's job; only what happens to the tensors differs.
        self._reader = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="hf")
        )

    def download_model(self, model_config: ModelConfig) -> None:
        self._reader.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        require_bitsandbytes()
        checkpoint_config = checkpoint_quantization_config(model_config)
        if checkpoint_config is not None:
            method = checkpoint_config.get("quant_method")
            if method != "bitsandbytes":
                raise ValueError(
                    f"The bitsandbytes loader cannot read a {method} checkpoint; "
                    "load it without load_format='bitsandbytes'."
                )
        layout = ModelLayout(model)
        files = CheckpointFiles(model_config.model)
        try:
            self._load(model, model_config, checkpoint_config, layout, files)
        except BitsAndBytesCheckpointError as err:
            path = err.tensor and files.file_of(err.tensor)
            if not path:
                raise
            # Which of dozens of shards to re-download or re-export.
            raise BitsAndBytesCheckpointError(f"{path}: {err}", err.tensor) from err
        torch.accelerator.empty_cache()

    def _load(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        checkpoint_config: dict | None,
        layout: ModelLayout,
        files: CheckpointFiles,
    ) -> None:
        states: dict[str, Any] = {}
        weights = self._weight_stream(
            model, model_config, checkpoint_config, layout, states, files
        )
        # MoE runners report expert weights under their own name, not the
        # parameter's; those are checked through their states instead.
        expected = {
            name
            for name, _ in model.named_parameters()
            if name not in layout.expert_params
        }
        loaded = model.load_weights(weights)
        # Models without load tracking return None.
        if loaded is not None and (missing := expected - loaded):
            raise BitsAndBytesCheckpointError(
                f"The checkpoint did not provide these weights: {sorted(missing)}; "
                "check that it matches the model."
            )
        attach_quant_states(model, layout, states)

    def _weight_stream(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        checkpoint_config: dict | None,
        layout: ModelLayout,
        states: dict[str, Any],
        files: CheckpointFiles,
    ) -> CheckpointTensors:
        checkpoint = readable_checkpoint(
            self._reader.get_all_weights(model_config, model), files
        )
        tp_rank = get_tensor_model_parallel_rank()
        tp_size = get_tensor_model_parallel_world_size()
        settings = online_settings(model_config)
        online = checkpoint_config is None or settings is not None
        if online and settings and settings.get("load_in_8bit"):
            logger.info("Quantizing weights to 8-bit with bitsandbytes while loading.")
            return quantize_online_int8(checkpoint, layout, states, tp_rank, tp_size)
        if online:
            logger.info(
                "Quantizing weights to 4-bit with bitsandbytes while loading; "
                "this may take a while."
            )
            return quantize_online_4bit(checkpoint, layout, states, tp_rank, tp_size)
        if checkpoint_config.get("load_in_8bit", False):
            logger.info("Loading a pre-quantized bitsandbytes 8-bit checkpoint.")
            return read_prequantized_int8(checkpoint, layout, states, tp_rank, tp_size)
        logger.info("Loading a pre-quantized bitsandbytes 4-bit checkpoint.")
        storage = BitsAndBytesConfig.from_config(checkpoint_config).quant_storage_dtype
        return read_prequantized_4bit(
            checkpoint, layout, states, tp_rank, tp_size, storage
        )
