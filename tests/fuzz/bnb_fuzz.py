# SPDX-License-Identifier: Apache-2.0
"""Fuzz the bitsandbytes plugin with malformed checkpoints and configs.

Each case copies one of the tiny pre-quantized fixtures, breaks one thing
(a quant_state JSON field, a state or weight tensor, the safetensors header,
config.json's `quantization_config`) or writes an unquantized checkpoint
whose shapes do not divide bitsandbytes' blocks, and loads it in this process
through the real engine config and the plugin's model loader, without an
engine. The oracle: the case loads and every bitsandbytes layer computes
finite outputs of the right shape, or it is refused with one line that names
what is wrong (the plugin's `BitsAndBytesCheckpointError`, or a vLLM config
`ValueError` before any weight is read). Anything else is a finding.

    python -m tests.fuzz.bnb_fuzz            # quick: the CI run
    python -m tests.fuzz.bnb_fuzz --full     # >= 1,000 cases
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from safetensors.torch import load_file, save  # noqa: E402

from tests.fixtures.checkpoints import get_checkpoint  # noqa: E402

PREQUANTIZED = ("llama-bnb-nf4", "llama-bnb-fp4", "llama-bnb-nf4-dq", "llama-bnb-int8")
UNQUANTIZED = "llama"
WEIGHTS_FILE = "model.safetensors"
QUICK_EXAMPLES = 100
FULL_EXAMPLES = 1000
# A load of the tiny model takes well under a second; a case that runs this
# long is stuck.
CASE_TIMEOUT_S = 120
BLOCK_SIZES = (0, 1, 3, 32, 63, 64, 65, 100, 128, 4096, -64)
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-4, 600), max_size=4),
    st.sampled_from(BLOCK_SIZES),
    st.sampled_from(("nf4", "fp4", "int4", "float16", "bfloat16", "uint8", "")),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
TENSOR_EDITS = st.one_of(
    st.tuples(st.just("drop")),
    st.tuples(st.sampled_from(("truncate", "extend")), st.integers(1, 4096)),
    st.tuples(
        st.just("dtype"),
        st.sampled_from(("float32", "float16", "bfloat16", "int8", "uint8", "int32")),
    ),
    st.tuples(st.just("nonfinite"), st.sampled_from(("nan", "inf", "-inf"))),
    st.tuples(st.just("reshape"), st.sampled_from(("2d", "scalar", "empty"))),
)
HEADER_EDITS = st.one_of(
    st.tuples(
        st.just("length"),
        st.sampled_from((0, 1, 7, 2**31, 2**63, -1)),
    ),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
    st.tuples(st.sampled_from(("overlap", "past_end", "swap_offsets"))),
    st.tuples(st.just("dtype"), st.sampled_from(("F64", "I8", "U8", "BOGUS"))),
    st.tuples(st.just("shape"), st.lists(st.integers(-1, 70000), max_size=3)),
)


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One way to break a checkpoint: what, where, and with which value."""

    fixture: str
    kind: str
    target: str
    edit: Any

    def mentions(self) -> tuple[str, ...]:
        """Names one of which a refusal of this case must state."""
        if self.kind == "config":
            return (str(self.edit[1]), "quantization_config")
        if self.kind == "inflight":
            return ("",)
        # A merged layer (qkv_proj) is named for its parts (q_proj, ...).
        module = _module_of(self.target)
        return (WEIGHTS_FILE, module, module.rpartition(".")[0])


@dataclasses.dataclass
class Outcome:
    """How one case ended; `finding` is set when the oracle rejects it."""

    status: str  # "loaded", "refused" or "finding"
    message: str = ""
    finding: str | None = None


@dataclasses.dataclass(frozen=True)
class Fixture:
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]


@cache
def fixture(name: str) -> Fixture:
    path = get_checkpoint(name)
    config = json.loads((path / "config.json").read_text())
    return Fixture(path, load_file(path / WEIGHTS_FILE), config)


def _packed_states(name: str) -> list[str]:
    return sorted(k for k in fixture(name).tensors if "quant_state.bitsandbytes__" in k)


