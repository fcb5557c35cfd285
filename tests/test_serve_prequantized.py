# SPDX-License-Identifier: Apache-2.0
"""`vllm serve <pre-quantized BNB checkpoint>` works with no extra flags.

One real server start on 127.0.0.1 and one greedy completion, compared with
what users run today, pristine vLLM 0.32.0 with `vllm-bnb-plugin`, generating
offline from the same checkpoint and prompt.
"""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import get_checkpoint
from tests.oracle.harness import bnb_plugin, fork, free_port

PROMPT = "the quick brown fox"
MAX_TOKENS = 6
STARTUP_TIMEOUT_S = 300
UPSTREAM_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=int(sys.argv[3]))
    print("RESULT", json.dumps(llm.generate([sys.argv[2]], params)[0].outputs[0].text))
"""


def upstream_completion(model: Path) -> str:
    side = bnb_plugin()
    result = subprocess.run(
        [side.python, "-c", UPSTREAM_SCRIPT, str(model), PROMPT, str(MAX_TOKENS)],
        env=side.env(),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.engine
def test_serve_prequantized_checkpoint_without_flags(tmp_path):
    model = get_checkpoint("llama-bnb-nf4")
    port = free_port()
    side = fork()
    env = side.env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server as users run it
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "vllm"), "serve", str(model),
            "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "256", "--seed", "0",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=5
                ):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(2)
        completion = post_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {
                "model": str(model),
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    served_text = completion["choices"][0]["text"]
    assert served_text == upstream_completion(model)
    log_text = (tmp_path / "serve.log").read_text()
    assert "bitsandbytes" in log_text.lower()
