"""Run mypy over the qaserve packages as they are imported, not as they sit on disk.

The source folders are mapped onto import names by `[tool.setuptools] package-dir`
(serve/ -> qaserve, deployments/ -> qaserve.deployments, clients/ -> qaserve_client, ...).
The editable install resolves that with an import hook that mypy cannot follow, so this
builds a tree of symlinks with the import layout under build/typecheck (the `mypy_path`,
and the `files`, of `[tool.mypy]`), runs mypy as `[tool.mypy]` says, and prints the errors with
the source paths (serve/cli.py, not build/typecheck/qaserve/cli.py).

Then tests/ gets a second, laxer pass (TESTS_FLAGS): its modules are top-level names
(test_api, conftest), which a `[[tool.mypy.overrides]]` pattern cannot select, and its untyped
test functions and fixtures are not worth annotating. Annotated test functions are checked.

    .venv/bin/python scripts/typecheck.py                 # both passes, as `make check` runs
    .venv/bin/python scripts/typecheck.py [mypy args]     # one pass with these arguments
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mypy import api

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
TESTS = ["tests"]
TESTS_FLAGS = [
    "--allow-untyped-defs",
    "--allow-incomplete-defs",
    "--no-check-untyped-defs",
    "--follow-imports=silent",  # the packages' own errors are the first pass's to report
    "--cache-dir=build/mypy_cache_tests",  # other options: a cache of its own stays warm
]


def package_dirs() -> dict[str, str]:
    """Import name -> source folder, from pyproject's `[tool.setuptools] package-dir`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    return mapping


def build_tree(mapping: dict[str, str]) -> dict[str, str]:
    """Symlink every mapped package into TREE; returns tree path prefix -> source prefix.

    The tree is brought up to date in place, not rebuilt, so that a second `make check`
    running at the same time never finds it half gone.
    """
    dirs: set[Path] = set()
    links: dict[Path, Path] = {}
    prefixes: dict[str, str] = {}
    # Parents first: qaserve.deployments replaces whatever qaserve/deployments would be.
    for name in sorted(mapping, key=lambda n: n.count(".")):
        source = ROOT / mapping[name]
        target = TREE.joinpath(*name.split("."))
        links.pop(target, None)
        dirs.update([target, *target.parents])
        for entry in source.iterdir():
            if entry.name != "__pycache__" and target / entry.name not in dirs:
                links[target / entry.name] = entry
        prefixes[f"{target.relative_to(ROOT).as_posix()}/"] = f"{mapping[name]}/"
    if TREE.exists():
        for folder, subdirs, files in os.walk(TREE, topdown=False):  # links are not followed
            for path in (Path(folder, n) for n in [*subdirs, *files]):
                if path.is_symlink():
                    if links.get(path) != path.readlink():
                        path.unlink()
                elif path.is_dir():
                    if path not in dirs:
                        shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    for folder in sorted(dirs):
        if TREE in (folder, *folder.parents):
            folder.mkdir(parents=True, exist_ok=True)  # a fresh clone has no build/
    for path, entry in links.items():
        if not path.is_symlink():
            path.symlink_to(entry)
    return prefixes


def run(args: list[str], prefixes: dict[str, str]) -> int:
    """One mypy run; its report printed with source paths. Returns mypy's exit status."""
    stdout, stderr, status = api.run(args)
    # Longest prefix first: build/typecheck/qaserve/deployments/ before build/typecheck/qaserve/.
    ordered = sorted(prefixes.items(), key=lambda kv: len(kv[0]), reverse=True)
    for line in stdout.splitlines():
        for tree_prefix, source_prefix in ordered:
            if line.startswith(tree_prefix):
                line = source_prefix + line[len(tree_prefix) :]
                break
        print(line, flush=True)
    if stderr:
        print(stderr, end="", file=sys.stderr, flush=True)
    return status


def main(argv: list[str]) -> int:
    prefixes = build_tree(package_dirs())
    if argv:
        return run(argv, prefixes)
    packages = run([], prefixes)
    tests = run(TESTS_FLAGS + TESTS, prefixes)
    return max(packages, tests)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