def _quantization_tensors(name: str) -> list[str]:
    """Quantized weights and their state tensors, the plugin's own input."""
    tensors = fixture(name).tensors
    owners = {_module_of(k) for k in tensors if k.endswith(("absmax", "SCB"))}
    return sorted(k for k in tensors if _module_of(k) in owners)


def _module_of(tensor_name: str) -> str:
    """The layer a weight or state tensor belongs to."""
    return tensor_name.split(".weight")[0].removesuffix(".SCB")


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    """A random single mutation of a random fixture."""
    kind = draw(
        st.sampled_from(
            ("state_field", "state_bytes", "state_key", "tensor", "header", "config")
            + ("inflight",)
        )
    )
    if kind == "inflight":
        head_dim = draw(st.sampled_from((32, 48, 50, 64, 80)))
        intermediate = draw(st.integers(1, 700))
        return Mutation(UNQUANTIZED, kind, "", (head_dim, intermediate))
    if kind.startswith("state_"):
        name = draw(st.sampled_from(PREQUANTIZED[:3]))
        target = draw(st.sampled_from(_packed_states(name)))
    else:
        name = draw(st.sampled_from(PREQUANTIZED))
        target = draw(st.sampled_from(_quantization_tensors(name)))
    if kind == "state_field":
        fields = sorted(json.loads(_state_bytes(name, target))) + ["extra"]
        edit = draw(
            st.one_of(
                st.tuples(st.just("drop"), st.sampled_from(fields)),
                st.tuples(st.just("set"), st.sampled_from(fields), JSON_VALUES),
            )
        )
    elif kind == "state_bytes":
        edit = draw(
            st.one_of(
                st.tuples(st.just("truncate"), st.integers(0, 200)),
                st.tuples(st.just("replace"), st.binary(max_size=40)),
                st.tuples(
                    st.just("replace"),
                    st.sampled_from((b"[1, 2]", b"null", b'"nf4"', b"{}", b"1e999")),
                ),
            )
        )
    elif kind == "state_key":
        edit = draw(
            st.one_of(
                st.tuples(st.just("drop")),
                st.tuples(
                    st.sampled_from(("rename", "duplicate")),
                    st.sampled_from(("nf4", "fp4", "int4", "", "NF4")),
                ),
            )
        )
    elif kind == "tensor":
        edit = draw(TENSOR_EDITS)
    elif kind == "header":
        edit = draw(HEADER_EDITS)
    else:
        # `quant_method` stays: without it the checkpoint is no longer one of
        # bitsandbytes and the plugin is not involved.
        fields = sorted(
            set(fixture(name).config["quantization_config"]) - {"quant_method"}
        )
        edit = draw(
            st.one_of(
                st.tuples(st.just("drop"), st.sampled_from(fields)),
                st.tuples(
                    st.just("set"), st.sampled_from(fields + ["extra"]), JSON_VALUES
                ),
            )
        )
    return Mutation(name, kind, target, edit)


def _state_bytes(name: str, key: str) -> bytes:
    return bytes(fixture(name).tensors[key].tolist())


def _edit_json(blob: bytes, edit: tuple) -> bytes:
    fields = json.loads(blob)
    if edit[0] == "drop":
        fields.pop(edit[1], None)
    else:
        fields[edit[1]] = edit[2]
    return json.dumps(fields).encode()


def _as_tensor(blob: bytes) -> torch.Tensor:
    return torch.tensor(list(blob), dtype=torch.uint8)


