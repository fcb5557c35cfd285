# SPDX-License-Identifier: Apache-2.0
"""Shared pytest configuration for the fork's tests."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register markers so ``-m "not engine"`` can skip the slow e2e runs."""
    config.addinivalue_line(
        "markers", "engine: starts the real vLLM engine in subprocesses (slow)"
    )
