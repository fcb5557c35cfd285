# SPDX-License-Identifier: Apache-2.0
"""The fork tooling behind `tools/fork.py`, one module per concern:

git       project-agnostic git helpers
base      the pinned upstream wheels (base and oracles): fetch, verify, unpack
series    patches/ and the git trees materialized from it
wheel     packing a tree as the `vllm` wheel (or an editable one), and checking
          a built wheel
pep517    the PEP 517 build backend behind `pip install .` and `pip install -e .`
lint      upstream's ruff settings on what the fork changes
upstream  the fork as PR-sized upstream series, and checking them commit by
          commit
rebase    moving the series onto a new upstream release
"""
