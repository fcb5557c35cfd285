# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Model loaders registered by class name, imported on first use.

Import costs are observed in fresh interpreters, so nothing this process
imported earlier hides them. The loaders registered by name live in a module
written to a temporary directory on `sys.path`. CPU only; run
`pytest tests/model_executor/test_loader_registry.py`.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vllm.model_executor.model_loader as model_loader
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import (
    BaseModelLoader,
    get_model_loader,
    register_model_loader,
)

LOADERS_MODULE = "registry_test_loaders"
LOADERS_SOURCE = """
from vllm.model_executor.model_loader.base_loader import BaseModelLoader


class NamedLoader(BaseModelLoader):
    def download_model(self, model_config):
        pass

    def load_weights(self, model, model_config):
        pass


class NotALoader:
    pass
"""


@pytest.fixture
def loaders_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / f"{LOADERS_MODULE}.py").write_text(LOADERS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, LOADERS_MODULE, raising=False)
    return LOADERS_MODULE


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running `code`."""
    probe = f"{textwrap.dedent(code)}\nimport sys\nprint('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], check=True, text=True, stdout=subprocess.PIPE
    )
    return set(result.stdout.split())


def test_importing_the_package_imports_no_loader_and_no_layer() -> None:
    modules = imported_after(
        """
        from vllm.model_executor.model_loader import register_model_loader
        register_model_loader("registry_test_lazy", "some.module.SomeLoader")
        """
    )
    package = "vllm.model_executor.model_loader"
    assert package in modules
    assert f"{package}.default_loader" not in modules
    assert f"{package}.base_loader" not in modules
    assert "vllm.model_executor.layers.linear" not in modules
    assert "some.module" not in modules


def test_a_loader_registered_by_name_is_imported_on_first_use(
    loaders_module: str,
) -> None:
    register_model_loader("registry_test_named", f"{loaders_module}.NamedLoader")
    assert loaders_module not in sys.modules
    loader = get_model_loader(LoadConfig(load_format="registry_test_named"))
    assert type(loader) is sys.modules[loaders_module].NamedLoader
    # Imported once: the registry now holds the class.
    again = get_model_loader(LoadConfig(load_format="registry_test_named"))
    assert type(again) is type(loader)


def test_a_name_that_is_not_a_loader_fails_on_first_use(loaders_module: str) -> None:
    register_model_loader("registry_test_bad", f"{loaders_module}.NotALoader")
    message = (
        f"The model loader `{loaders_module}.NotALoader` registered for load "
        "format `registry_test_bad` is not a subclass of `BaseModelLoader`."
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_model_loader(LoadConfig(load_format="registry_test_bad"))


def test_the_decorator_form_still_registers_a_class() -> None:
    @register_model_loader("registry_test_decorated")
    class DecoratedLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:
            pass

        def load_weights(self, model, model_config) -> None:
            pass

    loader = get_model_loader(LoadConfig(load_format="registry_test_decorated"))
    assert type(loader) is DecoratedLoader


def test_the_decorator_form_refuses_a_class_that_is_not_a_loader() -> None:
    with pytest.raises(ValueError, match="must be a subclass of `BaseModelLoader`"):
        register_model_loader("registry_test_refused")(type("NotALoader", (), {}))


def test_builtin_loaders_and_helpers_are_exported_lazily() -> None:
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_cls
    from vllm.model_executor.model_loader.default_loader import (
        DefaultModelLoader as Defined,
    )
    from vllm.model_executor.model_loader.utils import get_model_cls as defined

    assert DefaultModelLoader is Defined
    assert get_model_cls is defined
    assert type(get_model_loader(LoadConfig(load_format="safetensors"))) is Defined
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLoader'"):
        _ = model_loader.NoSuchLoader
