# SPDX-License-Identifier: Apache-2.0
"""The fork next to the real `vllm-bnb-plugin`: exactly one bitsandbytes.

Both distributions declare a `vllm.general_plugins` entry point named
`bitsandbytes`. Core keeps one per name (patch "Load one plugin per name"):
the out-of-tree package unless `VLLM_PLUGINS` names `<distribution>:<name>`.
Each check runs in a fresh interpreter with vllm-bnb-plugin 0.0.3 (the
unpacked wheel, its dist-info included) on `PYTHONPATH`, so
`importlib.metadata` discovers it exactly as if it were installed.
"""

import json
import subprocess
import sys

import pytest

from tests.oracle.harness import BNB_PLUGIN_DIR, ENGINE_ENV

PROBE = r"""
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("vllm.plugins").addHandler(Keep())
logging.getLogger("vllm.plugins").setLevel(logging.INFO)
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
loader = _LOAD_FORMAT_TO_MODEL_LOADER["bitsandbytes"]
print(json.dumps({
    "config_module": get_quantization_config("bitsandbytes").__module__,
    "loader": loader if isinstance(loader, str) else loader.__module__,
    "imported": sorted(
        m for m in sys.modules
        if m.startswith(("vllm_bnb_plugin", "vllm.plugins.bitsandbytes"))
    ),
    "choice_logs": [r for r in records if "is provided by" in r],
}))
"""


def _probe(vllm_plugins: str | None) -> dict:
    if not (BNB_PLUGIN_DIR / "vllm_bnb_plugin").is_dir():
        pytest.fail(
            f"no vllm-bnb-plugin at {BNB_PLUGIN_DIR}; run tools/fork.py oracles"
        )
    env = {**ENGINE_ENV, "PYTHONPATH": str(BNB_PLUGIN_DIR)}
    if vllm_plugins is not None:
        env["VLLM_PLUGINS"] = vllm_plugins
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_out_of_tree_package_wins_by_default_and_says_so() -> None:
    result = _probe(None)
    assert result["config_module"].startswith("vllm_bnb_plugin")
    assert result["loader"].startswith("vllm_bnb_plugin")
    # The in-tree plugin was not even imported.
    imported = result["imported"]
    assert not any(m.startswith("vllm.plugins.bitsandbytes") for m in imported)
    (line,) = result["choice_logs"]
    assert "loading the one from vllm-bnb-plugin" in line
    assert "VLLM_PLUGINS=vllm:bitsandbytes" in line


def test_vllm_plugins_selects_the_in_tree_plugin() -> None:
    result = _probe("vllm:bitsandbytes")
    assert result["config_module"] == "vllm.plugins.bitsandbytes.config"
    assert result["loader"] == (
        "vllm.plugins.bitsandbytes.loader.BitsAndBytesModelLoader"
    )
    assert not any(m.startswith("vllm_bnb_plugin") for m in result["imported"])
    (line,) = result["choice_logs"]
    assert "loading the one from vllm." in line
    assert "VLLM_PLUGINS=vllm-bnb-plugin:bitsandbytes" in line


def test_plain_name_keeps_one_deterministic_choice() -> None:
    """`VLLM_PLUGINS=bitsandbytes` allows both; the default rule still picks."""
    assert _probe("bitsandbytes")["config_module"].startswith("vllm_bnb_plugin")
