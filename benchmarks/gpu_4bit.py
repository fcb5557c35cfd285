# SPDX-License-Identifier: Apache-2.0
"""bitsandbytes 4-bit linear layers on a GPU: the plugin's CUDA path against
today's bitsandbytes path and bf16.

Usage (on a CUDA machine; needs torch, triton and bitsandbytes, not vLLM)::

    python3 -m benchmarks.gpu_4bit [--quick] [--moe] [--int8] [--sweep] [--out DIR]

Llama-3-8B decoder-layer shapes (q/k/v merged, o, gate/up merged, down),
NF4 with double quantization as QLoRA checkpoints store it, absmax expanded
to float32 once as the plugin does at load time. Per layer and batch, every
call captured in a CUDA graph (as vLLM runs decode) and timed by replaying
it, median of the repetitions, in one run:

- ``plugin``: what the plugin runs on CUDA, `triton_4bit.matmul`: one call
  per merged layer, `fragment_4bit` up to 16 tokens, `wgmma_4bit` within
  `WGMMA_TOKENS` on sm_90, the fused kernel up to `FUSED_TOKENS`, the
  Triton dequantization and cuBLAS otherwise;
- ``fused``: `fused_4bit.matmul`, decoding in registers and multiplying on
  the tensor cores through shared memory, at every batch size;
- ``wgmma``: `wgmma_4bit.matmul`, the Gluon kernel that decodes into the
  register operand of Hopper's warpgroup MMA, for every layer at every
  batch size (sm_90 only, NaN elsewhere);
- ``triton``: the Triton dequantization and cuBLAS at every batch size;
- ``bnb``: today's path in vLLM 0.27.1, vllm-bnb-plugin and the fork's CPU
  path: one bitsandbytes ``matmul_4bit`` per shard;
- ``bnb_merged``: one ``matmul_4bit`` per merged layer;
- ``bf16``: ``torch.nn.functional.linear`` on the unquantized weight (cuBLAS);
- ``limit``: the packed bytes and float32 absmax over the HBM bandwidth.

``--moe`` times the fused-MoE method's GPU path (the routed experts
dequantized per forward) against decoding all experts and bf16 experts, at
Mixtral-8x7B and Qwen3-30B-A3B expert shapes; ``--int8`` times
LLM.int8() against bf16, eagerly (its default threshold cannot be captured)
and, at threshold 0, in a graph. ``--sweep`` times the fragment kernel's
launch configurations (`FRAGMENT_SWEEP`) up to 64 tokens and the fused
kernel's (`FUSED_SWEEP`) from 32 tokens on, against what `matmul` runs.
Writes ``gpu_4bit.json`` and ``gpu_4bit.png``; nothing is asserted.
"""

import argparse
import collections
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from vllm.plugins.bitsandbytes import fragment_4bit, fused_4bit, wgmma_4bit
from vllm.plugins.bitsandbytes import triton_4bit as kernels

# Peak HBM bandwidth by device, from the datasheets: the ceiling of a
# memory-bound GEMV.
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}


def hbm_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    if name not in HBM_BYTES_PER_S:
        raise SystemExit(
            f"no HBM bandwidth known for {name}: add it to HBM_BYTES_PER_S"
        )
    return HBM_BYTES_PER_S[name]


HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
LAYERS = {
    "qkv": (HIDDEN, [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]),
    "o": (HIDDEN, [HIDDEN]),
    "gate_up": (HIDDEN, [INTERMEDIATE, INTERMEDIATE]),
    "down": (INTERMEDIATE, [HIDDEN]),
}
BATCHES = (1, 2, 4, 8, 16, 64, 256)
QUICK_BATCHES = (1, 16, 256)
BLOCKSIZE = 64
# (name, experts, hidden, intermediate, experts per token)
MOE_MODELS = [("Mixtral-8x7B", 8, 4096, 14336, 2), ("Qwen3-30B-A3B", 128, 2048, 768, 8)]


