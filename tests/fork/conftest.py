# SPDX-License-Identifier: Apache-2.0
"""Tests of the fork tooling import `forklib` from tools/, as tools/fork.py does."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
