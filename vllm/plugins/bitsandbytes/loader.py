# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Model loader for `load_format="bitsandbytes"`.

It reads a checkpoint three ways: an unquantized one is cut per tensor-parallel
rank and quantized to 4 bits on the fly (or to LLM.int8() when the user asks
for `load_in_8bit` with `--quantization-config` or `hf_overrides`); a
pre-quantized 4-bit or LLM.int8() checkpoint is copied as stored. The model's
own `load_weights` places the tensors (through each parameter's
`shard_indexer`) while the stream records their quantization states; a
`LoadSession` then attaches the states to the parameters that own them.

Pre-quantized checkpoints are stored for a single rank. Under tensor
parallelism each rank cuts its part out of the quantized storage and state
(`reshard`), on the same `RankSplit`s the online path uses.
"""

import dataclasses
from collections.abc import Callable
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
from vllm.plugins.bitsandbytes.states import attach_quant_states
from vllm.plugins.bitsandbytes.streams import CheckpointTensors, readable_checkpoint

logger = init_logger(__name__)


class LoadSession:
    """One load's stages, and the quantization states passed between them.

    1. `stream`: the stream records each weight's state as it yields the
       weight, into states this session owns.
    2. The model's `load_weights` consumes the stream.
    3. `finish`: the states are complete only once the stream is drained (a
       4-bit weight waits for its state components, a fused-MoE state needs
       every expert's), so only then are they checked against what the model
       loaded and attached to its parameters.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout) -> None:
        self.model = model
        self.layout = layout
        self._states: dict[str, Any] = {}
        self._drained = False
        # MoE runners report expert weights under their own name, not the
        # parameter's; those are checked through their states instead.
        self._expected = {
            name
            for name, _ in model.named_parameters()
            if name not in layout.expert_params
        }

    def stream(
        self, open_stream: Callable[[dict[str, Any]], CheckpointTensors]
    ) -> CheckpointTensors:
        """The tensors of `open_stream(states)`, noting when they run out.

        `open_stream` is called now, so that what it checks and logs happens
        before the model reads any weight.
        """
        tensors = open_stream(self._states)

        def drained() -> CheckpointTensors:
            yield from tensors
            self._drained = True

        return drained()

    @property
    def states(self) -> dict[str, Any]:
        """Every recorded state, by vLLM's unstacked weight name.

        Refused until the stream is drained: read earlier, the states would
        silently lack the weights still waiting for their components.
        """
        if not self._drained:
            raise RuntimeError(
                f"{type(self.model).__name__}.load_weights returned before "
                "reading the whole checkpoint, so its bitsandbytes quantization "
                "states are incomplete; bitsandbytes cannot load this model yet."
            )
        return self._states

    def finish(self, loaded: set[str] | None) -> None:
        """Check what `load_weights` reported loading; attach the states."""
        states = self.states
        # Models without load tracking return None.
        if loaded is not None and (missing := self._expected - loaded):
            raise BitsAndBytesCheckpointError(
                f"The checkpoint did not provide these weights: {sorted(missing)}; "
                "check that it matches the model."
            )
        attach_quant_states(self.model, self.layout, states)


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
        session = LoadSession(model, layout)
        weights = session.stream(
            lambda states: self._weight_stream(
                model, model_config, checkpoint_config, layout, states, files
            )
        )
        session.finish(model.load_weights(weights))

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
