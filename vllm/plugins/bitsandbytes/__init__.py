# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes quantization for vLLM, as a plugin on the quantization hooks.

`register()` is the `vllm.general_plugins` entry point `bitsandbytes`; it runs
in every vLLM process, so it imports only vLLM's registries and the plugin's
config. The loader and the bitsandbytes library are imported when a model
uses them.
"""

_registered = False


def register() -> None:
    """Make `quantization="bitsandbytes"` and its load format available."""
    global _registered
    if _registered:
        return

    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.plugins.bitsandbytes.config import LOAD_FORMAT, BitsAndBytesConfig

    register_quantization_config(BitsAndBytesConfig.get_name())(BitsAndBytesConfig)
    # By name: the loader module imports the model layers, which processes
    # that never load a model (the API server) should not pay for.
    register_model_loader(LOAD_FORMAT, f"{__name__}.loader.BitsAndBytesModelLoader")
    _registered = True
