"""`qaserve calibrate-reader`: fit the reader's no-answer weight on the dev splits.

A reader trained on SubjQA's half-unanswerable data learns its own balance between answering
and abstaining; how that balance converts into SQuAD 2.0's official F1 is not something the
training loss sees. SQuAD 2.0 systems therefore pick a null-score threshold on dev (the
official script's "best_f1_thresh"). Here the reader reads each dev question's own review
once, keeps its best span score s and its no-answer score n, and every weight w on a grid
answers "no answer" when w * n >= s; the weight with the best pooled official F1 (ties: the
one nearest 1) is written as `calibration.json` beside the model, which the Reader applies
unless `reader.null_weight` says otherwise, but only when a weight fitted on the other dev
domains helps each held-out one (SubjQA's domains differ in how often they are unanswerable).

    qaserve calibrate-reader --data SubjQA/ --split dev --model serve/assets/reader --write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.metrics import squad_em_f1
from qaserve.offline.command import Command, add_settings, named_paths

GRID = tuple(float(w) for w in np.geomspace(0.01, 1000.0, 101))


def read_scores(
    reader: Any, examples: Sequence[Any], progress: bool = False
) -> list[dict[str, Any]]:
    """Per question: the best span, its score, and the no-answer score (weight 1)."""
    from tqdm import tqdm

    rows = []
    for ex in tqdm(examples, desc="calibrate-reader", disable=not progress):
        res = reader.read(ex.question, [ex.context], top_k=5, handle_impossible_answer=True)
        rows.append(_row(res, ex, ex.domain))
    return rows


def _row(read: Any, ex: Any, domain: str) -> dict[str, Any]:
    spans = [a for a in read.answers if a.answer] if read is not None else []
    return {
        "span": spans[0].answer if spans else "",
        "span_score": spans[0].score if spans else 0.0,
        "null_score": float(read.no_answer_score or 0.0) if read is not None else 1.0,
        "golds": list(ex.gold_texts),
        "domain": domain or "?",
        "answerable": not ex.is_impossible,
    }


def pipeline_scores(
    data: Path,
    split: str,
    settings: dict[str, Any],
    limit: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The same per-question scores behind the server's own pipeline (its configured
    retrieval and top-k, the book protocol's corpus and item filter), weight 1."""
    import tempfile

    from qaserve.config import EngineConfig
    from qaserve.offline.protocol import domains_in, item_query, served_questions
    from qaserve.runtime.local import Engine

    rows: list[dict[str, Any]] = []
    overrides = {**settings, "reader.null_weight": 1.0}
    domains = domains_in(data, split)
    if not domains:  # one domain folder itself
        data, domains = data.parent, [data.name]
    with tempfile.TemporaryDirectory(prefix="qaserve-calibrate-") as tmp:
        engine = Engine(EngineConfig.load(None, data_dir=Path(tmp), **overrides))
        try:
            runs = served_questions(engine, data, split, domains, limit, "cal", progress)
            for name, ex, collection in runs:
                request = item_query(ex, collection, "extractive")
                ev = engine.run(engine.pipeline.evidence(request))
                rows.append(_row(ev.read, ex, name))
        finally:
            engine.close()
    return rows


def score_at(rows: Sequence[dict[str, Any]], weight: float) -> dict[str, Any]:
    """Official EM/F1 (pooled, per domain, answerable/unanswerable) at one weight."""
    groups: dict[str, list[tuple[float, float]]] = {}
    abstained = 0
    for r in rows:
        empty = not r["span"] or weight * r["null_score"] >= r["span_score"]
        abstained += empty
        em, f1 = squad_em_f1("" if empty else r["span"], r["golds"])
        kind = "has_answer" if r["answerable"] else "no_answer"
        for key in ("all", r["domain"], kind):
            groups.setdefault(key, []).append((em, f1))
    out: dict[str, Any] = {
        k: {"em": float(np.mean([v[0] for v in vs])), "f1": float(np.mean([v[1] for v in vs]))}
        for k, vs in groups.items()
    }
    out["null_rate"] = abstained / max(1, len(rows))
    out["weight"] = weight
    return out


