# SPDX-License-Identifier: Apache-2.0
"""The model loader toy_int8 selects through `get_required_load_format`.

vLLM's default loader checks that every parameter came from the checkpoint
only for unquantized models. toy_int8's storage is allocated with
`torch.empty` and filled only by its weight loaders, so a checkpoint missing
a linear weight would leave that layer computing with uninitialized memory.
This loader is the default one with that check always on (unless the user
sets `enable_weights_track` in `--model-loader-extra-config`). It is
registered by name (see `register`), so only a process that loads a toy_int8
model imports it.
"""

import dataclasses

from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import DefaultModelLoader


class ToyInt8ModelLoader(DefaultModelLoader):
    """The default loader, requiring every parameter from the checkpoint."""

    def __init__(self, load_config: LoadConfig) -> None:
        # The default loader picks checkpoint files by load format; read the
        # files it would read for the default one.
        super().__init__(dataclasses.replace(load_config, load_format="auto"))
        if self.enable_weights_track is None:
            self.enable_weights_track = True
