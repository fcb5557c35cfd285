# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""4-bit checkpoints whose packed bytes are stored as bfloat16, float16 or float32.

FSDP-QLoRA sets `bnb_4bit_quant_storage` to the model's dtype so that FSDP
can shard the packed weights like every other parameter. The checkpoints
here are written by transformers with that setting on CPU, from the same
weights as the uint8 `llama-bnb-nf4`; they hold the same bytes, typed
differently. Loaded on the real engine, every parameter, state and token
must equal the uint8 checkpoint's. Upstream vLLM and vllm-bnb-plugin refuse
them.
"""

import pytest
import torch

from tests.plugins.bitsandbytes import bnb_engine_probe

pytestmark = pytest.mark.engine

UINT8 = "llama-bnb-nf4"
STORAGES = ("bfloat16", "float16", "float32")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    names = [UINT8, *(f"{UINT8}-storage-{storage}" for storage in STORAGES)]
    workdir = tmp_path_factory.mktemp("quant_storage")
    runs = bnb_engine_probe.run([(name, {}) for name in names], 1, workdir)
    return dict(zip(names, runs, strict=True))


def assert_same(ours, theirs, where: str) -> None:
    """Tensors bit for bit, other values by equality, nested alike."""
    if isinstance(ours, torch.Tensor):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("storage", STORAGES)
def test_loads_exactly_as_the_uint8_checkpoint(storage: str, results):
    ours, uint8 = results[f"{UINT8}-storage-{storage}"], results[UINT8]
    (raw,) = ours["raw"]
    assert raw, "no bitsandbytes weights were found"
    assert_same(raw, uint8["raw"][0], "raw")
    assert ours["tokens"] == uint8["tokens"]
