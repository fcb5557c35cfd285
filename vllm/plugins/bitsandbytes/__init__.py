# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""bitsandbytes quantization for vLLM, as a plugin on the quantization hooks.

`register()` is the `vllm.general_plugins` entry point `bitsandbytes`; it runs
in every vLLM process, so it imports only vLLM's registries and the plugin's
own classes. The bitsandbytes library is imported when a model uses it.
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
    from vllm.plugins.bitsandbytes.loader import BitsAndBytesModelLoader

    register_quantization_config(BitsAndBytesConfig.get_name())(BitsAndBytesConfig)
    register_model_loader(LOAD_FORMAT)(BitsAndBytesModelLoader)
    _registered = True
