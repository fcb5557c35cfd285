# SPDX-License-Identifier: Apache-2.0
"""Shared pytest configuration for the fork's tests."""

import pytest

# Timings, not checks (docs/benchmarks.md section 3): collected only when named,
# as the module sets its process to one torch thread and the engine defaults.
collect_ignore = ["test_weight_loader_timings.py"]


def pytest_configure(config: pytest.Config) -> None:
    """Register markers so ``-m "not engine"`` can skip the slow e2e runs."""
    config.addinivalue_line(
        "markers", "engine: starts the real vLLM engine in subprocesses (slow)"
    )
