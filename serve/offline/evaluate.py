"""`qaserve eval`: the book's evaluation protocol on SubjQA CSVs.

- retriever: every unique review of the domain indexed with its item_id; each question
  retrieves among its item's reviews only (a metadata filter); relevant = its own review.
  recall@k (k = 1, 3, 5, 10) and mAP for dense, BM25 and hybrid retrieval, plus a plot;
- reader alone on the gold review: EM / F1 of the top-1 answer (no-answer allowed), split
  into answerable and unanswerable questions;
- retriever + reader: top-1 answer over the top-k retrieved reviews;
- generator (RAG-Token) and the ensemble's final answer on the same questions (a subset:
  generation is the slow stage on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qaserve.metrics import average_precision, mean, recall_at_k, squad_em_f1

if TYPE_CHECKING:
    from qaserve_client.schema import RetrievalMode

KS = (1, 3, 5, 10)
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


def _answerable(ex: Any) -> bool:
    return any(a.text for a in ex.answers)


def _score(preds: Sequence[str], examples: Sequence[Any]) -> dict[str, Any]:
    rows = [
        (squad_em_f1(p, _golds(ex)), _answerable(ex)) for p, ex in zip(preds, examples, strict=True)
    ]

    def agg(sel: list[tuple[tuple[float, float], bool]]) -> dict[str, Any]:
        return {
            "n": len(sel),
            "em": round(mean(r[0][0] for r in sel), 4),
            "f1": round(mean(r[0][1] for r in sel), 4),
        }

    return {
        "all": agg(rows),
        "answerable": agg([r for r in rows if r[1]]),
        "unanswerable": agg([r for r in rows if not r[1]]),
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
    top_k_retriever: int = 3,
    pipeline_retrieval: str = "hybrid",
    generator_limit: int = 40,
    max_new_tokens: int = 24,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from qaserve.config import EngineConfig
    from qaserve.runtime.local import Engine
    from qaserve.subjqa import load_subjqa, unique_reviews
    from qaserve_client.schema import QueryRequest, ReadDocument, ReadResponse

    examples = load_subjqa(path, split=split)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise SystemExit(f"no questions found in {path}")
    domain = examples[0].domain or Path(path).stem
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="qaserve-eval-")
        data_dir = Path(tmp.name)
    overrides: dict[str, Any] = {"data_dir": data_dir}
    if reader_model:
        overrides["reader.model"] = reader_model
    engine = Engine(EngineConfig.load(None, **overrides))
    collection = f"eval_{domain}"
    report: dict[str, Any] = {
        "data": str(path),
        "split": split or Path(path).stem,
        "domain": domain,
        "questions": len(examples),
        "answerable": sum(_answerable(e) for e in examples),
    }
    t0 = time.perf_counter()
    try:
        docs = unique_reviews(examples)
        engine.ingest(docs, collection=collection, progress=progress)
        report["reviews_indexed"] = len(docs)
        report["ingest_s"] = round(time.perf_counter() - t0, 1)

        # Retriever, three ways.
        retr: dict[str, Any] = {}
        for mode in MODES:
            recalls: dict[int, list[float]] = {k: [] for k in KS}
            aps: list[float] = []
            t = time.perf_counter()
            for ex in tqdm(examples, desc=f"retrieve ({mode})", disable=not progress):
                hits = engine.retriever.retrieve(
                    ex.question,
                    top_k=max(KS),
                    filters={"item_id": ex.item_id},
                    collection=collection,
                    mode=mode,
                )
                ranked = _doc_ranking(hits)
                for k in KS:
                    recalls[k].append(recall_at_k(ranked, {ex.review_id}, k))
                aps.append(average_precision(ranked, {ex.review_id}))
            retr[mode] = {f"recall@{k}": round(mean(v), 4) for k, v in recalls.items()}
            retr[mode]["mAP"] = round(mean(aps), 4)
            retr[mode]["ms_per_query"] = round((time.perf_counter() - t) * 1000 / len(examples), 2)
        report["retriever"] = retr

        # Reader alone on the gold review.
        preds = []
        t = time.perf_counter()
        for ex in tqdm(examples, desc="reader (gold review)", disable=not progress):
            out = engine.reader.read(
                ex.question,
                [ReadDocument(id=ex.review_id, text=ex.context)],
                top_k=1,
                handle_impossible_answer=True,
            )
            preds.append(out.answers[0].answer if out.answers else "")
        report["reader"] = _score(preds, examples)
        report["reader"]["ms_per_question"] = round(
            (time.perf_counter() - t) * 1000 / len(examples), 2
        )
        report["reader"]["model"] = engine.reader.info().model_dump()

        # Retriever + reader, then generator and ensemble: the server's own query pipeline.
        def ask(ex: Any, mode: str, **settings: Any) -> Any:
            return engine.query(
                QueryRequest(
                    question=ex.question,
                    top_k_retriever=top_k_retriever,
                    filters={"item_id": ex.item_id},
                    collection=collection,
                    retrieval=pipeline_retrieval,
                    mode=mode,
                    **settings,
                )
            )

        preds, reads = [], []
        for ex in tqdm(examples, desc="retriever + reader", disable=not progress):
            resp = ask(ex, "extractive")
            reads.append(ReadResponse(answers=resp.answers, no_answer_score=resp.no_answer_score))
            preds.append(resp.answer.text)
        report["pipeline"] = _score(preds, examples)
        report["pipeline"].update(retrieval=pipeline_retrieval, top_k_retriever=top_k_retriever)

        # Generator and ensemble on a subset.
        n = min(generator_limit, len(examples))
        if n > 0:
            subset = examples[:n]
            gen_preds, ens_preds, rd_preds, gens = [], [], [], []
            t = time.perf_counter()
            for i, ex in enumerate(tqdm(subset, desc="generator + ensemble", disable=not progress)):
                resp = ask(ex, "ensemble", max_new_tokens=max_new_tokens)
                gen = resp.generated
                gens.append(gen)
                gen_preds.append(gen.text.strip() if gen is not None else "")
                ens_preds.append(resp.answer.text)
                rd_preds.append(preds[i])
            report["generator"] = _score(gen_preds, subset)
            report["generator"]["s_per_question"] = round((time.perf_counter() - t) / n, 2)
            report["ensemble"] = _score(ens_preds, subset)
            report["pipeline_on_subset"] = _score(rd_preds, subset)
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
    if domain == "electronics" and report["split"] == "test":
        report["book"] = BOOK_ELECTRONICS
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"SubjQA {report['domain']}/{report['split']}: {report['questions']} questions "
        f"({report['answerable']} answerable), {report.get('reviews_indexed', '?')} reviews",
        "",
        "retriever (item_id filter)  " + "  ".join(f"{'R@' + str(k):>6}" for k in KS) + "     mAP",
    ]
    for mode, figures in report["retriever"].items():
        name = {"sparse": "bm25"}.get(mode, mode)
        lines.append(
            f"  {name:<26}"
            + "  ".join(f"{figures[f'recall@{k}']:>6.3f}" for k in KS)
            + f"  {figures['mAP']:>6.3f}"
        )
    if "book" in report:
        b = report["book"]["retriever"]["bm25"]
        lines.append(
            "  book: bm25                " + "  ".join(f"{b[f'recall@{k}']:>6.3f}" for k in KS)
        )
    lines += [
        "",
        f"{'answers (top-1)':<34}{'EM':>6}{'F1':>7}   answerable EM/F1   unanswerable EM/F1",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        a, u, x = r["all"], r["answerable"], r["unanswerable"]
        return (
            f"  {name:<32}{a['em']:>6.3f}{a['f1']:>7.3f}   {u['em']:.3f} / {u['f1']:.3f}"
            f"      {x['em']:.3f} / {x['f1']:.3f}   (n={a['n']})"
        )

    lines.append(row("reader on the gold review", report["reader"]))
    p = report["pipeline"]
    lines.append(row(f"retriever ({p['retrieval']}, k={p['top_k_retriever']}) + reader", p))
    for key, name in (
        ("pipeline_on_subset", "  same, generator subset"),
        ("generator", "generator (RAG-Token)"),
        ("ensemble", "ensemble final answer"),
    ):
        if key in report:
            lines.append(row(name, report[key]))
    if "book" in report:
        b = report["book"]
        lines.append(
            f"  book: MiniLM reader, SubjQA only {b['reader_subjqa_only_minilm']['em']:>6.3f}"
            f"{b['reader_subjqa_only_minilm']['f1']:>7.3f}"
        )
        lines.append(
            f"  book: BM25 + reader pipeline    {b['pipeline_bm25_reader']['em']:>6.3f}"
            f"{b['pipeline_bm25_reader']['f1']:>7.3f}"
        )
    return "\n".join(lines)


def plot_recall(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, row in report["retriever"].items():
        ax.plot(
            KS,
            [row[f"recall@{k}"] for k in KS],
            marker="o",
            label={"sparse": "BM25"}.get(mode, mode),
        )
    if "book" in report:
        b = report["book"]["retriever"]
        ax.plot(KS, [b["bm25"][f"recall@{k}"] for k in KS], "k--", alpha=0.5, label="book: BM25")
        ks = [k for k in KS if f"recall@{k}" in b["dpr"]]
        ax.plot(ks, [b["dpr"][f"recall@{k}"] for k in ks], "k:", alpha=0.5, label="book: DPR")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title(f"Retriever recall@k, SubjQA {report['domain']}/{report['split']}")
    ax.set_xticks(KS)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate retriever, reader, pipeline and generator on SubjQA")
    p.add_argument("path", type=Path, help="a SubjQA domain folder or CSV file")
    p.add_argument("--split", default="test", help="split file in a domain folder (default test)")
    p.add_argument("--output", type=Path, default=Path("runs/eval"), help="folder for JSON + PNG")
    p.add_argument("--data-dir", type=Path, default=None, help="store folder (default: a temp dir)")
    p.add_argument("--reader", default=None, help="reader model (default: the shipped reader)")
    p.add_argument("--top-k-retriever", type=int, default=3)
    p.add_argument("--pipeline-retrieval", choices=MODES, default="hybrid")
    p.add_argument("--generator-limit", type=int, default=40, help="questions for the generator")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)


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
    )
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{report['domain']}-{report['split'] or 'file'}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot_recall(report, args.output / f"{stem}-recall.png")
    print(format_table(report))
    print(f"\nwrote {args.output / (stem + '.json')} and {stem}-recall.png", file=sys.stderr)
    return 0
