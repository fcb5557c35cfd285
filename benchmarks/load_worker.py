# SPDX-License-Identifier: Apache-2.0
"""Subprocess side of ``benchmarks.load_time``: load models on one vLLM tree.

Usage::

    python load_worker.py serve RESPONSE_FD
    python load_worker.py generate MODEL_DIR OUT.json

``serve`` is a zygote. Being a fresh process, it first times ``import vllm``,
the engine arguments and ``vllm.plugins.load_general_plugins()`` (the plugin
registration cost), then answers each JSON request line on stdin by forking
a child that loads one model through the model loader and reports the
loader's time and the child's peak RSS. Forking gives every load its own
process (its own peak RSS, nothing left over from an earlier load) without
paying the 10-20 s vllm import per load. Answers go to ``RESPONSE_FD`` as
JSON lines, because vLLM logs to stdout.

``generate`` starts the real engine and greedily generates once, timing the
start: the end-to-end check of the default benchmark run, and the engine
start-up measurement of the full run.

Like ``tests/oracle/run_case.py`` this file imports nothing but stdlib,
torch, vllm and ``tests/engine_driver.py`` (itself stdlib + torch + vllm), so
it runs under whichever vllm the interpreter resolves: the installed fork, or
a pristine tree through ``PYTHONPATH`` (0.32.0 with ``vllm-bnb-plugin`` next
to it, or 0.27.1).
"""

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import IO, Any

# tests/, for engine_driver; appended, so it cannot shadow the vllm under test.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
import engine_driver  # noqa: E402

GENERATE_PROMPT = "The quick brown fox"
GENERATE_TOKENS = 16


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """The resident set now (``VmRSS``), for the steady state after a load."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_once(model: str, quantization: str | None) -> dict[str, Any]:
    """Load ``model`` through vLLM's model loader; time the loader only."""
    from vllm.model_executor.model_loader import get_model_loader

    config = engine_driver.bare_load_config(model, quantization)
    with engine_driver.worker_context(config):
        loader = get_model_loader(config.load_config)
        rss_before = _peak_rss_mib()
        modules_before = len(sys.modules)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        loaded = loader.load_model(vllm_config=config, model_config=config.model_config)
        wall_s = time.perf_counter() - wall_start
        cpu_s = time.process_time() - cpu_start
        rss_after = _rss_mib()
    tensors = [*loaded.parameters(), *loaded.buffers()]
    return {
        "load_s": wall_s,
        "load_cpu_s": cpu_s,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_before_load_mib": rss_before,
        # Steady state: what stays resident once load_model has returned.
        "rss_after_load_mib": rss_after,
        # Lazy imports inside the timed region (model class, quant method).
        "modules_imported_during_load": len(sys.modules) - modules_before,
        "model_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "load_format": str(config.load_config.load_format),
        "quantization": config.model_config.quantization,
    }


def _in_child(request: dict[str, Any]) -> dict[str, Any]:
    """Run ``load_once`` in a forked child; its failures become data."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            result = load_once(**request)
        except Exception as exc:  # recorded in the table, not raised
            # One line: pydantic puts the reason after a header line.
            message = " ".join(line.strip() for line in str(exc).splitlines())
            result = {"error": f"{type(exc).__name__}: {message[:300]}"}
        with os.fdopen(write_fd, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"LoadDied: the load process died (wait status {status})"}
    return json.loads(text)


def serve(responses: IO[str]) -> None:
    """Report registration cost, then one forked load per request line."""
    start = time.perf_counter()
    import vllm

    imported = time.perf_counter()
    # vLLM registers plugins from the engine arguments, the engine core and
    # the workers, all of which have imported the configs and quantization
    # registry by then; the engine arguments are the first, in every process.
    import vllm.engine.arg_utils  # noqa: F401

    engine_args_imported = time.perf_counter()
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    registered = time.perf_counter()
    # What every CPU engine worker has done before it loads a model: import
    # the model runner and turn torch.accelerator calls into no-ops. Without
    # that, a bare loader call fails on a host without an accelerator: 0.32.0's
    # BaseModelLoader.load_model empties the accelerator cache on every load,
    # 0.27.1's BNB loader does. 0.27.1 and 0.32.0 both have the function.
    # Done once here, untimed, so the children fork from an identical state
    # on every side; bitsandbytes too, which each side imports at a different
    # moment (config, layer or loader).
    import bitsandbytes  # noqa: F401

    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()
    # The loaders the loads use: 0.27.1 imports its bitsandbytes loader with
    # the model-loader package, vllm-bnb-plugin registers its own during
    # load_general_plugins(), the fork's plugin imports it on the format's
    # first use. A side without one fails only the loads that need it, each
    # with the loader's own error.
    missing_loaders: dict[str, str] = {}
    for load_format in ("auto", "bitsandbytes"):
        try:
            get_model_loader(LoadConfig(load_format=load_format))
        except ValueError as exc:
            missing_loaders[load_format] = str(exc)
    ready = time.perf_counter()

    def respond(message: dict[str, Any]) -> None:
        responses.write(json.dumps(message) + "\n")
        responses.flush()

    respond(
        {
            "import_s": imported - start,
            "engine_args_s": engine_args_imported - imported,
            "plugins_s": registered - engine_args_imported,
            # Modules any load imports anyway; registration may have pulled
            # some of them in already.
            "loader_imports_s": ready - registered,
            "version": vllm.__version__,
            "file": vllm.__file__,
            "missing_loaders": missing_loaders,
        }
    )
    for line in sys.stdin:
        respond(_in_child(json.loads(line)))


def generate(model: str) -> dict[str, Any]:
    """Greedy generation through the real engine, timing its start."""
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(model=model, enforce_eager=True, max_model_len=256, seed=0)
    ready = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=GENERATE_TOKENS)
    (output,) = llm.generate([GENERATE_PROMPT], params)
    return {
        "prompt": GENERATE_PROMPT,
        "token_ids": list(output.outputs[0].token_ids),
        "text": output.outputs[0].text,
        # From the first vllm import until LLM() returns, engine core and its
        # worker process started (each registers the plugins), model loaded.
        "import_s": imported - start,
        "engine_start_s": ready - imported,
    }


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "serve":
        with os.fdopen(int(args[0]), "w") as responses:
            serve(responses)
    elif command == "generate":
        model, out = args
        engine_driver.write_json_atomic(out, generate(model))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
