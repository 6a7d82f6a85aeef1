"""The reader's no-answer weight: fitted on dev by `qaserve calibrate-reader`, carried in the
model folder, applied by the Reader unless the config sets its own."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from tiny_models import tiny_reader_dir

from qaserve.cli import main
from qaserve.config import ReaderConfig
from qaserve.deployments.reader import CALIBRATION_NAME, Reader
from qaserve.offline.calibrate_reader import best_weight, held_out, score_at, transfers

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"
QUESTION = "Is the battery good?"
REVIEW = "The battery lasts two days. The screen is dim and the case feels cheap."


def _row(span: str, s: float, n: float, golds: list[str], domain: str = "d") -> dict:
    return {
        "span": span,
        "span_score": s,
        "null_score": n,
        "golds": golds,
        "domain": domain,
        "answerable": any(golds),
    }


def test_the_weight_that_wins_official_f1_is_chosen() -> None:
    rows = [
        _row("wrong", 0.30, 0.10, [""]),  # unanswerable: abstain once w >= 3
        _row("wrong", 0.20, 0.10, [""]),  # abstain once w >= 2
        _row("two days", 0.90, 0.10, ["two days"]),  # right: answer while w < 9
    ]
    assert score_at(rows, 1.0)["all"]["f1"] == pytest.approx(1 / 3)
    chosen = best_weight(rows)
    assert 3.0 <= chosen["weight"] < 9.0 and chosen["all"]["f1"] == pytest.approx(1.0)
    assert score_at(rows, math.inf)["null_rate"] == 1.0
    # Nothing to gain: the weight nearest 1 (the pipeline's rule) stays.
    same = [_row("two days", 0.9, 0.01, ["two days"])]
    assert best_weight(same)["weight"] == pytest.approx(1.0, rel=0.1)


def test_mixed_golds_score_by_the_official_rule() -> None:
    """A question with a span and a "no answer" label must be answered (SQuAD 2.0)."""
    rows = [_row("two days", 0.5, 0.4, ["two days", ""])]
    assert score_at(rows, 1.0)["all"]["f1"] == 1.0
    assert score_at(rows, 10.0)["all"]["f1"] == 0.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cal")
    return tiny_reader_dir(root / "reader", root / "cache")


def _top(folder: Path, cache: Path, **cfg: object) -> str:
    reader = Reader(ReaderConfig(model=str(folder), **cfg), cache, threads=1)
    res = reader.read(QUESTION, [REVIEW], top_k=1, handle_impossible_answer=True)
    return res.answers[0].answer


def test_the_folder_calibration_applies_unless_the_config_overrides(
    folder: Path, tmp_path: Path
) -> None:
    (folder / CALIBRATION_NAME).unlink(missing_ok=True)
    assert Reader(ReaderConfig(model=str(folder)), tmp_path, threads=1).null_weight == 1.0
    try:
        (folder / CALIBRATION_NAME).write_text(json.dumps({"null_weight": 1e9}))
        assert _top(folder, tmp_path) == ""  # the model's own weight: always abstains
        assert _top(folder, tmp_path, null_weight=1e-9) != ""  # the config's wins
    finally:
        (folder / CALIBRATION_NAME).unlink()
    with pytest.raises(ValueError):
        ReaderConfig(null_weight=0)


def test_the_command_writes_a_weight_the_reader_loads(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two domains (the fixture's questions again as "grocery"): a held-out check exists.
    twin = tmp_path / "grocery.csv"
    with FIXTURE.open(newline="") as src, twin.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=list(reader.fieldnames or []))
        writer.writeheader()
        for row in reader:
            writer.writerow({**row, "domain": "grocery", "q_review_id": row["q_review_id"] + "g"})
    argv = [
        "calibrate-reader",
        "--data",
        str(FIXTURE),
        str(twin),
        "--model",
        str(folder),
        "--cache-dir",
        str(tmp_path),
        "--quiet",
        "--write",
    ]
    try:
        assert main(argv) == 0
        saved = json.loads((folder / CALIBRATION_NAME).read_text())
        assert saved["selected_on"]["split"] == "dev" and saved["reader"]["questions"] == 22
        assert {c["domain"] for c in saved["held_out"]} == {"electronics", "grocery"}
        f1s = {round(g["weight"], 4): g["f1"] for g in saved["reader"]["grid"]}
        assert saved["reader"]["chosen"]["all"]["f1"] == pytest.approx(max(f1s.values()))
        assert Reader(ReaderConfig(model=str(folder)), tmp_path, threads=1).null_weight == (
            pytest.approx(saved["null_weight"])
        )
        # One domain gives no held-out evidence: nothing is written, the old file goes.
        assert main(argv[:3] + argv[4:]) == 0
        assert not (folder / CALIBRATION_NAME).exists()
        assert "not written" in capsys.readouterr().out
        # The report and the sweep plot, with another report beside this one.
        report, png = tmp_path / "report.json", tmp_path / "sweep.png"
        assert main([*argv[:-1], "--output", str(report)]) == 0
        assert json.loads(report.read_text())["reader"]["grid"] == saved["reader"]["grid"]
        extra = ["--plot", str(png), "--compare", f"before={report}", "--name", "fixture"]
        assert main(argv[:-1] + extra) == 0
        assert png.read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(SystemExit, match="NAME=JSON"):
            main([*argv[:-1], "--plot", str(png), "--compare", str(report)])
    finally:
        (folder / CALIBRATION_NAME).unlink(missing_ok=True)
    assert main(["calibrate-reader", "--data", str(FIXTURE), "--split", "test"]) == 2
    assert "dev" in capsys.readouterr().err


def test_a_weight_ships_only_if_every_held_out_domain_keeps_its_f1() -> None:
    """Fitted on the other domains, the weight must not hurt the one left out."""
    abstaining = [_row("wrong", 0.3, 0.1, [""], d) for d in ("a", "b", "c")]
    helps = {"held_out": held_out(abstaining * 2)}
    assert helps["held_out"] and transfers(helps)
    # Domain "c" answers right where the others should abstain: its held-out F1 falls.
    mixed = [_row("wrong", 0.3, 0.1, [""], d) for d in ("a", "b")] + [
        _row("two days", 0.3, 0.1, ["two days"], "c")
    ]
    report = {"held_out": held_out(mixed)}
    c = next(x for x in report["held_out"] if x["domain"] == "c")
    assert c["gain"] < 0 and not transfers(report)
    assert not transfers({"held_out": held_out(abstaining[:1])})  # one domain: no evidence
