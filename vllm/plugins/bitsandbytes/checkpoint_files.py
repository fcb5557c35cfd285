# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Which file of a checkpoint holds a tensor, and what is wrong with a file.

Real checkpoints are dozens of `model-000NN-of-000MM.safetensors` shards. An
error about checkpoint content has to say which shard to re-download, and a
file the reader cannot read has to be found among them, so each is looked
up here from the directory (never on the happy path of a load).
"""

import json
import math
from functools import cached_property
from pathlib import Path

from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
# A safetensors file starts with the byte length of its JSON header.
HEADER_LENGTH_BYTES = 8
SAFETENSORS_ITEM_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unreadable, as a phrase; None if sound.

    safetensors decides: `safe_open` validates the header and every tensor's
    byte range, as the loader's reader does. Its refusals name no tensor or
    byte ("incomplete metadata, file not fully covered"), so the header is
    read again to explain them, and the library's words are the fallback.
    """
    try:
        with safe_open(path, framework="pt"):
            return None
    except SafetensorError as err:
        refusal = f"is not a valid safetensors file ({error_summary(err)})"
    except OSError as err:
        refusal = f"cannot be read ({err.strerror or error_summary(err)})"
    return _framing_problem(path) or refusal


def error_summary(err: BaseException) -> str:
    """A library error in one line, to quote inside one of the plugin's."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def _framing_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, as a phrase, or None.

    Checked in the order a reader relies on them: the header's length and
    JSON, each tensor's byte range against its shape and dtype, and the
    file's size against the ranges.
    """
    # Hand-parsed: safetensors exposes no header of a file it refuses, and
    # its refusal does not say which tensor or byte is at fault.
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            length_bytes = file.read(HEADER_LENGTH_BYTES)
            if len(length_bytes) < HEADER_LENGTH_BYTES:
                return f"is truncated: it has {size} bytes, less than any header"
            length = int.from_bytes(length_bytes, "little")
            if HEADER_LENGTH_BYTES + length > size:
                return (
                    f"is truncated: its header claims {length} bytes but the "
                    f"file has {size} bytes"
                )
            header = json.loads(file.read(length))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return "has a malformed header (not JSON)"
    if not isinstance(header, dict):
        return "has a malformed header (not a JSON object)"
    data_size = size - HEADER_LENGTH_BYTES - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            stored = end - start
            expected = math.prod(info["shape"]) * SAFETENSORS_ITEM_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"has a malformed header entry for tensor {name}"
        if stored != expected:
            return (
                f"stores tensor {name} in {stored} bytes but its header "
                f"describes {info['dtype']} of shape {info['shape']}, "
                f"{expected} bytes"
            )
        if end > data_size:
            return (
                f"is truncated: tensor {name} ends at data byte {end} but the "
                f"file holds {data_size}"
            )
    return None


def _tensor_names(path: Path) -> list[str]:
    """The tensors of a safetensors file; none if safetensors cannot read it."""
    try:
        with safe_open(path, framework="pt") as file:
            return list(file.keys())
    except (SafetensorError, OSError):
        return []


class CheckpointFiles:
    """The weights files of a checkpoint directory, found on demand."""

    def __init__(self, location: str) -> None:
        self.location = location
        path = Path(location)
        self.directory = path if path.is_dir() else None

    def weights_files(self) -> list[Path]:
        if self.directory is None:
            return []
        return sorted(self.directory.glob("*.safetensors")) or sorted(
            self.directory.glob("*.bin")
        )

    @cached_property
    def _file_of(self) -> dict[str, Path]:
        """Tensor name -> file of a sharded checkpoint, from index or headers."""
        if self.directory is None:
            return {}
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return {
                    name: self.directory / file for name, file in weight_map.items()
                }
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return {
            name: path
            for path in self.weights_files()
            if path.suffix == ".safetensors"
            for name in _tensor_names(path)
        }

    def file_of(self, tensor: str) -> Path | None:
        files = self.weights_files()
        if len(files) == 1:
            return files[0]
        return self._file_of.get(tensor)

    def damaged_file(self) -> tuple[Path, str] | None:
        """The first safetensors file that cannot be read, and why."""
        for path in self.weights_files():
            if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
                return path, problem
        return None
