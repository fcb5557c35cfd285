# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Which plugin loads when names collide, and the disabled-plugin message.

The plugins are real distributions: `.dist-info` directories and modules
written to a temporary directory put on `sys.path`, found by
`importlib.metadata` like installed packages. An in-tree plugin is an entry
point into the `vllm` package (the LoRA filesystem resolver's `register`
function, which loading does not call). CPU only; run
`pytest tests/plugins_tests/test_plugin_selection.py`.
"""

from pathlib import Path

import pytest

from vllm.plugins import (
    DEFAULT_PLUGINS_GROUP,
    disabled_plugin_message,
    load_plugins_by_group,
)
from vllm.plugins.lora_resolvers.filesystem_resolver import (
    register_filesystem_resolver,
)

GROUP = "vllm.test_selection_plugins"
IN_TREE = "vllm.plugins.lora_resolvers.filesystem_resolver:register_filesystem_resolver"


def add_distribution(
    path: Path, name: str, plugins: dict[str, str], group: str = GROUP
) -> None:
    """An installed distribution `name` declaring entry points `plugins`."""
    info = path / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    )
    lines = "".join(f"{plugin} = {target}\n" for plugin, target in plugins.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")


def add_module(path: Path, module: str) -> None:
    (path / f"{module}.py").write_text(f"def register():\n    return {module!r}\n")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`shared` from an in-tree and an out-of-tree distribution, `tie` from
    two out-of-tree ones, `unique` from one."""
    for module in ("selection_outside", "selection_alpha", "selection_zeta"):
        add_module(tmp_path, module)
    add_distribution(tmp_path, "a-inside", {"shared": IN_TREE})
    add_distribution(
        tmp_path,
        "b-outside",
        {
            "shared": "selection_outside:register",
            "unique": "selection_outside:register",
        },
    )
    add_distribution(tmp_path, "zeta-dist", {"tie": "selection_zeta:register"})
    add_distribution(tmp_path, "alpha-dist", {"tie": "selection_alpha:register"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def loaded(monkeypatch: pytest.MonkeyPatch, allowed: str | None) -> dict[str, str]:
    """Plugin name -> where the loaded function comes from."""
    if allowed is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", allowed)
    return {
        name: "in-tree" if function is register_filesystem_resolver else function()
        for name, function in load_plugins_by_group(GROUP).items()
    }


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        # Out of tree wins over in-tree; ties go to the first distribution.
        (
            None,
            {
                "shared": "selection_outside",
                "unique": "selection_outside",
                "tie": "selection_alpha",
            },
        ),
        # A plain name keeps selecting the plugin, chosen as above.
        ("shared", {"shared": "selection_outside"}),
        # `<distribution>:<name>` picks one of the colliding plugins.
        ("a-inside:shared", {"shared": "in-tree"}),
        (
            "zeta-dist:tie,unique",
            {"tie": "selection_zeta", "unique": "selection_outside"},
        ),
        ("something-else", {}),
    ],
)
def test_one_plugin_per_name(
    monkeypatch: pytest.MonkeyPatch, allowed: str | None, expected: dict[str, str]
) -> None:
    assert loaded(monkeypatch, allowed) == expected


@pytest.fixture
def quantization_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    add_module(tmp_path, "selection_quant")
    add_distribution(
        tmp_path,
        "selection-quant-dist",
        {"selection_quant": "selection_quant:register"},
        group=DEFAULT_PLUGINS_GROUP,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "selection_quant"


def test_a_method_of_a_disabled_plugin_names_the_plugin(
    monkeypatch: pytest.MonkeyPatch, quantization_plugin: str
) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver,other")
    assert disabled_plugin_message("Quantization method", quantization_plugin) == (
        "Quantization method 'selection_quant' is provided by the plugin "
        "'selection_quant', which is disabled by "
        "VLLM_PLUGINS='lora_filesystem_resolver,other'; add 'selection_quant' "
        "to VLLM_PLUGINS or unset it."
    )


@pytest.mark.parametrize(
    "allowed", [None, "selection_quant", "selection-quant-dist:selection_quant"]
)
def test_no_message_when_the_plugin_is_enabled(
    monkeypatch: pytest.MonkeyPatch, quantization_plugin: str, allowed: str | None
) -> None:
    if allowed is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", allowed)
    assert disabled_plugin_message("Load format", quantization_plugin) is None


def test_no_message_for_a_name_no_plugin_declares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert disabled_plugin_message("Quantization method", "no_such_method") is None
