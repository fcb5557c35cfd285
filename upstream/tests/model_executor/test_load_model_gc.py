# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`BaseModelLoader.load_model` and the objects the garbage collector sees.

Objects that exist before loading are frozen out of the collections in
`load_model`; what loading creates is still collected there. Automatic
collection is off in these tests, so a tensor that is gone when `load_model`
returns was freed by `load_model`'s own collections. A tiny Llama from a
local config with dummy weights, CPU only, one tensor-parallel rank over
gloo; run `pytest tests/model_executor/test_load_model_gc.py`.
"""

import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig

from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import (
    cleanup_dist_env_and_memory,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader
from vllm.utils.gc_utils import freeze_gc_existing_objects


class CycleMakingLoader(DummyModelLoader):
    """Dummy weights, plus a 1 MiB tensor that only a reference cycle made
    during loading keeps alive, as transient loading state can be."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        super().load_weights(model, model_config)
        self.freeze_count_while_loading = gc.get_freeze_count()
        cycle: dict[str, object] = {"tensor": torch.ones(256, 1024)}
        cycle["self"] = cycle
        self.transient = weakref.ref(cycle["tensor"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory holding only a tiny Llama config."""
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        torch_dtype="float32",
    ).save_pretrained(path)
    return path


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


@pytest.fixture
def vllm_config(model_dir: Path, single_rank) -> VllmConfig:
    """The engine's config for the tiny Llama with dummy weights (a fresh one
    per load: a config records the attention layers built under it)."""
    return EngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        enforce_eager=True,
    ).create_engine_config()


@pytest.fixture
def no_automatic_gc(monkeypatch: pytest.MonkeyPatch):
    """Only explicit collections run; the heap starts and ends unfrozen.

    Without an accelerator, `torch.accelerator.empty_cache` raises; the CPU
    worker makes it a no-op before loading, and so does this fixture.
    """
    if not torch.accelerator.is_available():
        monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: None)
    gc.collect()
    assert gc.get_freeze_count() == 0
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def load(config: VllmConfig) -> tuple[CycleMakingLoader, nn.Module]:
    loader = CycleMakingLoader(config.load_config)
    with set_current_vllm_config(config):
        model = loader.load_model(vllm_config=config, model_config=config.model_config)
    return loader, model


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_cycle_made_while_loading_is_freed_by_load_model(vllm_config):
    loader, model = load(vllm_config)
    assert loader.freeze_count_while_loading > 0, "the heap was not frozen"
    assert loader.transient() is None, "load_model left the cycle's tensor alive"
    assert gc.get_freeze_count() == 0, "load_model left objects frozen"
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.usefixtures("no_automatic_gc")
def test_garbage_from_before_loading_is_collected_afterwards(vllm_config):
    cycle: dict[str, object] = {"tensor": torch.ones(16)}
    cycle["self"] = cycle
    older = weakref.ref(cycle["tensor"])
    del cycle
    load(vllm_config)
    # Frozen during the load, so its collections skipped it ...
    assert older() is not None
    # ... and unfrozen after it, so the next collection frees it.
    gc.collect()
    assert older() is None


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_callers_freeze_is_left_exactly_as_it_was(vllm_config):
    """Nothing more is frozen and nothing the caller froze is unfrozen.

    gc.get_objects() lists what collections traverse, the unfrozen objects;
    the freeze count only falls as frozen objects are deallocated."""
    sentinel = object.__new__(type("FrozenByCaller", (), {}))
    gc.freeze()
    frozen = gc.get_freeze_count()
    loader, model = load(vllm_config)
    assert 0 < loader.freeze_count_while_loading <= frozen
    assert 0 < gc.get_freeze_count() <= frozen
    tracked = {id(o) for o in gc.get_objects()}
    assert id(sentinel) not in tracked, "the caller's freeze was undone"
    assert id(model) in tracked, "load_model froze the model"
    assert loader.transient() is None


def test_the_freeze_ends_when_the_block_raises():
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), freeze_gc_existing_objects():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("load failed")
    assert gc.get_freeze_count() == 0


def test_existing_objects_stay_out_of_collections_in_the_block():
    """gc.get_objects() lists what collections traverse: not the frozen."""
    existing = object.__new__(type("Existing", (), {}))
    with freeze_gc_existing_objects():
        created = object.__new__(type("Created", (), {}))
        tracked = {id(o) for o in gc.get_objects()}
        assert id(existing) not in tracked
        assert id(created) in tracked
    assert id(existing) in {id(o) for o in gc.get_objects()}
