# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A pre-quantized checkpoint whose states do not fit its weights is refused.

bitsandbytes would take such a state as given and crash in a kernel or
compute garbage; the plugin names the tensor at fault instead. The
checkpoints are valid ones, saved as transformers saves them, with one entry
broken.
"""

import bitsandbytes  # noqa: F401
import pytest
import torch

from tests.plugins.bitsandbytes.test_bnb_checkpoint_states import (
    WEIGHT,
    consume_4bit,
    saved_4bit,
)


def test_4bit_bytes_of_another_type_than_declared_are_refused():
    checkpoint, _ = saved_4bit("nf4", False)
    checkpoint[WEIGHT] = checkpoint[WEIGHT].view(-1).view(torch.float16).reshape(-1, 1)
    with pytest.raises(ValueError, match="is torch.float16 of shape"):
        consume_4bit(checkpoint)


def test_missing_packed_quant_state_is_reported():
    checkpoint, _ = saved_4bit("nf4", False)
    del checkpoint[f"{WEIGHT}.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match=r"no single 'quant_state.bitsandbytes__\*'"):
        consume_4bit(checkpoint)


def test_unsupported_quant_type_is_reported():
    checkpoint, _ = saved_4bit("nf4", False)
    packed_state = checkpoint.pop(f"{WEIGHT}.quant_state.bitsandbytes__nf4")
    checkpoint[f"{WEIGHT}.quant_state.bitsandbytes__int4"] = packed_state
    with pytest.raises(ValueError, match="'int4'; only nf4 and fp4"):
        consume_4bit(checkpoint)


def test_corrupt_quant_state_is_reported():
    checkpoint, _ = saved_4bit("nf4", True)
    key = f"{WEIGHT}.quant_state.bitsandbytes__nf4"
    checkpoint[key] = torch.zeros_like(checkpoint[key])
    with pytest.raises(ValueError, match="is corrupt"):
        consume_4bit(checkpoint)
