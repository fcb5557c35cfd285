# SPDX-License-Identifier: Apache-2.0
"""What the scripts that drive vLLM in a subprocess share.

``tests/oracle/run_case.py``, ``tests/plugins/bitsandbytes/bnb_engine_probe.py``
and ``tests/plugins/toy_int8_engine.py`` start the real engine (``engine``);
``tests/zero_cost_probe.py`` and ``benchmarks/load_worker.py`` load models
outside it (``bare_load_config``, ``worker_context``, ``init_distributed``).

Several of them run under whichever ``vllm`` the interpreter resolves
(pristine 0.32.0 or 0.27.1 first on ``PYTHONPATH``, the installed fork, a
perturbed tree), and so does this module: it uses only the stdlib, torch and
API that vLLM 0.27.1 and 0.32.0 share, imported inside the functions so that
``set_env_defaults`` can run first. The scripts must not put the repository
root on ``sys.path`` to import it: the root's ``vllm/`` (the fork's overlay)
would shadow the tree under test. Each one appends this file's directory,
``tests/``, which holds no ``vllm``, to the end of ``sys.path``::

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/
    import engine_driver  # noqa: E402

The oracle's cache key hashes this file together with ``run_case.py``.
"""

import json
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# The harness sets these too (``tests.oracle.harness.ENGINE_ENV``); the
# defaults make a manual run behave the same.
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # collective_rpc ships the scripts' worker functions by pickle.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def set_env_defaults() -> None:
    """Fill in ``ENV_DEFAULTS`` the caller left unset; call before vllm loads."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


class Engine:
    """A running ``vllm.LLM`` that only ``engine`` holds a reference to.

    Callers reach the LLM through these methods, so when ``engine`` drops its
    reference the LLM (and, at TP > 1, its worker processes) is collected by
    the teardown, before the next engine starts.
    """

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    @property
    def vllm_config(self) -> Any:
        return self._llm.llm_engine.vllm_config

    def per_rank(self, fn: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
        """``fn(worker)`` in every TP worker, by rank (``fn`` returns ``rank``).

        Define ``fn`` in the script that runs: cloudpickle ships functions of
        ``__main__`` by value, so TP > 1 workers need not import anything.
        """
        return sorted(self._llm.collective_rpc(fn), key=lambda result: result["rank"])

    def generate_greedy(
        self, prompts: list[list[int]], max_tokens: int, logprobs: int | None = None
    ) -> list[Any]:
        """``RequestOutput``s of greedy decoding, exactly ``max_tokens`` each.

        Prompts are token ids, so no tokenizer is needed.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True
        )
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        return self._llm.generate(inputs, params, use_tqdm=False)

    def greedy_token_ids(
        self, prompts: list[list[int]], max_tokens: int
    ) -> list[list[int]]:
        """The generated token ids of ``generate_greedy``, per prompt."""
        outputs = self.generate_greedy(prompts, max_tokens)
        return [list(output.outputs[0].token_ids) for output in outputs]


@contextmanager
def engine(model: str, llm_kwargs: dict[str, Any]) -> Iterator[Engine]:
    """Start ``LLM(model=model, **llm_kwargs)``; tear it all down on exit.

    Exit leaves the process as a fresh one for the next engine: the
    in-process engine core keeps the distributed groups (e.g. no EP group
    for a MoE model after a dense one) unless they are destroyed. On an
    error, the traceback's finished frames (``LLM.__init__``, ``generate``)
    are cleared first, as they hold the engine too.
    """
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    running = Engine(None)
    try:
        running._llm = LLM(model=model, **llm_kwargs)
        yield running
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        running._llm = None
        cleanup_dist_env_and_memory()


def init_distributed(world_size: int, rank: int, init_method: str) -> None:
    """A real gloo TP group of ``world_size`` ranks, as vLLM's own tests do.

    Layers built under it shard as in that rank's worker, with no rank lookup
    patched.
    """
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    init_distributed_environment(
        world_size=world_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=init_method,
        backend="gloo",
    )
    ensure_model_parallel_initialized(world_size, 1)


def bare_load_config(model: str, quantization: str | None = None) -> Any:
    """The ``VllmConfig`` of an eager engine with a 256-token context.

    For loads through the model loader alone, outside any engine.
    """
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=model, quantization=quantization, enforce_eager=True, max_model_len=256
    ).create_engine_config()


@contextmanager
def worker_context(config: Any) -> Iterator[None]:
    """What a one-rank worker has in place when it loads a model.

    ``config`` is the current vLLM config and a one-rank gloo group exists;
    both are undone on exit, because the groups depend on the model (a MoE
    model needs an EP group).
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(config):
        init_distributed(1, 0, f"file://{tmp}/dist-init")
        try:
            yield
        finally:
            cleanup_dist_env_and_memory()


def write_json_atomic(path: str | os.PathLike, result: Any) -> None:
    """Write ``result`` as JSON so a reader sees all of it or no file.

    A script that dies mid-write leaves no truncated result behind.
    """
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