def graph_us(fn, *args, repeats=50, replays=10):
    """Median microseconds of one call `fn(*args)`, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return _median_us(graph.replay, repeats, replays)


def replay_equals_eager(fn, x, *args):
    """Whether `fn(x, *args)` captured in a CUDA graph and replayed on a new
    x gives what an eager call gives."""
    fn(x, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    return bool(torch.equal(captured, fn(x, *args)))


def eager_us(fn, *args, repeats=30, replays=10):
    """Median microseconds of one eager call `fn(*args)`."""
    for _ in range(3):
        fn(*args)
    return _median_us(lambda: fn(*args), repeats, replays)


def _median_us(fn, repeats, replays):
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return statistics.median(times)


def flat_state(state):
    """The state with a double-quantized absmax expanded to float32, as the
    plugin (and 0.27.1, and vllm-bnb-plugin) keep it after loading."""
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    return QuantState(
        absmax=absmax.float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )


class Layer:
    """One merged layer: bf16 shards, their bitsandbytes storage and the
    merged storage the plugin prepares after loading."""

    def __init__(self, columns, shard_rows, quant_type="nf4"):
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        self.shards = [
            torch.randn(rows, columns, dtype=torch.bfloat16, device="cuda") * 0.02
            for rows in shard_rows
        ]
        self.weight_bf16 = torch.cat(self.shards)
        quantized = [
            quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
            for w in self.shards
        ]
        self.packed = [data for data, _ in quantized]
        self.states = [flat_state(state) for _, state in quantized]
        self.rows, self.columns = sum(shard_rows), columns
        self.merged = kernels.merge_shards(
            torch.cat([p.reshape(-1) for p in self.packed]), self.states
        )
        self.dequantized = torch.cat(
            [
                dequantize_4bit(p, s)
                for p, s in zip(self.packed, self.states, strict=True)
            ]
        )
        self.limit_us = (
            (self.merged.packed.numel() + 4 * self.merged.state.absmax.numel())
            / hbm_bytes_per_s()
            * 1e6
        )

    def plugin(self, x):
        return kernels.matmul(x, self.merged)

    def fused(self, x):
        return fused_4bit.matmul(x, self.merged)

    def wgmma(self, x):
        return wgmma_4bit.matmul(x, self.merged)

    def triton(self, x):
        merged = self.merged
        weights = kernels.dequantize(
            merged.packed, merged.state.absmax, merged.table, BLOCKSIZE
        )
        return F.linear(x, weights)

    def bnb_merged(self, x):
        from bitsandbytes import matmul_4bit

        return matmul_4bit(x, self.merged.packed.view(-1, 1).t(), self.merged.state)

    def bnb(self, x, out):
        """Today's path: one matmul_4bit per shard into its columns."""
        from bitsandbytes import matmul_4bit

        column = 0
        for packed, state in zip(self.packed, self.states, strict=True):
            rows = state.shape[0]
            out[:, column : column + rows] = matmul_4bit(x, packed.t(), state)
            column += rows
        return out


def relative_error(out, reference):
    return float((out.float() - reference).norm() / reference.norm())


SIDES = ("plugin", "fused", "wgmma", "triton", "bnb", "bnb_merged", "bf16", "limit")


def _wgmma_columns(layer, x, reference):
    """The ``wgmma`` side's time and error, NaN where it does not run."""
    if not wgmma_4bit.supports(layer.merged, x.device):
        return {"wgmma_us": float("nan"), "wgmma_rel_err": float("nan")}
    return {
        "wgmma_us": graph_us(layer.wgmma, x),
        "wgmma_rel_err": relative_error(layer.wgmma(x), reference),
    }


