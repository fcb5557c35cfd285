# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""What every stream of a bitsandbytes load shares.

A stream (`online` for unquantized checkpoints, `checkpoint` for
pre-quantized ones) yields `(checkpoint name, tensor)` pairs for the model's
own `load_weights`, and records, under vLLM's unstacked tensor name, the
state bitsandbytes needs to use each quantized weight: a `QuantState` for
4-bit, the per-row scales (`SCB`) for LLM.int8(). The loader's `LoadSession`
owns those states and attaches them once the stream is drained.
"""

import pickle
import time
from collections.abc import Iterator

import torch
from safetensors import SafetensorError

from vllm.logger import init_logger
from vllm.plugins.bitsandbytes.checkpoint_files import CheckpointFiles, error_summary
from vllm.plugins.bitsandbytes.config import BitsAndBytesCheckpointError

logger = init_logger(__name__)

CheckpointTensors = Iterator[tuple[str, torch.Tensor]]

PROGRESS_LOG_INTERVAL_S = 30.0


class LoadProgress:
    """Logs how far a long quantizing load has got, at most every interval."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.started = self.last_log = time.perf_counter()

    def step(self) -> None:
        self.count += 1
        now = time.perf_counter()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S:
            logger.info("bitsandbytes: %s %d weights so far", self.what, self.count)
            self.last_log = now

    def done(self) -> None:
        logger.info(
            "bitsandbytes: %s %d weights in %.1f s",
            self.what,
            self.count,
            time.perf_counter() - self.started,
        )


def readable_checkpoint(
    tensors: CheckpointTensors, files: CheckpointFiles
) -> CheckpointTensors:
    """Pass `tensors` through, turning a file that cannot be read into one error.

    Truncated or malformed safetensors files, and `.bin` files that need more
    than plain tensors to unpickle (`torch.load(weights_only=True)` refuses
    them), otherwise surface as the reading library's own exception, which
    does not say which of the checkpoint's files is damaged.
    """
    try:
        yield from tensors
    except (SafetensorError, pickle.UnpicklingError, EOFError, OSError) as err:
        if damaged := files.damaged_file():
            path, problem = damaged
            raise BitsAndBytesCheckpointError(
                f"The weights file {path} {problem}; re-download or re-export "
                "that file."
            ) from err
        raise BitsAndBytesCheckpointError(
            f"A weights file of the checkpoint {files.location} cannot be read "
            f"({error_summary(err)}); re-download or re-export the checkpoint."
        ) from err