def best_weight(rows: Sequence[dict[str, Any]], grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The grid weight with the best pooled official F1; ties go to the one nearest 1."""
    scored = [score_at(rows, w) for w in grid]
    return max(scored, key=lambda s: (round(s["all"]["f1"], 9), -abs(math.log(s["weight"]))))


def held_out(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave one dev domain out: the weight fitted on the others, scored on it. SubjQA's
    domains differ widely in how many questions are unanswerable, so a weight that helps the
    pooled split can hurt a domain it was not fitted on (a user's corpus is such a domain)."""
    out = []
    domains = sorted({r["domain"] for r in rows})
    for d in domains if len(domains) > 1 else []:
        weight = best_weight([r for r in rows if r["domain"] != d])["weight"]
        held = [r for r in rows if r["domain"] == d]
        at_1, fitted = score_at(held, 1.0)["all"]["f1"], score_at(held, weight)["all"]["f1"]
        out.append(
            {"domain": d, "weight": weight, "f1_at_1": at_1, "f1": fitted, "gain": fitted - at_1}
        )
    return out


def transfers(report: dict[str, Any]) -> bool:
    """Ship a weight only when it helps (or leaves alone) every held-out dev domain."""
    checks = report.get("held_out") or []
    return bool(checks) and all(c["gain"] >= 0 for c in checks)


def _summary(rows: Sequence[dict[str, Any]], weight: float) -> dict[str, Any]:
    return {
        "questions": len(rows),
        "chosen": score_at(rows, weight),
        "at_1": score_at(rows, 1.0),
        "always_no_answer": score_at(rows, math.inf),
        "grid": [
            {"weight": round(w, 4), "f1": s["all"]["f1"], "null_rate": s["null_rate"]}
            for w in GRID
            for s in [score_at(rows, w)]
        ],
    }


def calibrate(
    data: Sequence[Path],
    split: str,
    model: str | None,
    cache_dir: Path | None = None,
    threads: int = 2,
    limit: int | None = None,
    pipeline: bool = False,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores on the own review (the reader alone) and, with `pipeline`, behind the server's
    pipeline; the weight is chosen on the pipeline's when it ran (what a user gets)."""
    from qaserve.config import ReaderConfig, default_cache_dir
    from qaserve.deployments.reader import Reader
    from qaserve.subjqa import load_subjqa

    examples = load_subjqa(list(data), split=split)
    if limit is not None:  # the first N of each domain, as the pipeline's load_domain
        counts: dict[str, int] = {}
        kept = []
        for ex in examples:
            counts[ex.domain] = counts.get(ex.domain, 0) + 1
            if counts[ex.domain] <= limit:
                kept.append(ex)
        examples = kept
    if not examples:
        raise SystemExit(f"no {split} questions under {', '.join(map(str, data))}")
    cfg = ReaderConfig(null_weight=1.0, **({"model": model} if model else {}))
    reader = Reader(cfg, Path(cache_dir or default_cache_dir()), threads=threads)
    results: dict[str, list[dict[str, Any]]] = {"reader": read_scores(reader, examples, progress)}
    if pipeline:
        extra = {"reader.model": str(cfg.model), **(settings or {})}
        rows: list[dict[str, Any]] = []
        for d in data:
            rows += pipeline_scores(Path(d), split, extra, limit, progress)
        results["pipeline"] = rows
    by = results["pipeline" if pipeline else "reader"]
    chosen = best_weight(by)["weight"]
    return {
        "held_out": held_out(by),
        "null_weight": chosen,
        "model": str(cfg.model),
        "selected_on": {
            "data": [str(d) for d in data],
            "split": split,
            "by": "pipeline" if pipeline else "reader",
            "settings": settings or {},
        },
        **{k: _summary(v, chosen) for k, v in results.items()},
    }


def _line(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name:<18} F1 {s['all']['f1']:.3f}  EM {s['all']['em']:.3f}  "
        f"answerable F1 {s.get('has_answer', {}).get('f1', float('nan')):.3f}  "
        f"unanswerable {s.get('no_answer', {}).get('f1', float('nan')):.3f}  "
        f"null rate {s['null_rate']:.2f}"
    )


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True, help="SubjQA folders/CSVs")
    p.add_argument("--split", default="dev", help="selection split (default dev)")
    p.add_argument("--model", default=None, help="reader folder/checkpoint (default: shipped)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="also run the server's pipeline (book protocol) and choose the weight on it",
    )
    add_settings(p, "store.retrieval=bm25")
    p.add_argument("--write", action="store_true", help="write calibration.json beside the model")
    p.add_argument("--output", type=Path, default=None, help="write the whole report (JSON) here")
    p.add_argument("--name", default=None, help="this reader on the plot (default: its folder)")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG: dev F1 against the null rate as the weight moves, this reader and --compare",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="another reader's report (--output or calibration.json) on the plot; repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def plot_tradeoffs(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Each reader's dev F1 against how often it abstains, as its no-answer weight sweeps the
    grid. Readers that lie on one curve read equally well and differ only in their threshold;
    a better reader sits above the others at the same null rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rep) in enumerate(reports.items()):
        part = rep["reader"]
        grid = sorted(part["grid"], key=lambda g: g["null_rate"])
        color = f"C{i % 10}"
        ax.plot(
            [g["null_rate"] for g in grid],
            [100 * g["f1"] for g in grid],
            color=color,
            label=f"{name} (best {100 * part['chosen']['all']['f1']:.1f} at weight "
            f"{part['chosen']['weight']:.3g}; {100 * part['at_1']['all']['f1']:.1f} at 1)",
        )
        ax.scatter(part["at_1"]["null_rate"], 100 * part["at_1"]["all"]["f1"], color=color, s=30)
        ax.scatter(
            part["chosen"]["null_rate"], 100 * part["chosen"]["all"]["f1"], color=color, marker="*"
        )
    first = next(iter(reports.values()))["reader"]
    base = first["always_no_answer"]
    ax.axhline(100 * base["all"]["f1"], color="grey", ls="--", lw=1, label="always no answer")
    ax.set_xlabel("null rate (share of questions answered 'no answer')")
    ax.set_ylabel("dev F1, SQuAD 2.0 official (%)")
    ax.set_title(
        f"no-answer weight sweep, {first['questions']} dev questions (dot: weight 1, star: best)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _named_reports(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    from qaserve.errors import ConfigError

    try:
        paths = named_paths(specs, "--compare", "JSON")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    out = {}
    for name, path in paths.items():
        rep = json.loads(path.read_text())
        if "grid" not in rep.get("reader", {}):
            raise SystemExit(f"{path}: not a calibrate-reader report")
        out[name] = rep
    return out


def _cmd(args: argparse.Namespace) -> int:
    from qaserve.deployments.reader import CALIBRATION_NAME

    if args.split == "test":
        print("calibrate-reader: select on dev, not test", file=sys.stderr)
        return 2
    others = _named_reports(args.compare)
    res = calibrate(
        args.data,
        args.split,
        args.model,
        args.cache_dir,
        args.threads,
        args.limit,
        pipeline=args.pipeline,
        settings=dict(args.settings),
        progress=not args.quiet,
    )
    for part in ("reader", "pipeline"):
        if part in res:
            print(f"-- {part} ({res[part]['questions']} questions)")
            print(_line("always no answer", res[part]["always_no_answer"]))
            print(_line("weight 1.0", res[part]["at_1"]))
            print(_line(f"weight {res['null_weight']:.3g}", res[part]["chosen"]))
    for c in res["held_out"]:
        print(
            f"held out {c['domain']:<14} weight {c['weight']:.3g} (fitted on the others): "
            f"F1 {c['f1_at_1']:.3f} -> {c['f1']:.3f} ({100 * c['gain']:+.1f})"
        )
    if args.write:
        path = Path(res["model"]) / CALIBRATION_NAME
        if transfers(res):
            path.write_text(json.dumps(res, indent=1) + "\n")
            print(f"wrote {path}")
        else:
            path.unlink(missing_ok=True)
            print(
                f"not written: the weight hurts a held-out dev domain, so the reader keeps "
                f"weight 1 (no {path})"
            )
    else:
        print(json.dumps({"null_weight": res["null_weight"]}))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.output}")
    if args.plot is not None:
        plot_tradeoffs({args.name or Path(res["model"]).name: res, **others}, args.plot)
        print(f"wrote {args.plot}")
    return 0


COMMAND = Command(
    "calibrate-reader",
    "fit the reader's no-answer weight on SubjQA dev splits",
    _add_args,
    _cmd,
    module="qaserve.offline.calibrate_reader",
    doc=__doc__,
)
register = COMMAND.register
main = COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