def measure_layers(layers, batches):
    rows = []
    for name, layer in layers.items():
        for batch in batches:
            x = torch.randn(batch, layer.columns, dtype=torch.bfloat16, device="cuda")
            out = torch.empty(batch, layer.rows, dtype=torch.bfloat16, device="cuda")
            reference = x.float() @ layer.dequantized.float().T
            row = {
                "layer": name,
                "batch": batch,
                "limit_us": layer.limit_us,
                "plugin_us": graph_us(layer.plugin, x),
                "fused_us": graph_us(layer.fused, x),
                "triton_us": graph_us(layer.triton, x),
                "bnb_us": graph_us(layer.bnb, x, out),
                "bnb_merged_us": graph_us(layer.bnb_merged, x),
                "bf16_us": graph_us(F.linear, x, layer.weight_bf16),
                "plugin_rel_err": relative_error(layer.plugin(x), reference),
                "fused_rel_err": relative_error(layer.fused(x), reference),
                **_wgmma_columns(layer, x, reference),
                "triton_rel_err": relative_error(layer.triton(x), reference),
                "bnb_rel_err": relative_error(layer.bnb(x, out), reference),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def decoder_layer_summary(rows):
    """Per batch, the sum over the four layers of one decoder layer."""
    summary = {}
    for row in rows:
        total = summary.setdefault(row["batch"], {"batch": row["batch"]})
        for side in SIDES:
            total[f"{side}_us"] = total.get(f"{side}_us", 0.0) + row[f"{side}_us"]
    return [summary[b] for b in sorted(summary)]


def run_experts(x, used, weights):
    """The experts `used` on every token of x, summed: a stand-in for the
    fused-MoE kernel's work at a fixed routing."""
    out = torch.zeros_like(x)
    for e in used:
        gate, up = F.linear(x, weights["w13"][e]).chunk(2, dim=-1)
        out += F.linear(F.silu(gate) * up, weights["w2"][e])
    return out


def routed_fragment_experts(x, merged, experts_of_pairs, pair_tokens, shapes):
    """The experts' SwiGLU MLP of each (token, expert) pair by
    `fragment_4bit.routed_matmul`, summed per token (router weights left
    out, as in `run_experts`)."""
    pairs = torch.arange(pair_tokens.numel(), device=x.device, dtype=torch.int32)
    gate, up = fragment_4bit.routed_matmul(
        x, merged["w13"], experts_of_pairs, pair_tokens, shapes["w13"][1]
    ).chunk(2, dim=-1)
    out = fragment_4bit.routed_matmul(
        F.silu(gate) * up, merged["w2"], experts_of_pairs, pairs, shapes["w2"][1]
    )
    return out.view(x.shape[0], -1, out.shape[-1]).sum(dim=1)


def measure_moe(batches):
    """The fused-MoE method's GPU path: the experts routed to dequantized by
    the Triton kernel (`compact_routing`), then the experts in bf16, against
    every expert dequantized (bitsandbytes, as today, and Triton, the
    plugin's path before routed decoding) and against bf16 experts. The
    routing is fixed; the expert matmuls are torch calls standing in for
    vLLM's fused-MoE kernel, which needs vLLM. ``fragment_routed``: the
    candidate that multiplies each (token, expert) pair in registers
    (`fragment_4bit.routed_matmul`), never decoding an expert to memory."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    rows = []
    table = kernels.decode_table("nf4", torch.device("cuda"))
    for name, experts, hidden, intermediate, top_k in MOE_MODELS:
        shapes = {
            "w13": (experts, 2 * intermediate, hidden),
            "w2": (experts, hidden, intermediate),
        }
        bf16, fused = {}, {}
        for key, shape in shapes.items():
            bf16[key] = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
            fused[key] = quantize_4bit(bf16[key].view(-1, shape[-1]), quant_type="nf4")
        merged = {
            key: kernels.merge_shards(packed.view(-1), [state])
            for key, (packed, state) in fused.items()
        }

        def dequantize_all_bnb(fused=fused, shapes=shapes):
            return {k: dequantize_4bit(*fused[k]).view(shapes[k]) for k in shapes}

        def dequantize_triton(routing=None, fused=fused, shapes=shapes):
            """All experts, or with `routing` (topk_ids, experts) only the
            routed ones, as the plugin's `apply` does."""
            routed = None
            if routing is not None:
                routed, _ = kernels.compact_routing(*routing)
            decoded = {}
            for k, (_, rows, columns) in shapes.items():
                packed, state = fused[k]
                decoded[k] = kernels.dequantize(
                    packed.view(-1, columns // 2),
                    state.absmax,
                    table,
                    BLOCKSIZE,
                    routed,
                    rows,
                ).view(-1, rows, columns)
            return decoded

        for batch in batches:
            x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
            # Each token's top_k distinct experts, and the experts the batch
            # routes to.
            topk_ids = torch.stack(
                [torch.randperm(experts)[:top_k] for _ in range(batch)]
            ).to("cuda", torch.int32)
            used = topk_ids.unique().tolist()
            # The same experts, numbered as the routed decode stores them.
            compact = kernels.compact_routing(topk_ids, experts)[1].unique().tolist()

            def run_routed(x, routing=(topk_ids, experts), compact=compact):
                return run_experts(x, compact, dequantize_triton(routing))

            # Each token times its own experts, one product per (token,
            # expert) pair, as vLLM's fused-MoE kernel computes them.
            pair_tokens = torch.arange(batch, device="cuda", dtype=torch.int32)
            run_fragment = functools.partial(
                routed_fragment_experts,
                merged=merged,
                experts_of_pairs=topk_ids.reshape(-1),
                pair_tokens=pair_tokens.repeat_interleave(top_k),
                shapes=shapes,
            )
            row = {
                "model": name,
                "batch": batch,
                "experts_used": len(used),
                "bnb_dequantize_all_us": graph_us(dequantize_all_bnb, repeats=20),
                "triton_dequantize_all_us": graph_us(dequantize_triton, repeats=20),
                "triton_dequantize_routed_us": graph_us(
                    dequantize_triton, (topk_ids, experts), repeats=20
                ),
                "bnb_today_us": graph_us(
                    lambda x, u, f=dequantize_all_bnb: run_experts(x, u, f()),
                    x,
                    used,
                    repeats=20,
                ),
                "triton_all_us": graph_us(
                    lambda x, u, f=dequantize_triton: run_experts(x, u, f()),
                    x,
                    used,
                    repeats=20,
                ),
                "plugin_us": graph_us(run_routed, x, repeats=20),
                "fragment_routed_us": graph_us(run_fragment, x, repeats=20),
                "bf16_us": graph_us(run_experts, x, used, bf16, repeats=20),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


# The launch configurations `--sweep` times: (rows, warps) per program.
FRAGMENT_SWEEP = [(64, 2), (64, 4), (128, 4), (128, 8), (256, 8)]


# Most tokens the fragment sweep times: beyond, it decodes each weight
# more than four times.
FRAGMENT_SWEEP_TOKENS = 4 * fragment_4bit.TILE_TOKENS
# The fused kernel's: (weight rows, warps) per program, pipeline stages.
FUSED_SWEEP = [
    (shape, stages) for shape in ((64, 4), (128, 4), (128, 8)) for stages in (2, 3, 4)
]


def sweep(kernel, layers, batch, configurations):
    """The decoder layer's time at `batch` tokens with `kernel` under each
    of `configurations` (label: keyword arguments), next to `matmul`'s;
    printed with the fastest."""
    totals = collections.Counter()
    for layer in layers.values():
        x = torch.randn(batch, layer.columns, dtype=torch.bfloat16, device="cuda")
        totals["matmul"] += graph_us(layer.plugin, x)
        for label, options in configurations.items():
            totals[label] += graph_us(
                functools.partial(kernel, weight=layer.merged, **options), x
            )
    best, best_us = min(totals.items(), key=lambda item: item[1])
    print(
        f"{kernel.__module__.rpartition('.')[2]} sweep, {batch} tokens: matmul "
        f"{totals['matmul']:.1f} µs per decoder layer, best {best_us:.1f} ({best})",
        flush=True,
    )
    return {"batch": batch, "us_per_decoder_layer": dict(totals)}


def sweep_fragment(layers, batches):
    """Per token count up to FRAGMENT_SWEEP_TOKENS, each launch
    configuration of the fragment kernel (`FRAGMENT_SWEEP`)."""
    configurations = {
        f"rows={rows} warps={warps}": {"rows_per_program": rows, "num_warps": warps}
        for rows, warps in FRAGMENT_SWEEP
    }
    return [
        sweep(fragment_4bit.matmul, layers, batch, configurations)
        for batch in batches
        if batch <= FRAGMENT_SWEEP_TOKENS
    ]


def sweep_fused(layers, batches):
    """Per token count from 2 * TILE_TOKENS on, each launch configuration
    of the fused kernel (`FUSED_SWEEP`), with `launch_config`'s tokens per
    program and, beyond 128 tokens, all of them in one program."""
    results = []
    for batch in (b for b in batches if b >= 2 * fragment_4bit.TILE_TOKENS):
        tokens = triton.next_power_of_2(batch)
        configurations = {
            f"rows={rows} tokens={block_m} warps={warps} stages={stages}": {
                "rows_per_program": rows,
                "block_m": block_m,
                "num_warps": warps,
                "num_stages": stages,
            }
            for block_m in sorted({min(tokens, 128), min(tokens, 256)})
            for (rows, warps), stages in FUSED_SWEEP
        }
        results.append(sweep(fused_4bit.matmul, layers, batch, configurations))
    return results


def measure_int8(layers, batches):
    """LLM.int8() per merged layer (one weight) against bf16."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_quant

    rows = []
    for name, layer in layers.items():
        weight, scales, _ = int8_vectorwise_quant(layer.weight_bf16.half())
        for batch in batches:
            x = torch.randn(batch, layer.columns, dtype=torch.bfloat16, device="cuda")
            row = {
                "layer": name,
                "batch": batch,
                "bf16_eager_us": eager_us(F.linear, x, layer.weight_bf16),
                "bf16_graph_us": graph_us(F.linear, x, layer.weight_bf16),
            }
            for threshold in (6.0, 0.0):
                state = bnb.MatmulLtState()
                state.CB, state.SCB = weight, scales
                state.threshold = threshold
                state.has_fp16_weights = False
                state.is_training = False

                def int8(x, weight, state):
                    return bnb.matmul(x, weight, state=state)

                row[f"int8_t{threshold:g}_eager_us"] = eager_us(int8, x, weight, state)
                try:
                    row[f"int8_t{threshold:g}_graph_us"] = graph_us(
                        int8, x, weight, state
                    )
                    row[f"int8_t{threshold:g}_replay_equals_eager"] = (
                        replay_equals_eager(int8, x.clone(), weight, state)
                    )
                except Exception as err:
                    row[f"int8_t{threshold:g}_graph_us"] = (
                        f"{type(err).__name__}: {str(err)[:100]}"
                    )
                    torch.cuda.synchronize()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def chart(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(s["batch"]) for s in summary]
    series = [
        ("bnb", "bitsandbytes today (per shard)"),
        ("plugin", "plugin on CUDA (one call per merged layer)"),
        ("fused", "fused Triton kernel"),
        ("wgmma", "warpgroup (Gluon) kernel"),
        ("bf16", "bf16 cuBLAS"),
        ("limit", "HBM limit of the 4-bit bytes"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.14
    for i, (key, label) in enumerate(series):
        ax.bar(
            [j + (i - 2.5) * width for j in range(len(batches))],
            [s[f"{key}_us"] for s in summary],
            width,
            label=label,
        )
    ax.set_xticks(range(len(batches)), batches)
    ax.set_xlabel("batch (tokens)")
    ax.set_ylabel("µs per Llama-3-8B decoder layer (linears)")
    ax.set_title(f"NF4 linears on {torch.cuda.get_device_name()}, CUDA graphs, medians")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 16, 256")
    parser.add_argument("--moe", action="store_true", help="fused-MoE expert shapes")
    parser.add_argument("--int8", action="store_true", help="LLM.int8() against bf16")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="launch configurations of fragment_4bit and fused_4bit",
    )
    parser.add_argument("--out", type=Path, default=Path("build/benchmarks"))
    parser.add_argument("--batches", type=int, nargs="*", help="instead of the default")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.time()
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    layers = {name: Layer(columns, rows) for name, (columns, rows) in LAYERS.items()}
    import bitsandbytes

    report = {
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "hbm_bytes_per_s": hbm_bytes_per_s(),
        "fused_tokens": kernels.FUSED_TOKENS,
        "layers": measure_layers(layers, batches),
    }
    report["decoder_layer"] = decoder_layer_summary(report["layers"])
    if args.int8:
        report["int8"] = measure_int8(layers, batches)
    if args.sweep:
        report["fragment_sweep"] = sweep_fragment(layers, batches)
        report["fused_sweep"] = sweep_fused(layers, batches)
    del layers
    torch.cuda.empty_cache()
    if args.moe:
        report["moe"] = measure_moe((1, 16))
    report["wall_s"] = time.time() - started
    (args.out / "gpu_4bit.json").write_text(json.dumps(report, indent=1))
    print(
        "\nµs per decoder layer | "
        + " | ".join(SIDES)
        + " | plugin/bnb | plugin/bf16 | fused/bf16 | fused/limit | wgmma/bf16"
    )
    for total in report["decoder_layer"]:
        cells = " | ".join(f"{total[f'{side}_us']:.1f}" for side in SIDES)
        print(
            f"batch {total['batch']:3d} | {cells} | "
            f"{total['plugin_us'] / total['bnb_us']:.2f} | "
            f"{total['plugin_us'] / total['bf16_us']:.2f} | "
            f"{total['fused_us'] / total['bf16_us']:.2f} | "
            f"{total['fused_us'] / total['limit_us']:.2f} | "
            f"{total['wgmma_us'] / total['bf16_us']:.2f}"
        )
    try:
        chart(report["decoder_layer"], args.out / "gpu_4bit.png")
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
    print(f"wrote {args.out}/gpu_4bit.{{json,png}} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
