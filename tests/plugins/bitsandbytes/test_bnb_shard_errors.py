# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A damaged shard of a multi-file checkpoint is named in the error.

Real checkpoints are split into `model-000NN-of-000MM.safetensors` shards.
Here a 3-shard copy of a pre-quantized checkpoint has its middle (or last)
shard damaged one way at a time, and is loaded in this process through the
real engine config and the plugin's loader (`tests/fuzz`'s `load_directory`).
Each refusal must be one line that names the damaged shard, the tensor where
one is at fault, and what to do; no other shard may be named.
"""

import json
import shutil
from pathlib import Path

import bitsandbytes  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.checkpoints import get_checkpoint
from tests.fuzz.bnb_fuzz import load_directory

SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
DAMAGED = SHARDS[1]


def sharded_copy(name: str, directory: Path) -> Path:
    shutil.copytree(get_checkpoint(name), directory)
    return directory


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_header(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + body)


def first_tensor(path: Path) -> str:
    header, _ = header_of(path)
    return sorted(name for name in header if name != "__metadata__")[0]


def truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "is truncated: tensor "


def garble_header(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return "has a malformed header (not JSON)"


def make_unreadable(path: Path) -> str:
    # Tests run as root, for whom file permissions do not make a file
    # unreadable; a directory in its place does.
    path.unlink()
    path.mkdir()
    return "cannot be read (Is a directory)"


def mismatch_bytes(path: Path) -> str:
    header, body = header_of(path)
    tensor = first_tensor(path)
    header[tensor]["shape"] = [
        *header[tensor]["shape"][:-1],
        1 + header[tensor]["shape"][-1],
    ]
    write_header(path, header, body)
    return f"stores tensor {tensor} in "


@pytest.mark.parametrize(
    "damage",
    [truncate, garble_header, make_unreadable, mismatch_bytes],
    ids=["truncated", "bad-header", "unreadable", "bytes-do-not-match-header"],
)
def test_unreadable_shard_is_named(damage, tmp_path: Path) -> None:
    model = sharded_copy("llama-bnb-nf4-dq-3-shards", tmp_path / "model")
    problem = damage(model / DAMAGED)
    outcome = load_directory(model, {}, (DAMAGED,))
    assert outcome.status == "refused", outcome
    assert outcome.message.startswith(f"The weights file {model / DAMAGED} {problem}")
    assert outcome.message.endswith("; re-download or re-export that file.")
    assert not any(other in outcome.message for other in SHARDS if other != DAMAGED)


def corrupt_tensor(model: Path, tensor: str, value: float) -> Path:
    """Overwrite one stored tensor in whichever shard holds it."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][tensor]
    tensors = load_file(shard)
    tensors[tensor] = torch.full_like(tensors[tensor], value)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize(
    ("checkpoint", "tensor", "expected"),
    [
        (
            "llama-bnb-nf4-dq-3-shards",
            "model.layers.1.mlp.down_proj.weight.nested_absmax",
            (
                "The bitsandbytes quant_state of model.layers.1.mlp.down_proj.weight "
                "is corrupt: nested_absmax holds NaN"
            ),
        ),
        (
            "llama-bnb-int8-3-shards",
            "model.layers.1.self_attn.q_proj.SCB",
            "The int8 scales (SCB) of model.layers.1.self_attn.q_proj.weight",
        ),
    ],
    ids=["nf4-state", "int8-scales"],
)
def test_bad_tensor_names_its_shard(checkpoint, tensor, expected, tmp_path: Path):
    model = sharded_copy(checkpoint, tmp_path / "model")
    shard = corrupt_tensor(model, tensor, float("nan"))
    outcome = load_directory(model, {}, (shard.name,))
    assert outcome.status == "refused", outcome
    assert outcome.message.startswith(f"{shard}: {expected}")
    assert sum(name in outcome.message for name in SHARDS) == 1
