# SPDX-License-Identifier: Apache-2.0
"""The plugin's features beyond upstream, one patch each, for the upstream cut.

The fork's files hold every feature. Upstream gets the plugin without them
first and then each feature as its own pull request, so each feature is kept
as a `git format-patch` mail in patches/features/ against the files at their
vLLM tree paths, named after its subject; the `features` of the
`[[upstream.pr]]` entries in tools/fork.toml give their order. Reverse-applying
them, last first, to the fork's files yields the plugin PR's files.

To change a feature, or the plugin under the features: `features-checkout`
makes a git repository holding the plugin PR's files (tag `plugin`) and one
commit per feature; edit or rebase there, then `features-export` writes the
patches back and copies the files the commits change into this repository.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import git
from .base import REPO, log
from .series import IDENTITY, PATCH_CONTEXT_LINES, PATCHES, require_clean

FEATURES = PATCHES / "features"
PLUGIN_TAG = "plugin"
# `git format-patch` numbers its files; the order lives in tools/fork.toml.
NUMBER_PREFIX = re.compile(r"^\d{4}-")


def copy_own_files(files: dict[str, str], destination: Path) -> None:
    """Copy `files` (tree path: repository path) into `destination`."""
    for target, source in files.items():
        (destination / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / source, destination / target)


def remove_features(root: Path, patches: list[Path]) -> None:
    """Reverse-apply `patches` to the files under `root`, last patch first."""
    for patch in reversed(patches):
        result = subprocess.run(
            ["git", "apply", "-R", str(patch)],
            cwd=root,
            text=True,
            stderr=subprocess.PIPE,
        )
        if result.returncode != 0:
            raise SystemExit(
                f"patches/features/{patch.name} no longer matches the fork's files "
                f"(git apply -R: {result.stderr.strip()}). Code a feature patch "
                "changes is edited in the features checkout, not in vllm/: set "
                "the edit aside (git stash), run `tools/fork.py "
                "features-checkout`, redo it in the commit it belongs to there, "
                "then `tools/fork.py features-export`."
            )


def checkout(files: dict[str, str], patches: list[Path], tree: Path) -> git.Repo:
    """`tree`: the plugin without its features (tag `plugin`), then each
    feature as a commit, so that the result is the fork's files."""
    if tree.exists():
        raise SystemExit(f"{tree} exists; remove it or pick another --tree")
    repo = git.init(tree, "features", IDENTITY)
    copy_own_files(files, tree)
    remove_features(tree, patches)
    git.commit_all(repo, "The plugin without its features beyond upstream")
    repo.run("tag", PLUGIN_TAG)
    if patches and not git.am(repo, patches):
        raise SystemExit(f"the feature patches do not apply in {tree} (see above)")
    with tempfile.TemporaryDirectory(prefix="fork-features-") as scratch:
        copy_own_files(files, Path(scratch))
        changed = repo.output("diff", "--name-only", PLUGIN_TAG, "HEAD").split()
        differing = [
            path
            for path in changed
            if path in files
            and (tree / path).read_bytes() != (Path(scratch) / path).read_bytes()
        ]
    if differing:
        raise SystemExit(f"the features do not rebuild the fork's files: {differing}")
    log(f"{tree}: the plugin (tag {PLUGIN_TAG}) and {len(patches)} feature commits")
    return repo


def export(
    tree: Path,
    files: dict[str, str],
    expected: list[str],
    repository_path: Callable[[str], str],
) -> list[str]:
    """Write `plugin..HEAD` of `tree` to patches/features/ and make this
    repository's files those of HEAD; the patch names, in order.

    `files` maps the tree paths of the fork's own files to their paths here,
    `repository_path` places a file the commits added.
    """
    repo = git.Repo(tree)
    require_clean(repo, tree)
    with tempfile.TemporaryDirectory(prefix="fork-features-") as scratch:
        written = git.format_patch(
            repo, f"{PLUGIN_TAG}..HEAD", Path(scratch),
            "--zero-commit", "--no-signature", "--no-numbered",
            f"--unified={PATCH_CONTEXT_LINES}", "--abbrev=12",
        )  # fmt: skip
        shutil.rmtree(FEATURES, ignore_errors=True)
        FEATURES.mkdir(parents=True)
        names = []
        for path in written:
            names.append(NUMBER_PREFIX.sub("", path.name))
            shutil.move(path, FEATURES / names[-1])
    final = set(repo.output("ls-files").split())
    for path in sorted(final | set(files)):
        target = REPO / (files.get(path) or repository_path(path))
        if path not in final:
            target.unlink()
        elif not target.exists() or target.read_bytes() != (tree / path).read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / path, target)
            log(f"updated {target.relative_to(REPO)}")
    if names != expected:
        log(
            "tools/fork.toml names other feature patches; set the `features` of "
            f"the [[upstream.pr]] entries to, in order: {names}"
        )
    return names
