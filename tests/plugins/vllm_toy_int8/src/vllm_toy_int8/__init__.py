# SPDX-License-Identifier: Apache-2.0
"""A toy out-of-tree quantization plugin: weight-only int8, per-row scales.

`register()` is the `vllm.general_plugins` entry point `toy_int8`. vLLM runs
it in every process, possibly more than once, so it is idempotent and imports
only vLLM's registries and this package's config (no torch work happens
here). The loader is registered by its class name: vLLM imports it when a
toy_int8 model is loaded.
"""

_registered = False


def register() -> None:
    """Make `quantization="toy_int8"` and its load format available."""
    global _registered
    if _registered:
        return

    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader
    from vllm_toy_int8.toy_int8 import NAME, ToyInt8Config

    register_quantization_config(NAME)(ToyInt8Config)
    register_model_loader(NAME, f"{__name__}.loader.ToyInt8ModelLoader")
    _registered = True
