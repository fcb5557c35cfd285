# SPDX-License-Identifier: Apache-2.0
"""A candidate 4-bit matmul for many tokens, kept beside its benchmark until
a GPU run shows whether it beats the plugin's decode + cuBLAS.

Beyond 128 tokens the plugin decodes a layer's whole weight to bfloat16 and
cuBLAS multiplies it (`triton_4bit.matmul`): the decoded weight, four times
the packed bytes, is written to HBM and read back, which puts 256 tokens at
1.86x bf16's time on an H200. Here the weight is decoded a chunk of rows at
a time into one reused buffer small enough to stay in the L2 cache, and
each chunk is multiplied while it is there, into its columns of the output:
HBM then carries the packed weight, not the decoded one. The price is two
launches per chunk. The weights are `triton_4bit.dequantize`'s, so the
product is the plugin's bit for bit.

`benchmarks/gpu_4bit.py` times it (its `chunked` column, from 129 tokens);
`tests/plugins/bitsandbytes/triton_4bit_checks.py` checks it.
"""

import torch

from vllm.plugins.bitsandbytes import triton_4bit
from vllm.plugins.bitsandbytes.triton_4bit import MergedWeight

# Bytes of decoded weight per chunk: a fraction of an H100/H200's 50-60 MB
# L2, so that a chunk is still there when cuBLAS reads it.
CHUNK_BYTES = 16 << 20


def matmul(
    x: torch.Tensor,
    weight: MergedWeight,
    out: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """x (M, K) bfloat16 times the merged weight transposed, into `out`
    (M, N) bfloat16 if given, `chunk_bytes` of decoded weight at a time."""
    state = weight.state
    rows, columns = state.shape
    if out is None:
        out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16, device=x.device)
    # Whole blocks per chunk: a chunk's rows are contiguous packed bytes and
    # absmax, as `dequantize` reads them.
    chunk_rows = max(1, chunk_bytes // (2 * columns))
    buffer = torch.empty(
        min(chunk_rows, rows), columns, dtype=torch.bfloat16, device=x.device
    )
    blocks_per_row = columns // state.blocksize
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        decoded = triton_4bit.dequantize(
            weight.packed[start:stop],
            state.absmax[start * blocks_per_row : stop * blocks_per_row],
            weight.table,
            state.blocksize,
            out=buffer[: stop - start],
        )
        torch.mm(x, decoded.t(), out=out[:, start:stop])
    return out
