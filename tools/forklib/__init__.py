# SPDX-License-Identifier: Apache-2.0
"""The fork tooling behind `tools/fork.py`, one module per concern:

git       project-agnostic git helpers
base      the pinned upstream wheels (base and oracles): fetch, verify, unpack
series    patches/ and the git trees materialized from it
wheel     packing a tree as the `vllm` wheel, and checking a built wheel
upstream  the fork as one upstream series, and checking it patch by patch
rebase    moving the series onto a new upstream release
"""
