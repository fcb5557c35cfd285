# SPDX-License-Identifier: Apache-2.0
"""Import contracts between core and the quantization plugins.

Core must not know the bitsandbytes plugin; every plugin (the in-tree
bitsandbytes one and the out-of-tree toy of tests/plugins) may use only
public core API and must never assign onto vLLM modules or classes (no
monkeypatching).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "vllm" / "plugins" / "bitsandbytes"
PLUGIN_PACKAGE = "vllm.plugins.bitsandbytes"
# package -> source directory, for the checks every plugin must pass
PLUGINS = {
    PLUGIN_PACKAGE: PLUGIN,
    "vllm_toy_int8": REPO
    / "tests"
    / "plugins"
    / "vllm_toy_int8"
    / "src"
    / "vllm_toy_int8",
}


def plugin_modules(source: Path) -> dict[str, ast.Module]:
    modules = {path.name: ast.parse(path.read_text()) for path in source.glob("*.py")}
    assert modules, f"no plugin source in {source}"
    return modules


def core_imports(tree: ast.Module, package: str) -> list[tuple[str, str]]:
    """(module, name) pairs a plugin imports from vLLM outside itself."""
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("vllm") and not node.module.startswith(package):
                pairs += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [
                (alias.name, "")
                for alias in node.names
                if alias.name.startswith("vllm") and not alias.name.startswith(package)
            ]
    return pairs


def test_core_never_imports_the_plugin():
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lint-imports"),
            "--config",
            str(REPO / "pyproject.toml"),
        ],
        cwd="/",  # analyse the installed fork, not the repository's vllm/
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("package", PLUGINS)
def test_plugin_imports_only_public_core_api(package: str):
    private = [
        f"{file}: from {module} import {name}"
        for file, tree in plugin_modules(PLUGINS[package]).items()
        for module, name in core_imports(tree, package)
        if any(part.startswith("_") for part in module.split("."))
        or name.startswith("_")
    ]
    assert private == []


@pytest.mark.parametrize("package", PLUGINS)
def test_plugin_assigns_nothing_onto_vllm(package: str):
    """Every attribute assignment targets an object the plugin created."""
    violations = []
    for file, tree in plugin_modules(PLUGINS[package]).items():
        imported = {
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = (
                    node.targets if isinstance(node, ast.Assign) else [node.target]
                )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("setattr", "delattr")
                and node.args
            ):
                targets = [ast.Attribute(value=node.args[0], attr="?")]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute | ast.Subscript):
                    root = root.value
                if (
                    root is not target
                    and isinstance(root, ast.Name)
                    and root.id in imported
                ):
                    violations.append(f"{file}:{node.lineno} assigns onto {root.id}")
    assert violations == []