def _edit_tensor(tensor: torch.Tensor, edit: tuple) -> torch.Tensor | None:
    op = edit[0]
    flat = tensor.reshape(-1)
    if op == "drop":
        return None
    if op in ("truncate", "extend"):
        # Whole rows, so a matrix stays a matrix.
        rows = tensor if tensor.dim() else flat
        count = edit[1] % rows.shape[0] or 1 if rows.shape[0] else 0
        if op == "truncate":
            return rows[: rows.shape[0] - count]
        return torch.cat([rows, rows[:count]])
    if op == "dtype":
        return tensor.to(getattr(torch, edit[1]))
    if op == "nonfinite":
        changed = flat.float().clone()
        changed[changed.numel() // 2] = float(edit[1])
        return changed.reshape(tensor.shape)
    if edit[1] == "2d":
        return flat.reshape(1, -1)
    if edit[1] == "scalar":
        return flat[0].clone()
    return flat[:0]


def _edit_tensors(mutation: Mutation) -> dict[str, torch.Tensor]:
    tensors = dict(fixture(mutation.fixture).tensors)
    key, edit = mutation.target, mutation.edit
    if mutation.kind == "state_field":
        tensors[key] = _as_tensor(_edit_json(_state_bytes(mutation.fixture, key), edit))
    elif mutation.kind == "state_bytes":
        blob = _state_bytes(mutation.fixture, key)
        blob = blob[: edit[1]] if edit[0] == "truncate" else edit[1]
        tensors[key] = _as_tensor(blob)
    elif mutation.kind == "state_key":
        state = tensors.pop(key)
        stem = key.rsplit("__", 1)[0]
        if edit[0] == "rename":
            tensors[f"{stem}__{edit[1]}"] = state
        elif edit[0] == "duplicate":
            tensors[key] = state
            tensors.setdefault(f"{stem}__{edit[1]}", state.clone())
    elif mutation.kind == "tensor":
        changed = _edit_tensor(tensors.pop(key), edit)
        if changed is not None:
            tensors[key] = changed
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def _encode(header: dict, body: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + body


def _edit_header(data: bytes, target: str, edit: tuple) -> bytes:
    """Break the safetensors framing: header length, JSON, offsets, dtypes."""
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    op = edit[0]
    if op == "length":
        return (edit[1] % 2**64).to_bytes(8, "little") + data[8:]
    if op == "truncate":
        return data[: int(len(data) * edit[1])]
    if op == "garbage":
        return data[:8] + edit[1] + data[8 + len(edit[1]) :]
    entry = header[target]
    others = [k for k in header if k not in (target, "__metadata__")]
    if op == "overlap":
        entry["data_offsets"] = list(header[others[0]]["data_offsets"])
    elif op == "past_end":
        entry["data_offsets"][1] += 4096
    elif op == "swap_offsets":
        entry["data_offsets"].reverse()
    elif op == "dtype":
        entry["dtype"] = edit[1]
    else:
        entry["shape"] = edit[1]
    return _encode(header, body)


def _inflight_checkpoint(directory: Path, head_dim: int, intermediate: int) -> None:
    """An unquantized Llama whose layer sizes need not divide the blocks."""
    base = fixture(UNQUANTIZED)
    config = dict(base.config)
    hidden = head_dim * config["num_attention_heads"]
    kv = head_dim * config["num_key_value_heads"]
    config.update(hidden_size=hidden, head_dim=head_dim, intermediate_size=intermediate)
    generator = torch.Generator().manual_seed(head_dim * 1000 + intermediate)
    shapes = {"lm_head.weight": (config["vocab_size"], hidden)}
    shapes["model.embed_tokens.weight"] = (config["vocab_size"], hidden)
    shapes["model.norm.weight"] = (hidden,)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
        for proj, rows in (("q", hidden), ("k", kv), ("v", kv), ("o", hidden)):
            shapes[f"{prefix}self_attn.{proj}_proj.weight"] = (rows, hidden)
        shapes[f"{prefix}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}mlp.down_proj.weight"] = (hidden, intermediate)
    tensors = {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / WEIGHTS_FILE).write_bytes(save(tensors))


def write_case(mutation: Mutation, directory: Path) -> dict[str, Any]:
    """Write the mutated checkpoint; returns the EngineArgs keywords to load it."""
    base = fixture(mutation.fixture)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base.path / extra, directory / extra)
    if mutation.kind == "inflight":
        _inflight_checkpoint(directory, *mutation.edit)
        return {"quantization": "bitsandbytes"}
    config = json.loads(json.dumps(base.config))
    if mutation.kind == "config":
        op, field, *value = mutation.edit
        if op == "drop":
            config["quantization_config"].pop(field, None)
        else:
            config["quantization_config"][field] = value[0]
    (directory / "config.json").write_text(json.dumps(config))
    data = save(_edit_tensors(mutation))
    if mutation.kind == "header":
        data = _edit_header(data, mutation.target, mutation.edit)
    (directory / WEIGHTS_FILE).write_bytes(data)
    return {}


class CaseTimeout(Exception):
    """A case ran past `CASE_TIMEOUT_S`: a hang."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_distributed_ready = False


def _init_distributed() -> None:
    """One single-rank gloo group for the whole process, as vLLM's tests do."""
    global _distributed_ready
    if _distributed_ready:
        return
    from tests.engine_driver import init_distributed

    init_file = Path(tempfile.mkdtemp(prefix="bnb-fuzz-dist-")) / "init"
    init_distributed(1, 0, f"file://{init_file}")
    _distributed_ready = True


def _forward_every_bnb_layer(model: torch.nn.Module) -> str | None:
    """Run each bitsandbytes layer once; a problem found, else None.

    A full model forward needs an engine's attention metadata; the layers
    are where a bad quant state would surface.
    """
    from vllm.plugins.bitsandbytes.linear import BitsAndBytesLinearMethod

    generator = torch.Generator().manual_seed(0)
    ran = 0
    for name, module in model.named_modules():
        if not isinstance(
            getattr(module, "quant_method", None), BitsAndBytesLinearMethod
        ):
            continue
        x = torch.randn(3, module.input_size_per_partition, generator=generator)
        out = module.quant_method.apply(module, x.to(torch.bfloat16))
        rows = module.output_size_per_partition
        if tuple(out.shape) != (3, rows):
            return f"{name} computed shape {tuple(out.shape)}, not {(3, rows)}"
        if not torch.isfinite(out).all():
            return f"{name} computed non-finite values: loaded with garbage"
        ran += 1
    return None if ran else "no bitsandbytes layer was loaded"


def _judge_refusal(error: BaseException, mentions: tuple[str, ...]) -> Outcome:
    """A refusal must be one line naming what is wrong.

    vLLM reports a config error as a pydantic `ValidationError` around the
    `ValueError` raised; the user reads that inner message.
    """
    if isinstance(error, ValidationError):
        message = "\n".join(str(detail["msg"]) for detail in error.errors()).strip()
    else:
        message = str(error).strip()
    if "\n" in message or not message:
        return Outcome("finding", message, "refusal is not one line")
    if not any(name in message for name in mentions):
        return Outcome("finding", message, f"refusal names none of {mentions}")
    return Outcome("refused", message)


def load_directory(
    directory: Path, engine_kwargs: dict[str, Any], mentions: tuple[str, ...]
) -> Outcome:
    """Load a checkpoint directory in this process and judge the outcome.

    A refusal must name one of `mentions`.
    """
    # What the CPU worker does on import: torch.accelerator calls are no-ops
    # on a machine without an accelerator.
    import vllm.v1.worker.cpu.shm  # noqa: F401
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins.bitsandbytes.config import BitsAndBytesCheckpointError

    stage = "config"
    # Loading sets the model's dtype as torch's default; later cases and
    # tests must not inherit it.
    default_dtype = torch.get_default_dtype()
    try:
        with time_limit(CASE_TIMEOUT_S):
            config = EngineArgs(
                model=str(directory),
                enforce_eager=True,
                max_model_len=256,
                **engine_kwargs,
            ).create_engine_config()
            stage = "load"
            with set_current_vllm_config(config):
                _init_distributed()
                model = get_model_loader(config.load_config).load_model(
                    vllm_config=config, model_config=config.model_config
                )
                stage = "forward"
                problem = _forward_every_bnb_layer(model)
    except BitsAndBytesCheckpointError as error:
        return _judge_refusal(error, mentions)
    except ValueError as error:
        if stage == "config":
            return _judge_refusal(error, mentions)
        return Outcome("finding", str(error), f"{type(error).__name__} at {stage}")
    except Exception as error:  # the oracle classifies every failure
        return Outcome("finding", str(error), f"{type(error).__name__} at {stage}")
    finally:
        torch.set_default_dtype(default_dtype)
    if problem:
        return Outcome("finding", problem, "loaded but broken at first forward")
    return Outcome("loaded")


def load_case(mutation: Mutation) -> Outcome:
    """Write one mutated checkpoint, load it in this process and judge it."""
    with tempfile.TemporaryDirectory(prefix="bnb-fuzz-") as tmp:
        engine_kwargs = write_case(mutation, Path(tmp))
        # A file that cannot be read is named by its checkpoint directory.
        mentions = mutation.mentions() + ((tmp,) if mutation.kind == "header" else ())
        return load_directory(Path(tmp), engine_kwargs, mentions)


# Cases every run includes, whatever hypothesis draws.
NAMED_CASES = (
    Mutation("llama-bnb-nf4", "config", "", ("set", "load_in_8bit", True)),
    Mutation("llama-bnb-nf4", "config", "", ("set", "load_in_4bit", False)),
    Mutation("llama-bnb-int8", "config", "", ("set", "load_in_4bit", True)),
    Mutation("llama-bnb-nf4", "config", "", ("set", "bnb_4bit_quant_type", "int4")),
    Mutation("llama-bnb-fp4", "config", "", ("set", "bnb_4bit_quant_type", "nf4")),
    Mutation(
        "llama-bnb-nf4",
        "state_field",
        "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
        ("set", "blocksize", 0),
    ),
    Mutation(
        "llama-bnb-nf4-dq",
        "state_field",
        "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
        ("set", "blocksize", 63),
    ),
    Mutation(
        "llama-bnb-fp4",
        "tensor",
        "model.layers.1.self_attn.q_proj.weight.absmax",
        ("nonfinite", "nan"),
    ),
    Mutation(
        "llama-bnb-nf4",
        "tensor",
        "model.layers.0.mlp.down_proj.weight",
        ("truncate", 64),
    ),
    Mutation(
        "llama-bnb-int8",
        "tensor",
        "model.layers.0.mlp.up_proj.SCB",
        ("nonfinite", "inf"),
    ),
    Mutation(
        "llama-bnb-nf4", "header", "model.layers.0.mlp.up_proj.weight", ("overlap",)
    ),
    Mutation("llama-bnb-int8", "header", "", ("truncate", 0.5)),
    Mutation(UNQUANTIZED, "inflight", "", (50, 97)),
)


class Run:
    """Outcomes of one fuzz run, and the findings among them."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.findings: list[tuple[Mutation, Outcome]] = []

    def check(self, mutation: Mutation) -> Outcome:
        outcome = load_case(mutation)
        self.outcomes[outcome.status] += 1
        if outcome.finding:
            self.findings.append((mutation, outcome))
        return outcome


def fuzz(run: Run, examples: int) -> None:
    """Feed `examples` derandomized mutations (and the named cases) to `run`."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutations())
    def case(mutation: Mutation) -> None:
        run.check(mutation)

    for named in NAMED_CASES:
        case = example(named)(case)
    case()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"{FULL_EXAMPLES} cases")
    parser.add_argument("--examples", type=int, help="override the number of cases")
    args = parser.parse_args(argv)
    examples = args.examples or (FULL_EXAMPLES if args.full else QUICK_EXAMPLES)
    run = Run()
    started = time.perf_counter()
    fuzz(run, examples)
    total = sum(run.outcomes.values())
    print(
        f"{total} cases in {time.perf_counter() - started:.0f} s: "
        + ", ".join(
            f"{count} {status}" for status, count in sorted(run.outcomes.items())
        )
    )
    for mutation, outcome in run.findings:
        print(f"FINDING {outcome.finding}: {mutation}\n    {outcome.message[:300]}")
    return 1 if run.findings else 0


if __name__ == "__main__":
    sys.exit(main())
