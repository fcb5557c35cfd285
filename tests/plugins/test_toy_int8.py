# SPDX-License-Identifier: Apache-2.0
"""A second, tiny out-of-tree quantization plugin runs on the same hooks.

`tests/plugins/vllm_toy_int8` quantizes an unquantized checkpoint to int8
with per-row scales while loading, into storage that interleaves scale rows
with the weight rows, so core's weight loaders can only place its shards
through the `shard_indexer` hook. It needs no change to core and nothing of
bitsandbytes' shape (see docs/quantization_hooks.md). It also needs what
vllm-bnb-plugin monkeypatches `EngineArgs` for on pristine vLLM, its own model
loader and eager mode, and reads its settings from `--quantization-config`;
each comes from a config hook, and the plugin's source assigns nothing onto
vLLM (tests/test_import_contracts.py checks it as it checks the in-tree
plugin).

The indexer's placements are checked against the block layout built here.
The real engine runs on CPU in subprocesses (toy_int8_engine.py): four
engine starts and three refusals (one while loading, two before any engine
starts), in three processes. Every rank's storage (Llama at TP=1 and TP=2,
Phi-3 with its fused qkv/gate_up at TP=2, which core's fused path cuts with
the indexer) must equal, byte for byte, the layout computed here from the
checkpoint with this file's own quantizer, and the greedy tokens at TP=2 must
equal those of the unquantized engine loading the dequantized weights. The
Phi-3 run leaves o_proj unquantized by a `--quantization-config` setting. The
toy_int8 runs pass neither `enforce_eager` nor `load_format`: every worker
must run eagerly and load through the plugin's loader, whose refusal of a
checkpoint that lacks a weight shows it ran.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import ENGINE_ENV

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
PLUGIN_DIR = HERE / "vllm_toy_int8"
ENGINE_SCRIPT = HERE / "toy_int8_engine.py"

PROMPTS = [[1, 12, 37, 99, 5], [1, 200, 3], [1, 7, 7, 7, 7, 7, 7], [1, 42, 64, 128]]
MAX_TOKENS = 16
ENGINE_TIMEOUT_S = 900
DTYPE = torch.bfloat16
TP2 = {"tensor_parallel_size": 2}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TOY = {"quantization": "toy_int8"}
# Phi-3's run leaves its o_proj layers unquantized, by the plugin's setting.
PHI3_SKIP = ["o_proj"]
# Dropped from a copy of the Llama checkpoint: the plugin's loader must refuse it.
MISSING_WEIGHT = "model.layers.0.mlp.down_proj.weight"
# toy_int8 runs: (case, checkpoint, TP size, layers left unquantized)
TOY_RUNS = [
    ("llama-tp1", "llama", 1, []),
    ("llama-tp2", "llama", 2, []),
    ("phi3-tp2", "phi3", 2, PHI3_SKIP),
]

# The linear layers of a Llama-like layer: vLLM parameter -> the logical
# shards stacked in it (checkpoint names) and the dim tensor parallelism
# splits (0: column/merged/QKV, 1: row parallel).
LINEAR_LAYERS = {
    "self_attn.qkv_proj": (("q_proj", "k_proj", "v_proj"), 0),
    "self_attn.o_proj": (("o_proj",), 1),
    "mlp.gate_up_proj": (("gate_proj", "up_proj"), 0),
    "mlp.down_proj": (("down_proj",), 1),
}


@pytest.fixture(scope="session")
def toy_int8_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that gives a subprocess the plugin, as if installed.

    A temporary directory holds a copy of the package and a `.dist-info`
    declaring the entry point of its pyproject.toml; a process that has it on
    `PYTHONPATH` finds the plugin as vLLM finds installed plugins (through
    `importlib.metadata`). Nothing is installed into the environment. This
    process imports the package from its sources, without the entry point,
    so its own plugin loading is unchanged.
    """
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("toy-int8-site")
    package = PLUGIN_DIR / "src" / "vllm_toy_int8"
    shutil.copytree(
        package, site / package.name, ignore=shutil.ignore_patterns("__pycache__")
    )
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n"
            + "".join(f"{key} = {target}\n" for key, target in points.items())
            for group, points in project["entry-points"].items()
        )
    )
    source = str(PLUGIN_DIR / "src")
    if source not in sys.path:
        sys.path.insert(0, source)
    inherited = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": os.pathsep.join([str(site)] + ([inherited] if inherited else []))
    }


