"""`qaserve eval`: the book's evaluation protocol on SubjQA (qaserve.offline.protocol).

- corpus: every unique review of the domain from all its splits, with item_id; each question
  retrieves among its item's reviews only;
- retriever: strict and book-style recall@k (k = 1, 3, 5, 10) and mAP for dense, BM25 and
  hybrid retrieval, beside the random ranking of the item's reviews, plus a plot;
- answers, SQuAD 2.0's official rule as the headline (empty golds drop out when a question
  has a span) and the lenient best-over-all-golds figure beside it, split into answerable
  and unanswerable: the reader on the question's own review, the server's query pipeline,
  and two baselines: always "no answer", and the reader on a random review of the item;
- generator (RAG-Token) and the ensemble's final answer on a subset (generation is the slow
  stage on CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qaserve.metrics import average_precision, mean, squad_em_f1
from qaserve.offline.command import Command, add_settings
from qaserve.offline.protocol import (
    KS,
    answerable,
    item_query,
    load_domain,
    random_rankings,
    recall_table,
)

if TYPE_CHECKING:
    from qaserve_client.schema import RetrievalMode

MODES: tuple[RetrievalMode, ...] = ("dense", "sparse", "hybrid")
# The book's figures on electronics/test (../shared/data/subjqa/README.md), for reference.
BOOK_ELECTRONICS = {
    "retriever": {
        "bm25": {"recall@1": 0.891, "recall@3": 0.955, "recall@5": 0.982, "recall@10": 0.991},
        "dpr": {"recall@1": 0.830, "recall@3": 0.955, "recall@5": 0.979},
    },
    "reader_subjqa_only_minilm": {"em": 0.127, "f1": 0.307},
    "reader_squad_then_subjqa": {"em": 0.327, "f1": 0.518},
    "pipeline_bm25_reader": {"em": 0.230, "f1": 0.431},
}


def _golds(ex: Any) -> list[str]:
    return [a.text for a in ex.answers] or [""]


def generated_answer(generated: Any) -> str:
    """The generator's text as scored: a trained generator says "no answer" with its fixed
    no-answer text (deployments/prior.py), which SQuAD 2.0 scoring must see as empty."""
    from qaserve.deployments.prior import is_no_answer

    text = generated.text.strip() if generated is not None else ""
    return "" if is_no_answer(text) else text


def _score(preds: Sequence[str], examples: Sequence[Any]) -> dict[str, Any]:
    """EM/F1 by SQuAD 2.0's official rule, with the lenient figure (best over every gold,
    "no answer" included) beside it, for all questions and for each half."""
    rows = []
    for p, ex in zip(preds, examples, strict=True):
        official = squad_em_f1(p, _golds(ex))
        lenient = squad_em_f1(p, _golds(ex), official=False)
        rows.append((official, lenient, answerable(ex)))

    def agg(sel: list[Any]) -> dict[str, Any]:
        return {
            "n": len(sel),
            "em": round(mean(r[0][0] for r in sel), 4),
            "f1": round(mean(r[0][1] for r in sel), 4),
            "lenient_em": round(mean(r[1][0] for r in sel), 4),
            "lenient_f1": round(mean(r[1][1] for r in sel), 4),
        }

    return {
        "all": agg(rows),
        "answerable": agg([r for r in rows if r[2]]),
        "unanswerable": agg([r for r in rows if not r[2]]),
    }


def _sweep(ensemble: Any, reads: list[Any], gens: list[Any], examples: list[Any]) -> dict[str, Any]:
    """Ensemble EM/F1 for several reader thresholds: pick the default on dev splits."""
    from qaserve.deployments.ensemble import Ensemble

    out: dict[str, Any] = {}
    for threshold in (0.0, 0.05, 0.1, 0.15, 0.25, 0.4):
        cfg = ensemble.cfg.model_copy(update={"reader_threshold": threshold})
        ens = Ensemble(cfg)
        preds = [ens.combine("ensemble", r, g).text for r, g in zip(reads, gens, strict=True)]
        out[str(threshold)] = _score(preds, examples)["all"]
    return out


def _doc_ranking(hits: Sequence[Any]) -> list[str]:
    """Passage hits to a ranked list of distinct document ids."""
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.id, None)
    return list(seen)


def evaluate(
    path: Path,
    split: str | None = "test",
    data_dir: Path | None = None,
    reader_model: str | None = None,
    top_k_retriever: int | None = None,
    pipeline_retrieval: str | None = None,
    generator_limit: int = 40,
    max_new_tokens: int = 24,
    limit: int | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    compare_modes: bool = False,
) -> dict[str, Any]:
    """Unset pipeline options (top_k_retriever, retrieval) mean the server's configured
    values: the eval measures what a default query gets. `settings` are dotted config
    overrides (`--set reader.no_answer=best_document`). `compare_modes` also runs the
    pipeline with each retrieval mode, to choose the default on dev."""
    from tqdm.auto import tqdm

    from qaserve.config import EngineConfig
    from qaserve.runtime.local import Engine
    from qaserve_client.schema import ReadDocument, ReadResponse

    domain = load_domain(path, split, limit)
    examples = domain.questions
    if not examples:
        raise SystemExit(f"no questions found in {path}")
    name = examples[0].domain or Path(path).stem
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="qaserve-eval-")
        data_dir = Path(tmp.name)
    overrides: dict[str, Any] = {"data_dir": data_dir, **(settings or {})}
    if reader_model:
        overrides["reader.model"] = reader_model
    engine = Engine(EngineConfig.load(None, **overrides))
    collection = f"eval_{name}"
    report: dict[str, Any] = {
        "data": str(path),
        "split": split or Path(path).stem,
        "domain": name,
        "questions": len(examples),
        "answerable": sum(answerable(e) for e in examples),
        "corpus_splits": domain.corpus_splits,
        "settings": {k: v for k, v in overrides.items() if k != "data_dir"},
    }
    t0 = time.perf_counter()
    try:
        engine.ingest(domain.reviews, collection=collection, progress=progress)
        report["reviews_indexed"] = len(domain.reviews)
        report["ingest_s"] = round(time.perf_counter() - t0, 1)

        # Retriever, three ways, beside the random ranking of the item's reviews.
        retr: dict[str, Any] = {}
        for mode in MODES:
            ranked: dict[str, list[str]] = {}
            t = time.perf_counter()
            for ex in tqdm(examples, desc=f"retrieve ({mode})", disable=not progress):
                hits = engine.retriever.retrieve(
                    ex.question,
                    top_k=max(KS),
                    filters={"item_id": ex.item_id},
                    collection=collection,
                    mode=mode,
                )
                ranked[ex.id] = _doc_ranking(hits)
            retr[mode] = _retrieval_row(ranked, domain)
            retr[mode]["ms_per_query"] = round((time.perf_counter() - t) * 1000 / len(examples), 2)
        retr["random"] = _retrieval_row(random_rankings(domain), domain)
        report["retriever"] = retr

        def read_one(ex: Any, review_id: str) -> str:
            out = engine.reader.read(
                ex.question,
                [ReadDocument(id=review_id, text=domain.texts[review_id])],
                top_k=1,
                handle_impossible_answer=True,
            )
            return out.answers[0].answer if out.answers else ""

        # The reader alone on the question's own review: the ceiling retrieval aims for.
        t = time.perf_counter()
        preds = [
            read_one(ex, ex.review_id)
            for ex in tqdm(examples, desc="reader (own review)", disable=not progress)
        ]
        report["reader"] = _score(preds, examples)
        report["reader"]["ms_per_question"] = round(
            (time.perf_counter() - t) * 1000 / len(examples), 2
        )
        report["reader"]["model"] = engine.reader.info().model_dump()

        # Baselines: always "no answer"; the reader on a random review of the item.
        rng = random.Random(0)
        report["always_no_answer"] = _score([""] * len(examples), examples)
        preds = [
            read_one(ex, rng.choice(domain.by_item[ex.item_id]))
            for ex in tqdm(examples, desc="reader (random review)", disable=not progress)
        ]
        report["random_review"] = _score(preds, examples)

        # Retriever + reader, then generator and ensemble: the server's own query pipeline.
        def ask(ex: Any, mode: str, **kw: Any) -> Any:
            """One query with the caller's options; unset ones are the server's."""
            options = {"top_k_retriever": top_k_retriever, "retrieval": pipeline_retrieval, **kw}
            return engine.query(item_query(ex, collection, mode, **options))

        preds, reads, latencies = [], [], []
        for ex in tqdm(examples, desc="retriever + reader", disable=not progress):
            t = time.perf_counter()
            resp = ask(ex, "extractive")
            latencies.append(time.perf_counter() - t)
            reads.append(ReadResponse(answers=resp.answers, no_answer_score=resp.no_answer_score))
            preds.append(resp.answer.text)
        report["pipeline"] = _score(preds, examples)
        report["pipeline"].update(
            retrieval=pipeline_retrieval or "configured",
            top_k_retriever=top_k_retriever or "configured",
            p50_ms=_p50_ms(latencies),
        )

        if compare_modes:  # per question, each mode in turn: latencies side by side
            got: dict[str, tuple[list[str], list[float]]] = {m: ([], []) for m in MODES}
            for ex in tqdm(examples, desc="pipeline, each mode", disable=not progress):
                for mode in MODES:
                    t = time.perf_counter()
                    got[mode][0].append(ask(ex, "extractive", retrieval=mode).answer.text)
                    got[mode][1].append(time.perf_counter() - t)
            report["pipeline_by_mode"] = {
                m: {**_score(p_, examples), "p50_ms": _p50_ms(lat)} for m, (p_, lat) in got.items()
            }

        # Generator and ensemble on a subset. Each question asks ensemble mode, then extractive
        # mode again: their latencies come side by side, under the same load.
        n = min(generator_limit, len(examples))
        if n > 0:
            scoring = engine.pipeline.ensemble.cfg.generator_use == "score"
            subset = examples[:n]
            gen_preds, ens_preds, rd_preds, gens = [], [], [], []
            ens_s, ext_s = [], []
            t = time.perf_counter()
            for i, ex in enumerate(tqdm(subset, desc="generator + ensemble", disable=not progress)):
                t1 = time.perf_counter()
                resp = ask(ex, "ensemble", max_new_tokens=max_new_tokens)
                ens_s.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                ask(ex, "extractive")
                ext_s.append(time.perf_counter() - t1)
                gen = resp.generated
                gens.append(gen)
                gen_preds.append(generated_answer(gen))
                ens_preds.append(resp.answer.text)
                rd_preds.append(preds[i])
            if not scoring:  # scoring mode generates no text: no generator-alone figure
                report["generator"] = _score(gen_preds, subset)
                report["generator"]["s_per_question"] = round((time.perf_counter() - t) / n, 2)
            report["ensemble"] = _score(ens_preds, subset)
            report["ensemble"].update(
                generator_use=engine.pipeline.ensemble.cfg.generator_use,
                policy=str(engine.pipeline.ensemble.cfg.policy or "hand-set rules"),
                p50_ms=_p50_ms(ens_s),
            )
            report["pipeline_on_subset"] = _score(rd_preds, subset)
            report["pipeline_on_subset"]["p50_ms"] = _p50_ms(ext_s)
            if not scoring and engine.pipeline.ensemble.cfg.policy is None:
                report["ensemble_threshold_sweep"] = _sweep(
                    engine.pipeline.ensemble, reads[:n], gens, subset
                )
            report["generator_examples"] = [
                {"question": ex.question, "gold": _golds(ex)[:3], "generated": g, "ensemble": e}
                for ex, g, e in list(zip(subset, gen_preds, ens_preds, strict=True))[:5]
            ]
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if name == "electronics" and report["split"] == "test":
        report["book"] = BOOK_ELECTRONICS
    return report


def _p50_ms(seconds: list[float]) -> float:
    return round(1000 * sorted(seconds)[len(seconds) // 2], 1)


def _retrieval_row(ranked: dict[str, list[str]], domain: Any) -> dict[str, Any]:
    row: dict[str, Any] = recall_table(ranked, domain.questions, domain.texts, KS)
    aps = [average_precision(ranked[ex.id], {ex.review_id}) for ex in domain.questions]
    row["mAP"] = round(mean(aps), 4)
    return row


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"SubjQA {report['domain']}/{report['split']}: {report['questions']} questions "
        f"({report['answerable']} answerable); corpus {report.get('reviews_indexed', '?')} "
        f"reviews from {'+'.join(report.get('corpus_splits', []))}, item_id filter",
        "",
    ]
    book = report.get("book", {}).get("retriever", {}).get("bm25")
    for kind, title in (
        ("strict", "strict recall@k: the question's own review"),
        ("book", "book-style recall@k: a review holding a gold span (official golds)"),
        ("book_lenient", "book-style recall@k, lenient (any 'no answer' label: found)"),
    ):
        lines.append(f"{title:<34}" if len(title) < 34 else title)
        lines.append(f"  {'':<26}" + "".join(f"{'@' + str(k):>7}" for k in KS))
        rows = [
            (_MODE_NAMES.get(m, m), [r[f"{kind}@{k}"] for k in KS])
            for m, r in report["retriever"].items()
        ]
        if kind != "strict" and book:
            rows.append(("book: Elasticsearch BM25", [book[f"recall@{k}"] for k in KS]))
        lines += [f"  {name:<26}" + "".join(f"{v:>7.3f}" for v in vals) for name, vals in rows]
    lines.append(
        "mAP (the own review): "
        + ", ".join(
            f"{_MODE_NAMES.get(m, m)} {r['mAP']:.3f}" for m, r in report["retriever"].items()
        )
    )
    lines += [
        "",
        f"answers (top-1), SQuAD 2.0 official{'EM':>8}{'F1':>7}  | lenient EM/F1"
        "  | answerable EM/F1 | unanswerable EM/F1",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        a, u, x = r["all"], r["answerable"], r["unanswerable"]
        return (
            f"  {name:<34}{a['em']:>8.3f}{a['f1']:>7.3f}  |  {a['lenient_em']:.3f} / "
            f"{a['lenient_f1']:.3f} |  {u['em']:.3f} / {u['f1']:.3f}   |  {x['em']:.3f} / "
            f"{x['f1']:.3f}   (n={a['n']})"
        )

    p = report["pipeline"]
    by_mode = {
        f"pipeline/{m}": (f"  retrieval={_MODE_NAMES.get(m, m)}, p50 {r['p50_ms']} ms", r)
        for m, r in report.get("pipeline_by_mode", {}).items()
    }
    for key, name in (
        ("reader", "reader on the question's own review"),
        ("pipeline", f"pipeline ({p['retrieval']}, k={p['top_k_retriever']})"),
        ("always_no_answer", "baseline: always no answer"),
        ("random_review", "baseline: reader on a random review"),
        ("pipeline_on_subset", "pipeline, generator subset"),
        ("generator", "generator (RAG-Token)"),
        ("ensemble", "ensemble final answer"),
    ):
        if key in report:
            lines.append(row(name, report[key]))
        if key == "pipeline":
            lines += [row(n, r) for n, r in by_mode.values()]
    lines.append(f"  pipeline p50 {p['p50_ms']} ms per query (in-process)")
    if "ensemble" in report and "p50_ms" in report["ensemble"]:
        e = report["ensemble"]
        lines.append(
            f"  on the generator subset, question by question: ensemble ({e['generator_use']}, "
            f"{e['policy']}) p50 {e['p50_ms']} ms, extractive p50 "
            f"{report['pipeline_on_subset']['p50_ms']} ms"
        )
    if "book" in report:
        b = report["book"]
        lines.append(
            f"  book: BM25 + reader pipeline      {b['pipeline_bm25_reader']['em']:>8.3f}"
            f"{b['pipeline_bm25_reader']['f1']:>7.3f}"
        )
    return "\n".join(lines)


_MODE_NAMES = {"sparse": "bm25", "random": "random review"}


def plot_recall(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("strict", "book"), strict=True):
        for mode, row in report["retriever"].items():
            ax.plot(
                KS,
                [row[f"{kind}@{k}"] for k in KS],
                marker="o",
                linestyle=":" if mode == "random" else "-",
                label=_MODE_NAMES.get(mode, mode),
            )
        if kind == "book" and "book" in report:
            b = report["book"]["retriever"]
            ax.plot(
                KS, [b["bm25"][f"recall@{k}"] for k in KS], "k--", alpha=0.5, label="book: BM25"
            )
            ks = [k for k in KS if f"recall@{k}" in b["dpr"]]
            ax.plot(ks, [b["dpr"][f"recall@{k}"] for k in ks], "k:", alpha=0.5, label="book: DPR")
        ax.set_xlabel("k")
        ax.set_title(f"{kind} recall@k")
        ax.set_xticks(KS)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("recall@k")
    fig.suptitle(f"Retriever, SubjQA {report['domain']}/{report['split']} (item_id filter)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        type=Path,
        help="a SubjQA domain folder (SubjQA/<domain>/splits/ of megagonlabs/SubjQA, or a "
        "folder with its train/dev/test.csv) or one CSV",
    )
    p.add_argument("--split", default="test", help="split file in a domain folder (default test)")
    p.add_argument("--output", type=Path, default=Path("runs/eval"), help="folder for JSON + PNG")
    p.add_argument("--data-dir", type=Path, default=None, help="store folder (default: a temp dir)")
    p.add_argument("--reader", default=None, help="reader model (default: the shipped reader)")
    p.add_argument(
        "--top-k-retriever", type=int, default=None, help="default: the configured value"
    )
    p.add_argument(
        "--pipeline-retrieval", choices=MODES, default=None, help="default: the configured mode"
    )
    add_settings(p, "reader.no_answer_margin=1.5")
    p.add_argument(
        "--compare-modes",
        action="store_true",
        help="also run the pipeline with each retrieval mode (choose the default on dev)",
    )
    p.add_argument("--generator-limit", type=int, default=40, help="questions for the generator")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--tag", default="", help="suffix for the output files")
    p.add_argument("--quiet", action="store_true")


def _cmd(args: argparse.Namespace) -> int:
    report = evaluate(
        args.path,
        split=args.split if args.path.is_dir() else None,
        data_dir=args.data_dir,
        reader_model=args.reader,
        top_k_retriever=args.top_k_retriever,
        pipeline_retrieval=args.pipeline_retrieval,
        generator_limit=args.generator_limit,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        progress=not args.quiet,
        settings=dict(args.settings),
        compare_modes=args.compare_modes,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{report['domain']}-{report['split'] or 'file'}{'-' + args.tag if args.tag else ''}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot_recall(report, args.output / f"{stem}-recall.png")
    print(format_table(report))
    print(f"\nwrote {args.output / (stem + '.json')} and {stem}-recall.png", file=sys.stderr)
    return 0


COMMAND = Command(
    "eval",
    "evaluate retriever, reader, pipeline and generator on SubjQA",
    _add_args,
    _cmd,
    module="qaserve.offline.evaluate",
    doc=__doc__,
)
register = COMMAND.register
