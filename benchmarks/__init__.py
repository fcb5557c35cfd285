# SPDX-License-Identifier: Apache-2.0
"""Benchmarks of the fork against pristine upstream vLLM 0.27.1.

``python -m benchmarks.load_time`` times whole-model loads;
``benchmarks/test_weight_loader_bench.py`` times single weight-loader calls
with pytest-benchmark. Both report numbers and ratios; neither asserts them.
"""
