"""How an offline command joins the CLI: `qaserve <name>` and `python -m qaserve.offline.<module>`.

Each command module describes itself once (`COMMAND = Command(...)`) and exports
`register = COMMAND.register` (what serve/cli.py collects) and, where it runs standalone,
`main = COMMAND.main`, so the two entries cannot drift apart in options or set-up.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Command:
    """One offline command: its options (`add_args`) and what it does with them (`run`)."""

    name: str  # `qaserve <name>`
    help: str  # its line in `qaserve --help`
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    module: str  # the standalone entry's `python -m` name (for `main`)
    doc: str | None = None  # the module docstring: the standalone entry's description
    doc_in_cli: bool = False  # also show `doc`, as written, in `qaserve <name> --help`
    logs: bool = False  # long runs: log progress at INFO, with timestamps

    def register(self, subparsers: Any) -> None:
        """Add the command to a CLI's argparse subparsers (handler in `func`)."""
        extra: dict[str, Any] = {}
        if self.doc_in_cli:
            extra = {
                "description": self.doc,
                "formatter_class": argparse.RawDescriptionHelpFormatter,
            }
        p = subparsers.add_parser(self.name, help=self.help, **extra)
        self.add_args(p)
        p.set_defaults(func=self.handle)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The command on its own, without the rest of the CLI."""
        p = argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.doc)
        self.add_args(p)
        return self.handle(p.parse_args(argv))

    def handle(self, args: argparse.Namespace) -> int:
        """What both entries call: the set-up every run of the command wants, then the run."""
        if self.logs:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return self.run(args)


def parse_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, VALUE read as YAML); argparse reports a bad one as a usage error."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "unreadable"
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML ({problem})") from None


def named_paths(specs: Sequence[str] | None, option: str, value: str = "PATH") -> dict[str, Path]:
    """`NAME=PATH` options (`--reader`, `--compare`) to {NAME: PATH}: a ConfigError naming
    `option` for a spec without both parts, or a NAME given twice."""
    from qaserve.errors import ConfigError

    field = option.lstrip("-")
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ConfigError(f"{option} {spec!r}: expected NAME={value}", field=field)
        if name in out:
            raise ConfigError(f"{option} {spec!r}: NAME must be unique", field=field)
        out[name] = Path(path.strip()).expanduser()
    return out


def add_settings(p: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE` (repeatable): config overrides for the pipeline a command builds."""
    p.add_argument(
        "--set",
        dest="settings",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a config override, dotted (e.g. {example}); repeatable",
    )
