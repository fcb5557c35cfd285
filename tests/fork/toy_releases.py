# SPDX-License-Identifier: Apache-2.0
"""Files of synthetic upstream releases, for the replay tests of `rebase`
and of targets."""

from pathlib import Path

LOADER = "def load(path):\n    return open(path, 'rb').read()\n"
LAYERS = "".join(f"def layer_{i}(x):\n    return x + {i}\n\n\n" for i in range(8))
# Patches: one to a line upstream leaves alone, one to a line it changes.
CLEAN = {"layers.py": LAYERS.replace("x + 1\n", "x + 1  # hooked\n")}
CONFLICTING = {"loader.py": LOADER.replace("open(path, 'rb')", "reader(path)")}


def write(root: Path, files: dict[str, str]) -> Path:
    """`files` (path under vllm/: text) written into a release at `root`."""
    for name, text in files.items():
        path = root / "vllm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
