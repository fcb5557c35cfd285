# SPDX-License-Identifier: Apache-2.0
"""Benchmarks of the fork against pristine upstream vLLM.

``python -m benchmarks.load_time`` times whole-model loads against pristine
0.32.0 with ``vllm-bnb-plugin`` and against 0.27.1, the last release with
bitsandbytes in core; ``tests/test_weight_loader_timings.py`` times single
weight-loader calls with pytest-benchmark against pristine 0.32.0. Both
report numbers and ratios; neither asserts them.
"""
