# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Shard placement by a parameter's `shard_indexer` in the weight loaders.

The parameters here store a layer's weight as each shard flattened into one
column (`[rows * cols, 1]`), a layout no `packed_factor` describes when the
shards differ in size. One indexer keeps the shards in order, one reverses
them: the expected storage is the concatenation of the flattened shards in
that order, written out independently of the loaders. CPU only, one
tensor-parallel rank over gloo; run
`pytest tests/model_executor/test_shard_indexer.py`.
"""

import pytest
import torch

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import (
    cleanup_dist_env_and_memory,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

INPUT_SIZE = 4
# Rows of gate and up: different sizes, so placement by proportion of the
# shard count alone would be wrong.
GATE_UP_ROWS = [6, 10]
HEAD_SIZE = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
# vLLM's CPU MoE backends take hidden sizes of whole SIMD blocks.
NUM_EXPERTS = 4
HIDDEN = 64
INTERMEDIATE = 96


class InOrder:
    """Shard rows `[offset, offset + size)` flattened, in row order."""

    def __init__(self, columns: int) -> None:
        self.columns = columns

    def __call__(self, offset: int, size: int, total: int) -> tuple[int, int]:
        return offset * self.columns, size * self.columns


class Reversed(InOrder):
    """The same runs, stored from the end of the storage backwards."""

    def __call__(self, offset: int, size: int, total: int) -> tuple[int, int]:
        return (total - offset - size) * self.columns, size * self.columns


# Not vLLM's dist_init (nccl): gloo, kept here so that this PR's tests stand alone.
# Function-scoped, as vLLM's autouse cleanup_fixture ends the group after each test.
@pytest.fixture(autouse=True)
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


def flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, 1)


def flat_storage(rows: int, indexer: InOrder) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(rows * INPUT_SIZE, 1), requires_grad=False)
    set_weight_attrs(
        param,
        {
            "output_dim": 0,
            "packed_dim": 0,
            "packed_factor": 1,
            "is_sharded_weight": True,
            "shard_indexer": indexer,
        },
    )
    return param


def shards(rows: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(count, INPUT_SIZE, generator=generator) for count in rows]


@pytest.mark.parametrize("order", [InOrder, Reversed])
def test_merged_column_shards_one_by_one(order: type[InOrder]) -> None:
    layer = MergedColumnParallelLinear(INPUT_SIZE, GATE_UP_ROWS, bias=False)
    gate, up = shards(GATE_UP_ROWS)
    param = flat_storage(sum(GATE_UP_ROWS), order(INPUT_SIZE))
    layer.weight_loader(param, flat(gate), 0)
    layer.weight_loader(param, flat(up), 1)
    expected = [gate, up] if order is InOrder else [up, gate]
    assert torch.equal(param.data, flat(torch.cat(expected)))


@pytest.mark.parametrize("order", [InOrder, Reversed])
def test_merged_column_fused_on_disk(order: type[InOrder]) -> None:
    """A fused gate_up tensor, laid out like the storage, lands unchanged."""
    layer = MergedColumnParallelLinear(INPUT_SIZE, GATE_UP_ROWS, bias=False)
    gate, up = shards(GATE_UP_ROWS)
    stored = flat(torch.cat([gate, up] if order is InOrder else [up, gate]))
    param = flat_storage(sum(GATE_UP_ROWS), order(INPUT_SIZE))
    layer.weight_loader(param, stored.clone(), None)
    assert torch.equal(param.data, stored)


def qkv_layer() -> tuple[QKVParallelLinear, list[int]]:
    layer = QKVParallelLinear(
        INPUT_SIZE, HEAD_SIZE, NUM_HEADS, NUM_KV_HEADS, bias=False
    )
    q_rows, kv_rows = NUM_HEADS * HEAD_SIZE, NUM_KV_HEADS * HEAD_SIZE
    return layer, [q_rows, kv_rows, kv_rows]


@pytest.mark.parametrize("order", [InOrder, Reversed])
def test_qkv_shards_one_by_one(order: type[InOrder]) -> None:
    layer, rows = qkv_layer()
    q, k, v = shards(rows)
    param = flat_storage(sum(rows), order(INPUT_SIZE))
    for shard_id, tensor in zip("qkv", (q, k, v), strict=True):
        layer.weight_loader(param, flat(tensor), shard_id)
    expected = [q, k, v] if order is InOrder else [v, k, q]
    assert torch.equal(param.data, flat(torch.cat(expected)))


@pytest.mark.parametrize("order", [InOrder, Reversed])
def test_qkv_fused_on_disk(order: type[InOrder]) -> None:
    layer, rows = qkv_layer()
    q, k, v = shards(rows)
    stored = flat(torch.cat([q, k, v] if order is InOrder else [v, k, q]))
    param = flat_storage(sum(rows), order(INPUT_SIZE))
    layer.weight_loader(param, stored.clone(), None)
    assert torch.equal(param.data, stored)


def test_shards_outside_the_packed_branch_keep_packed_factor() -> None:
    """Without a shard_indexer, packed parameters still divide by the factor."""
    layer = MergedColumnParallelLinear(INPUT_SIZE, GATE_UP_ROWS, bias=False)
    gate, up = shards(GATE_UP_ROWS)
    param = torch.nn.Parameter(torch.zeros(sum(GATE_UP_ROWS) // 2, INPUT_SIZE))
    set_weight_attrs(param, {"output_dim": 0, "packed_dim": 0, "packed_factor": 2})
    layer.weight_loader(param, torch.cat([gate[:3], up[:5]]), None)
    assert torch.equal(param.data, torch.cat([gate[:3], up[:5]]))


@pytest.mark.parametrize("order", [InOrder, Reversed])
def test_fused_moe_indexed_weight_loader(order: type[InOrder]) -> None:
    """w1 and w3 go where the indexer says within each expert; w2 whole."""
    with set_current_vllm_config(VllmConfig()):
        runner = FusedMoEFactory(
            num_experts=NUM_EXPERTS,
            top_k=2,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            prefix="test.experts",
        )
    experts = next(
        p.weight_loader.__self__
        for name, p in runner.named_parameters()
        if name.endswith("w13_weight")
    )
    w13 = torch.nn.Parameter(
        torch.zeros(NUM_EXPERTS, 2 * INTERMEDIATE * HIDDEN, 1), requires_grad=False
    )
    w2 = torch.nn.Parameter(
        torch.zeros(NUM_EXPERTS, HIDDEN * INTERMEDIATE, 1), requires_grad=False
    )
    w13.shard_indexer = order(HIDDEN)
    generator = torch.Generator().manual_seed(0)
    expected_w13 = torch.zeros_like(w13.data)
    expected_w2 = torch.zeros_like(w2.data)
    for expert in range(NUM_EXPERTS):
        w1, w3 = (
            torch.randn(INTERMEDIATE, HIDDEN, generator=generator) for _ in range(2)
        )
        down = torch.randn(HIDDEN, INTERMEDIATE, generator=generator)
        for param, shard_id, tensor in (
            (w13, "w1", w1),
            (w13, "w3", w3),
            (w2, "w2", down),
        ):
            assert experts.indexed_weight_loader(
                param, flat(tensor), f"experts.{expert}.{shard_id}.weight", shard_id,
                expert, return_success=True,
            )  # fmt: skip
        halves = [w1, w3] if order is InOrder else [w3, w1]
        expected_w13[expert] = flat(torch.cat(halves))
        expected_w2[expert] = flat(down)
    assert torch.equal(w13.data, expected_w13)
    assert torch.equal(w2.data, expected_w2)


def test_fused_moe_indexed_weight_loader_names_a_shape_mismatch() -> None:
    with set_current_vllm_config(VllmConfig()):
        runner = FusedMoEFactory(
            num_experts=NUM_EXPERTS,
            top_k=2,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            prefix="test.mismatch",
        )
    experts = next(p.weight_loader.__self__ for p in runner.parameters())
    w2 = torch.nn.Parameter(torch.zeros(NUM_EXPERTS, HIDDEN * INTERMEDIATE, 1))
    message = (
        r"Cannot load e.w2.weight \(w2\) of expert 1: its storage expects this "
        r"rank's part of shape \(6144, 1\) but got \(6143, 1\)"
    )
    with pytest.raises(ValueError, match=message):
        experts.indexed_weight_loader(w2, torch.zeros(6143, 1), "e.w2.weight", "w2", 1)