def reference_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented quantizer: per row, scale = max|w| / 127 (1 if zero)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
    scale[scale == 0] = 1.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def reference_block(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One shard's storage: its int8 rows, then its scales' bytes, zero padded."""
    width = q.shape[1]
    raw = scale.numpy().astype("<f4").tobytes()
    raw += bytes(-len(raw) % width)
    scale_rows = torch.frombuffer(bytearray(raw), dtype=torch.int8).view(-1, width)
    return torch.cat([q, scale_rows])


@settings(max_examples=200, deadline=None)
@given(
    shard_rows=st.lists(st.integers(1, 96), min_size=1, max_size=3),
    width=st.integers(1, 64),
    tp_size=st.integers(1, 4),
)
def test_indexer_places_shards_as_blocks(
    toy_int8_plugin: dict[str, str], shard_rows: list[int], width: int, tp_size: int
) -> None:
    """A shard's rows map to its block, among this rank's or all ranks' blocks.

    A rank's storage is its shards' blocks one after another; a weight fused
    on disk is packed as every rank's block of a shard, shard after shard.
    """
    from vllm_toy_int8.toy_int8 import ScaleRowsIndexer

    block_rows = [
        reference_block(
            torch.zeros(rows, width, dtype=torch.int8), torch.ones(rows)
        ).shape[0]
        for rows in shard_rows
    ]
    block_starts = list(itertools.accumulate(block_rows, initial=0))[:-1]
    row_starts = list(itertools.accumulate(shard_rows, initial=0))[:-1]
    indexer = ScaleRowsIndexer(shard_rows, width)
    total = sum(shard_rows)
    for rows, start, block, block_start in zip(
        shard_rows, row_starts, block_rows, block_starts, strict=True
    ):
        assert indexer(start, rows, total) == (block_start, block)
        assert indexer(tp_size * start, tp_size * rows, tp_size * total) == (
            tp_size * block_start,
            tp_size * block,
        )


def logical_shards(model_dir: Path) -> dict[str, tuple[list[torch.Tensor], int]]:
    """Checkpoint weights of every linear layer, split into logical shards.

    Phi-3 stores qkv_proj and gate_up_proj fused; they are split here by the
    config's sizes so both kinds of checkpoints yield the same shards.
    """
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    fused_sizes = {
        "self_attn.qkv_proj": [
            config["num_attention_heads"] * head_dim,
            config["num_key_value_heads"] * head_dim,
            config["num_key_value_heads"] * head_dim,
        ],
        "mlp.gate_up_proj": [config["intermediate_size"]] * 2,
    }
    shards = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (parts, split_dim) in LINEAR_LAYERS.items():
            prefix = f"model.layers.{layer}.{name}"
            fused = tensors.get(f"{prefix}.weight")
            if fused is not None and len(parts) > 1:
                weights = list(fused.split(fused_sizes[name]))
            else:
                module = prefix.rpartition(".")[0]
                weights = [tensors[f"{module}.{part}.weight"] for part in parts]
            shards[f"{prefix}.weight"] = (weights, split_dim)
    return shards


def expected_storage(
    weights: list[torch.Tensor], split_dim: int, rank: int, tp: int
) -> torch.Tensor:
    """This rank's storage: per shard, its rows/columns of the whole-row quant."""
    blocks = []
    for weight in weights:
        q, scale = reference_quantize(weight)
        if split_dim == 0:
            q, scale = q.chunk(tp)[rank], scale.chunk(tp)[rank]
        else:
            q = q.chunk(tp, dim=1)[rank]
        blocks.append(reference_block(q, scale))
    return torch.cat(blocks)


def is_skipped(name: str, skipped: list[str]) -> bool:
    """Whether the plugin's `skip_modules` setting names this layer."""
    return not set(skipped).isdisjoint(name.split("."))


def write_dequantized_checkpoint(model_dir: Path, out: Path) -> Path:
    """Copy of an unfused checkpoint whose linear weights are dequantized."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(model_dir / "model.safetensors")
    linear_parts = {p for parts, _ in LINEAR_LAYERS.values() for p in parts}
    for name, weight in tensors.items():
        if name.rsplit(".", 2)[-2] in linear_parts:
            q, scale = reference_quantize(weight)
            tensors[name] = (q.float() * scale[:, None]).to(weight.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_checkpoint_without(model_dir: Path, name: str, out: Path) -> Path:
    """Copy of a checkpoint that lacks the tensor `name`."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(model_dir / "model.safetensors")
    del tensors[name]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def engine_case(name: str, model: Path, **llm_kwargs: Any) -> dict[str, Any]:
    """One LLM run; `enforce_eager` and `load_format` only if given here."""
    return {
        "name": name,
        "model": str(model),
        "llm_kwargs": {
            "max_model_len": 256,
            "dtype": str(DTYPE).removeprefix("torch."),
            "seed": 0,
            "skip_tokenizer_init": True,
            **llm_kwargs,
        },
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
    }


def run_engine(
    cases: list[dict], out_dir: Path, env: dict[str, str], plugin: dict[str, str]
) -> None:
    """Run cases in one engine subprocess; results land in `out_dir`."""
    spec = out_dir / f"{cases[0]['name']}-spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    # Its insecure serialization lets collective_rpc ship the storage-reading
    # function to the workers.
    full_env.update(ENGINE_ENV)
    full_env.update(plugin)
    full_env.update(env)
    log = out_dir / f"{cases[0]['name']}.log"
    with log.open("w") as log_file:
        subprocess.run(
            [sys.executable, str(ENGINE_SCRIPT), str(spec), str(out_dir)],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_TIMEOUT_S,
            check=True,
        )


@pytest.fixture(scope="session")
def engine_runs(toy_int8_plugin: dict[str, str], tmp_path_factory) -> Path:
    """All engine runs of this module (four engine starts), done once."""
    out = tmp_path_factory.mktemp("toy_int8")
    llama, phi3 = get_checkpoint("llama"), get_checkpoint("phi3")
    dequantized = write_dequantized_checkpoint(llama, out / "llama-dequantized")
    incomplete = write_checkpoint_without(llama, MISSING_WEIGHT, out / "incomplete")
    run_engine(
        [
            engine_case("llama-tp1", llama, **TOY),
            # Refused while the config is built, before any engine starts.
            engine_case(
                "misspelled-setting",
                llama,
                quantization_config={"skip_module": PHI3_SKIP},
                **TOY,
            ),
            # Refused by the plugin's loader; last, as a failed load may leave
            # the process unfit for another engine.
            engine_case("missing-weight", incomplete, **TOY),
        ],
        out,
        {},
        toy_int8_plugin,
    )
    run_engine(
        [
            engine_case("llama-tp2", llama, **TOY, **TP2),
            engine_case(
                "llama-dequantized-tp2", dequantized, enforce_eager=True, **TP2
            ),
            engine_case(
                "phi3-tp2",
                phi3,
                quantization_config={"skip_modules": PHI3_SKIP},
                **TOY,
                **TP2,
            ),
        ],
        out,
        TP2_ENV,
        toy_int8_plugin,
    )
    # The plugin filter excludes toy_int8: the engine must refuse to start.
    run_engine(
        [engine_case("disabled", llama, **TOY)],
        out,
        {"VLLM_PLUGINS": "bitsandbytes"},
        toy_int8_plugin,
    )
    return out


def result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def case_kwargs(out: Path, name: str) -> dict[str, Any]:
    """The `LLM(...)` arguments a case ran with, from the run's spec."""
    for spec in out.glob("*-spec.json"):
        for case in json.loads(spec.read_text())["cases"]:
            if case["name"] == name:
                return case["llm_kwargs"]
    raise KeyError(name)


def tokens(out: Path, name: str) -> list[list[int]]:
    run = result(out, name)
    assert run["status"] == "ok", f"{name} failed: {run.get('error')}"
    return run["token_ids"]


@pytest.mark.parametrize(("case", "checkpoint", "tp", "skipped"), TOY_RUNS)
def test_storage_is_exact_per_rank(
    engine_runs: Path, case: str, checkpoint: str, tp: int, skipped: list[str]
) -> None:
    """Each rank holds exactly its slice of the reference quantization.

    Layers named by the `--quantization-config` setting hold none.
    """
    assert result(engine_runs, case)["status"] == "ok"
    shards = logical_shards(get_checkpoint(checkpoint))
    quantized = {name for name in shards if not is_skipped(name, skipped)}
    for rank in range(tp):
        storage = load_file(engine_runs / f"{case}-rank{rank}.safetensors")
        assert storage.keys() == quantized
        for name in quantized:
            weights, split_dim = shards[name]
            expected = expected_storage(weights, split_dim, rank, tp)
            actual = storage[name]
            assert actual.shape == expected.shape, (rank, name)
            wrong_rows = (actual != expected).any(dim=1).nonzero().flatten()
            assert wrong_rows.numel() == 0, (
                f"rank {rank} {name}: {wrong_rows.numel()} of {len(expected)} "
                f"storage rows differ, first {wrong_rows[:8].tolist()}"
            )


def test_skip_setting_leaves_its_layers_unquantized(engine_runs: Path) -> None:
    """The `--quantization-config` setting reached every worker's config."""
    layers = logical_shards(get_checkpoint("phi3")).keys()
    for rank in result(engine_runs, "phi3-tp2")["ranks"]:
        expected = {
            name.removesuffix(".weight"): "UnquantizedLinearMethod"
            if is_skipped(name, PHI3_SKIP)
            else "ToyInt8LinearMethod"
            for name in layers
        }
        assert rank["linear_methods"] == expected
        assert "UnquantizedLinearMethod" in expected.values()


# Below this logprob lead the greedy choice is a near tie, which the
# unquantized CPU linear (oneDNN) and the toy's matmul, rounding the same
# products in another order, may break differently on some CPUs.
NEAR_TIE = 1e-3


def test_tokens_equal_dequantized_reference(engine_runs: Path) -> None:
    """At TP=2, toy_int8 computes with exactly the dequantized weights: the
    same greedy tokens, up to the first step of a prompt where the reference
    chose by a near tie."""
    toy = tokens(engine_runs, "llama-tp2")
    reference = tokens(engine_runs, "llama-dequantized-tp2")
    margins = result(engine_runs, "llama-dequantized-tp2")["margins"]
    for toy_ids, reference_ids, leads in zip(toy, reference, margins, strict=True):
        assert leads[0] >= NEAR_TIE, "a prompt starts at a near tie: change it"
        for toy_id, reference_id, lead in zip(
            toy_ids, reference_ids, leads, strict=True
        ):
            if lead < NEAR_TIE:
                break
            assert toy_id == reference_id


def test_tp2_starts_like_tp1(engine_runs: Path) -> None:
    """Scales are taken over whole rows, so TP=2 dequantizes to the same model.

    Only the first token of each prompt is compared: TP=2 sums the row
    parallel layers' bf16 partial products in another order, so later greedy
    tokens of a random model may part at near ties (the unquantized engine's
    do too). Exactness is what the storage and reference tests check.
    """
    tp1, tp2 = tokens(engine_runs, "llama-tp1"), tokens(engine_runs, "llama-tp2")
    assert [t[0] for t in tp2] == [t[0] for t in tp1]


@pytest.mark.parametrize(("case", "checkpoint", "tp", "skipped"), TOY_RUNS)
def test_every_rank_runs_eagerly_through_the_plugins_loader(
    engine_runs: Path, case: str, checkpoint: str, tp: int, skipped: list[str]
) -> None:
    """`verify_and_update_model_config` and `get_required_load_format` reach
    every worker.

    The run passed neither `enforce_eager` nor `load_format`. On the CPU
    platform vLLM would otherwise compile the model (torch.compile) and load
    it with the default loader (load format "auto").
    """
    assert (
        case_kwargs(engine_runs, case)
        .keys()
        .isdisjoint({"enforce_eager", "load_format", "compilation_config"})
    )
    run = result(engine_runs, case)
    assert run["status"] == "ok", run.get("error")
    assert sorted(rank["rank"] for rank in run["ranks"]) == list(range(tp))
    for rank in run["ranks"]:
        assert rank["enforce_eager"] is True, rank
        assert rank["compilation_mode"] == "NONE", rank
        assert rank["load_format"] == TOY["quantization"], rank


def test_loader_refuses_a_checkpoint_without_a_weight(engine_runs: Path) -> None:
    """The plugin's loader ran: it requires every parameter from the checkpoint.

    vLLM's default loader checks that only for unquantized models, so with it
    toy_int8 would compute with the uninitialized storage of that layer.
    """
    run = result(engine_runs, "missing-weight")
    assert run["status"] == "error"
    assert "not initialized from checkpoint" in run["error"]
    assert MISSING_WEIGHT in run["error"]


def test_misspelled_setting_is_refused_by_the_plugin(engine_runs: Path) -> None:
    """`--quantization-config` reaches the plugin's `from_config` through
    `verify_and_update_model_config`, while the model config is validated
    (before any engine starts), not vLLM's online-quantization schema."""
    run = result(engine_runs, "misspelled-setting")
    assert run["status"] == "error"
    error = run["error"]
    assert "validation error for ModelConfig" in error, error
    assert "QuantizationConfigArgs" not in error, error
    assert "toy_int8" in error and "'skip_module'" in error, error


@pytest.mark.parametrize(
    ("case", "dtype"),
    [
        ("llama-tp1", torch.int8),
        ("llama-tp2", torch.int8),
        ("llama-dequantized-tp2", DTYPE),
    ],
)
def test_performance_metrics_use_the_stored_weight_size(
    engine_runs: Path, case: str, dtype: torch.dtype
) -> None:
    """vLLM's performance metrics take toy_int8's bytes per weight from the
    `get_weight_byte_size` hook (a method they do not list by name)."""
    sizes = result(engine_runs, case)["weight_byte_size"]
    assert (sizes["attn"], sizes["ffn"]) == (dtype.itemsize, dtype.itemsize)


def test_disabled_plugin_is_a_clear_error(engine_runs: Path) -> None:
    """Core names the filtered-out plugin and says how to enable it."""
    run = result(engine_runs, "disabled")
    assert run["status"] == "error"
    assert "provided by the plugin 'toy_int8'" in run["error"]
    assert "add 'toy_int8' to VLLM_PLUGINS" in run["error"]


def test_loader_is_registered_by_name(toy_int8_plugin: dict[str, str]) -> None:
    """Registering imports no loader; the load format resolves to the plugin's."""
    code = (
        "import sys\n"
        "import vllm_toy_int8\n"
        "vllm_toy_int8.register(); vllm_toy_int8.register()\n"
        "print('vllm_toy_int8.loader' in sys.modules)\n"
        "from vllm.config.load import LoadConfig\n"
        "from vllm.model_executor.model_loader import get_model_loader\n"
        "loader = get_model_loader(LoadConfig(load_format='toy_int8'))\n"
        "print(type(loader).__module__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **toy_int8_plugin},
    )
    imported_at_registration, loader_module = run.stdout.split()[-2:]
    assert imported_at_registration == "False"
    assert loader_module == "vllm_toy_int8.loader"
