# SPDX-License-Identifier: Apache-2.0
"""Oracle harness: upstream 0.27.1 and the fork, run side by side on CPU."""
