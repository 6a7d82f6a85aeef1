"""Run mypy over the qaserve packages as they are imported, not as they sit on disk.

The source folders are mapped onto import names by `[tool.setuptools] package-dir`
(serve/ -> qaserve, deployments/ -> qaserve.deployments, clients/ -> qaserve_client, ...).
The editable install resolves that with an import hook that mypy cannot follow, so this
builds a tree of symlinks with the import layout under build/typecheck (the `mypy_path`
in `[tool.mypy]`), runs mypy with the rest of `[tool.mypy]`, and prints the errors with the
source paths (serve/cli.py, not build/typecheck/qaserve/cli.py).

    .venv/bin/python scripts/typecheck.py [extra mypy args]
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, str]:
    """Import name -> source folder, from pyproject's `[tool.setuptools] package-dir`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    return mapping


def build_tree(mapping: dict[str, str]) -> dict[str, str]:
    """Symlink every mapped package into TREE; returns tree path prefix -> source prefix."""
    if TREE.exists():
        shutil.rmtree(TREE)
    prefixes: dict[str, str] = {}
    # Parents first, so that qaserve.deployments lands inside the already built qaserve/.
    for name in sorted(mapping, key=lambda n: n.count(".")):
        source = ROOT / mapping[name]
        target = TREE.joinpath(*name.split("."))
        if target.is_symlink():  # a folder of the parent package with the same name
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(source.iterdir()):
            if entry.name == "__pycache__" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
        prefixes[f"{target.relative_to(ROOT).as_posix()}/"] = f"{mapping[name]}/"
    return prefixes


def main(argv: list[str]) -> int:
    prefixes = build_tree(package_dirs())
    top_level = sorted({name.split(".")[0] for name in package_dirs()})
    args = [arg for name in top_level for arg in ("-p", name)] + argv
    stdout, stderr, status = api.run(args)
    # Longest prefix first: build/typecheck/qaserve/deployments/ before build/typecheck/qaserve/.
    ordered = sorted(prefixes.items(), key=lambda kv: len(kv[0]), reverse=True)
    for line in stdout.splitlines():
        for tree_prefix, source_prefix in ordered:
            if line.startswith(tree_prefix):
                line = source_prefix + line[len(tree_prefix) :]
                break
        print(line)
    if stderr:
        print(stderr, end="", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
