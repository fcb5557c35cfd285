# SPDX-License-Identifier: Apache-2.0
"""Malformed bitsandbytes checkpoints are refused clearly, never half-loaded.

The quick run of `tests.fuzz.bnb_fuzz` (derandomized, so CI sees the same
cases every time); `python -m tests.fuzz.bnb_fuzz --full` runs 1,000. A
`.bin` checkpoint hiding a pickle payload proves weights are read with
`torch.load(weights_only=True)`: the payload never runs.
"""

import json
import shutil
from pathlib import Path

import bitsandbytes  # noqa: F401
import torch

from tests.fuzz import bnb_fuzz


def test_quick_fuzz_finds_nothing() -> None:
    run = bnb_fuzz.Run()
    bnb_fuzz.fuzz(run, bnb_fuzz.QUICK_EXAMPLES)
    assert run.outcomes["loaded"] and run.outcomes["refused"]
    assert not run.findings, "\n".join(
        f"{outcome.finding}: {mutation}: {outcome.message}"
        for mutation, outcome in run.findings
    )


class WritesMarker:
    """Unpickling this calls `Path.touch` on the marker: code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickle_payload_in_bin_checkpoint_is_not_executed(tmp_path: Path) -> None:
    source = bnb_fuzz.fixture("llama-bnb-nf4")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source.path / name, tmp_path / name)
    marker = tmp_path / "payload-ran"
    state_dict: dict[str, object] = dict(source.tensors)
    state_dict["model.layers.0.mlp.up_proj.weight.absmax"] = WritesMarker(marker)
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    # The loader must pick the .bin file: no safetensors beside it.
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]

    outcome = bnb_fuzz.load_directory(tmp_path, {}, (str(tmp_path),))

    assert not marker.exists()
    assert outcome.status == "refused", outcome
    assert "cannot be read" in outcome.message
    assert "weights_only" in outcome.message or "Weights only" in outcome.message
