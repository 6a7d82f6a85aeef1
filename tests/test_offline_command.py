"""The offline commands' shared scaffolding (qaserve.offline.command): the CLI entry and the
standalone entry build one parser, and a bad `--set` is a usage error, not a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest

from qaserve.cli import build_parser, main
from qaserve.offline import train_reader, train_retriever
from qaserve.offline.command import parse_setting

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


def test_the_cli_and_the_standalone_entry_parse_alike(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def record(args: argparse.Namespace) -> int:
        seen.append(vars(args))
        return 0

    cmd = dataclasses.replace(train_reader.COMMAND, run=record)
    argv = ["--train", str(FIXTURE), "--output", str(tmp_path), "--epochs", "1", "--seed", "7"]
    assert cmd.main(argv) == 0
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train-reader", *argv])
    assert args.func(args) == 0
    standalone, cli = seen
    assert {k: v for k, v in cli.items() if k not in ("cmd", "func")} == standalone
    assert standalone["seed"] == 7 and standalone["epochs"] == 1.0


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_a_command_shows_its_docstring_only_where_asked() -> None:
    retriever_doc = (train_retriever.__doc__ or "").strip().splitlines()
    reader_doc = (train_reader.__doc__ or "").strip().splitlines()
    assert "\n".join(retriever_doc[:2]) in _help(["train-retriever"])  # as written
    assert reader_doc[0] not in _help(["train-reader"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train_reader.main(["--help"])
    assert out.getvalue().startswith("usage: python -m qaserve.offline.train_reader ")
    assert " ".join(reader_doc[0].split()[:4]) in out.getvalue()


def test_settings_read_their_values_as_yaml() -> None:
    assert parse_setting("reader.no_answer_margin=1.5") == ("reader.no_answer_margin", 1.5)
    assert parse_setting("a.b=x=y") == ("a.b", "x=y")
    for bad in ("nokey", "=1", "a=["):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_setting(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit-ensemble", "--output", "p.json", "--set", "nokey"], "expected KEY=VALUE"),
        (["fit-ensemble", "--output", "p.json", "--set", "a=["], "not YAML"),
        (["eval", "somewhere", "--set", "a=["], "not YAML"),
    ],
)
def test_a_bad_setting_is_a_usage_error(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    domain = tmp_path / "data" / "electronics"  # fit-ensemble checks --data before settings
    domain.mkdir(parents=True)
    (domain / "dev.csv").write_bytes(FIXTURE.read_bytes())
    if argv[0] == "fit-ensemble":
        argv = [*argv, "--data", str(tmp_path / "data")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "argument --set: " in err.getvalue() and message in err.getvalue()
    assert not (tmp_path / "p.json").exists()
