"""`qaserve train-retriever`: fine-tune the retriever's bi-encoder on SubjQA, selected on dev.

Each training question of the chosen domains' train splits is paired with its own review
(the whole review, or with `--passage window` the store's 200-token window that holds its
answer) and K hard negatives: other reviews of the SAME item, which are exactly the
candidates the item filter leaves at query time. MultipleNegativesRankingLoss then scores
each question against every passage of the batch (in-batch negatives) plus the hard ones.
Batches never hold one review or one question text twice, since a duplicate would be a
negative identical to the positive. Only train-split reviews are trained on; a question whose
item has fewer than K other train reviews gets the rest from other items of its domain.

Selection is on dev only, on the book's protocol: every unique review of a domain (train, dev
and test) is a candidate, each dev question ranks its own item's reviews by cosine at the
serving window (EmbedderConfig.max_seq_length), scored by `bench_encoder.recall_table`.
Only the reviews of items that dev questions ask about are embedded; the rankings are the
same as with the whole domain indexed. The best model by pooled dev strict@1 (ties: @3),
the untrained one included, is kept in OUTPUT/best, a sentence-transformers folder for
`EmbedderConfig(model=...)` on torch or ONNX.

A plain torch loop (the library's trainer needs `datasets`): checkpoints (model, optimizer,
scheduler, step, torch RNG) go to OUTPUT/checkpoint every `--checkpoint-every` steps, at each
eval and on Ctrl-C; rerunning the same command continues from there. Batches are a function
of (seed, epoch) only, so a resumed run takes the same steps as an uninterrupted one.

    flock /tmp/qaserve-measure.lock qaserve train-retriever --data SubjQA --output runs/retriever
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.errors import BadRequest
from qaserve.offline.command import Command
from qaserve.offline.protocol import Domain, load_domain, random_rankings, recall_table
from qaserve.subjqa import QAExample, load_subjqa
from qaserve.threads import bound_threads

PASSAGES = ("review", "window")
STATE = "state.pt"


@dataclass
class TrainPair:
    """One training row: (question, positive, negatives...) and where each text came from."""

    question: str
    positive: str
    review_id: str
    item_id: str
    domain: str
    negatives: list[str] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)
    other_item: int = 0  # negatives taken from other items (the item had too few reviews)

    def keys(self) -> set[str]:
        """What must not repeat inside a batch: every review and the question's words."""
        return {self.review_id, *self.negative_ids, "q:" + " ".join(self.question.lower().split())}


@dataclass
class DevSet:
    """Dev questions of each domain against its whole corpus (qaserve.offline.protocol)."""

    domains: dict[str, Domain]

    @property
    def examples(self) -> list[QAExample]:
        return [ex for d in self.domains.values() for ex in d.questions]

    def candidates(self) -> dict[str, str]:
        """Review id -> text for the reviews of the items that dev questions ask about."""
        out: dict[str, str] = {}
        for d in self.domains.values():
            for item in {ex.item_id for ex in d.questions}:
                out.update((r, d.texts[r]) for r in d.by_item[item])
        return out


def _is_domain(path: Path) -> bool:
    return (path / "train.csv").is_file() or (path / "splits" / "train.csv").is_file()


def find_domains(data: Path, domains: Sequence[str] | None = None) -> list[Path]:
    """Domain folders under `data` (ours: <domain>/train.csv; megagonlabs/SubjQA's:
    <domain>/splits/train.csv), or `data` itself when it is one."""
    data = Path(data)
    if _is_domain(data):
        found = {data.name: data}
    else:
        found = (
            {p.name: p for p in sorted(data.iterdir()) if _is_domain(p)} if data.is_dir() else {}
        )
    if not found:
        raise BadRequest(f"--data {data}: no <domain>/train.csv under it", field="data")
    if domains:
        missing = sorted(set(domains) - set(found))
        if missing:
            raise BadRequest(
                f"--domains {missing} not under {data} (found {sorted(found)})", field="domains"
            )
        found = {d: found[d] for d in domains}
    for name, path in found.items():
        if not ((path / "dev.csv").is_file() or (path / "splits" / "dev.csv").is_file()):
            raise BadRequest(f"{name}: no dev.csv to select on", field="data")
    return list(found.values())


def _key(ex: QAExample) -> tuple[str, str]:
    return (ex.domain, ex.item_id)


def answer_window(ex: QAExample, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """The window holding the question's first answer whole (else its start); the head if none."""
    answers = [a for a in ex.answers if a.text]
    if not answers:
        return spans[0]
    a = answers[0]
    for s, e in spans:
        if s <= a.start and a.end <= e:
            return (s, e)
    for s, e in spans:
        if s <= a.start < e:
            return (s, e)
    return spans[0]


def build_pairs(
    train: Sequence[QAExample],
    hard_negatives: int,
    rng: random.Random,
    passage: str = "review",
    spans: Callable[[str], list[tuple[int, int]]] | None = None,
    pool: Sequence[QAExample] | None = None,
) -> list[TrainPair]:
    """(question, own review, K other reviews of its item) rows from train-split examples.

    A negative is never the positive review nor a copy of its text. With `passage="window"`,
    `spans` (the store's splitter) cuts reviews: the positive is the answer's window, each
    negative a random window of its review. Negatives come from the reviews of `pool`
    (default: `train`), so a sample of the questions still sees every review of the item.
    """
    if passage not in PASSAGES:
        raise ValueError(f"passage must be one of {PASSAGES}")
    texts: dict[str, str] = {}
    by_item: dict[tuple[str, str], list[str]] = {}
    by_domain: dict[str, list[str]] = {}
    owner: dict[str, tuple[str, str]] = {}
    for ex in [*train, *(pool or [])]:
        if ex.review_id not in texts:
            texts[ex.review_id] = ex.context
            owner[ex.review_id] = _key(ex)
            by_item.setdefault(_key(ex), []).append(ex.review_id)
            by_domain.setdefault(ex.domain, []).append(ex.review_id)
    cut: dict[str, list[tuple[int, int]]] = {}

    def windows(rid: str) -> list[tuple[int, int]]:
        if rid not in cut:
            assert spans is not None
            cut[rid] = spans(texts[rid]) or [(0, len(texts[rid]))]
        return cut[rid]

    if passage == "window" and spans is None:
        raise ValueError("passage='window' needs the splitter's spans")
    pairs: list[TrainPair] = []
    for ex in train:
        pos_text = texts[ex.review_id]
        same = [
            r
            for r in by_item[_key(ex)]
            if r != ex.review_id and texts[r].strip() != pos_text.strip()
        ]
        negs = rng.sample(same, min(hard_negatives, len(same)))
        other = 0
        if len(negs) < hard_negatives:
            others = [
                r
                for r in by_domain[ex.domain]
                if owner[r] != _key(ex) and texts[r].strip() != pos_text.strip()
            ]
            extra = rng.sample(others, min(hard_negatives - len(negs), len(others)))
            other = len(extra)
            negs += extra
        if len(negs) < hard_negatives:
            continue  # a domain of one item with one review: nothing to contrast with
        if passage == "window":
            s, e = answer_window(ex, windows(ex.review_id))
            positive = pos_text[s:e]
            neg_texts = []
            for r in negs:
                s, e = rng.choice(windows(r))
                neg_texts.append(texts[r][s:e])
        else:
            positive, neg_texts = pos_text, [texts[r] for r in negs]
        pairs.append(
            TrainPair(
                question=ex.question,
                positive=positive,
                review_id=ex.review_id,
                item_id=ex.item_id,
                domain=ex.domain,
                negatives=neg_texts,
                negative_ids=list(negs),
                other_item=other,
            )
        )
    return pairs


def no_duplicate_batches(
    pairs: Sequence[TrainPair], batch_size: int, rng: random.Random
) -> list[list[TrainPair]]:
    """Shuffled batches in which no review id and no question text occurs twice."""
    remaining = list(pairs)
    rng.shuffle(remaining)
    batches: list[list[TrainPair]] = []
    while remaining:
        batch: list[TrainPair] = []
        seen: set[str] = set()
        rest: list[TrainPair] = []
        for i, pair in enumerate(remaining):
            if len(batch) == batch_size:
                rest.extend(remaining[i:])
                break
            keys = pair.keys()
            if keys & seen:
                rest.append(pair)
            else:
                batch.append(pair)
                seen |= keys
        batches.append(batch)
        remaining = rest
    return batches


def load_dev(domains: Sequence[Path], limit: int | None = None) -> DevSet:
    """Dev questions of the domains (the first `limit` of each), corpus from every split."""
    return DevSet({p.name: load_domain(p, "dev", limit) for p in domains})


def evaluate(
    model: Any,
    dev: DevSet,
    max_seq_length: int,
    windows: Callable[[str], list[tuple[int, int]]] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Pooled and per-domain strict / book-style recall@k of `model` on the dev set.

    A review is embedded whole (truncated at `max_seq_length`), or, given `windows` (the
    store's splitter), scored by its best window, as the served store ranks passages.
    """
    texts = dev.candidates()
    owners: list[str] = []
    units: list[str] = []
    for rid, text in texts.items():
        for s, e in windows(text) if windows else [(0, len(text))]:
            owners.append(rid)
            units.append(text[s:e])
    was = model.max_seq_length
    model.max_seq_length = max_seq_length
    try:

        def encode(batch: list[str]) -> np.ndarray:
            return np.asarray(
                model.encode(
                    batch,
                    batch_size=batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ),
                dtype=np.float32,
            )

        vecs = encode(units)
        qvecs = encode([ex.question for ex in dev.examples])
    finally:
        model.max_seq_length = was
    rows: dict[str, list[int]] = {}
    for i, rid in enumerate(owners):
        rows.setdefault(rid, []).append(i)
    ranked: dict[str, list[str]] = {}
    qi = 0
    for domain in dev.domains.values():
        for ex in domain.questions:
            ids = domain.by_item[ex.item_id]
            scores = [float((vecs[rows[r]] @ qvecs[qi]).max()) for r in ids]
            ranked[ex.id] = [ids[i] for i in np.argsort(-np.asarray(scores), kind="stable")]
            qi += 1
    return _tables(ranked, dev)


def random_tables(dev: DevSet) -> dict[str, Any]:
    """The chance baseline: each question's item reviews in a seeded random order."""
    ranked: dict[str, list[str]] = {}
    for domain in dev.domains.values():
        ranked.update(random_rankings(domain))
    return _tables(ranked, dev)


def _tables(ranked: dict[str, list[str]], dev: DevSet) -> dict[str, Any]:
    texts = {r: t for d in dev.domains.values() for r, t in d.texts.items()}
    return {
        "pooled": recall_table(ranked, dev.examples, texts),
        "domains": {
            name: recall_table(ranked, d.questions, d.texts) for name, d in dev.domains.items()
        },
    }


def _better(new: dict[str, float], old: dict[str, float] | None) -> bool:
    if old is None:
        return True
    return (new["strict@1"], new["strict@3"]) > (old["strict@1"], old["strict@3"])


def mnrl_loss(model: Any, loss_fn: Any, batch: Sequence[TrainPair]) -> Any:
    """MultipleNegativesRankingLoss of one batch: columns (anchor, positive, negative 1..K)."""
    import torch

    k = len(batch[0].negatives)
    columns = [[p.question for p in batch], [p.positive for p in batch]]
    columns += [[p.negatives[j] for p in batch] for j in range(k)]
    features = [model.preprocess(col) for col in columns]
    return loss_fn(features, torch.empty(0))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder in; a crash leaves either the old or the new one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _model_card(best: dict[str, Any], history: dict[str, Any]) -> str:
    base = history["evals"][0]["dev"]["pooled"] if history["evals"] else {}
    figures = best["dev"]["pooled"]
    args = history["args"]
    return (
        "# qaserve retriever encoder (fine-tuned on SubjQA)\n\n"
        f"Base: `{args['base_model']}`. Trained by `qaserve train-retriever` on the train "
        f"splits of {', '.join(args['domains'])}: question -> own review "
        f"({args['passage']}), MultipleNegativesRankingLoss with in-batch negatives and "
        f"{args['hard_negatives']} same-item hard negative(s); lr {args['lr']}, batch "
        f"{args['batch_size']}, max_seq_length {args['max_seq_length']}, seed {args['seed']}.\n"
        f"Selected at step {best['step']} of {history['total_steps']} on pooled dev "
        "(book protocol: the item's reviews from all splits, ranked by cosine).\n\n"
        f"| dev (pooled) | {' | '.join(figures)} |\n|---|{'---|' * len(figures)}\n"
        f"| base | {' | '.join(str(base.get(k, '')) for k in figures)} |\n"
        f"| this | {' | '.join(str(v) for v in figures.values())} |\n\n"
        "See train_log.json beside the training output for every eval and the losses.\n"
    )


def _fingerprint(args: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (not threads or cadence)."""
    skip = {"threads", "eval_every", "checkpoint_every", "stop_after", "progress", "log_every"}
    return {k: v for k, v in args.items() if k not in skip}


def train_retriever(
    data: Path,
    output: Path,
    *,
    domains: Sequence[str] | None = None,
    base_model: str | None = None,
    epochs: float = 1.0,
    lr: float = 2e-5,
    batch_size: int = 32,
    hard_negatives: int = 1,
    max_seq_length: int = 256,
    passage: str = "review",
    limit: int | None = None,
    dev_limit: int | None = None,
    eval_windows: bool = False,
    seed: int = 42,
    threads: int | None = 2,
    eval_every: int | None = None,
    checkpoint_every: int = 50,
    warmup: float = 0.1,
    scale: float = 20.0,
    log_every: int = 10,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate on dev at step 0, every `eval_every` steps and each epoch; keep the best.

    Returns the log also written to OUTPUT/train_log.json. `stop_after` ends the run after
    that many steps with a checkpoint (the schedule stays the full run's); rerun to continue.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see threads.py)
    n_threads = bound_threads(threads)
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from tqdm import tqdm

    from qaserve.config import EmbedderConfig, StoreConfig, packaged_embedder
    from qaserve.deployments.passages import PassageSplitter
    from qaserve.offline.optim import adamw_with_warmup

    if passage not in PASSAGES:
        raise BadRequest(f"--passage must be one of {PASSAGES}", field="passage")
    if batch_size < 2 or hard_negatives < 0 or epochs <= 0:
        raise BadRequest("need --batch-size >= 2, --hard-negatives >= 0, --epochs > 0")
    t0 = time.time()
    output = Path(output)
    folders = find_domains(data, domains)
    embedder_cfg = EmbedderConfig()
    eval_seq_length = embedder_cfg.max_seq_length
    args: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "domains": [p.name for p in folders],
        # the packaged all-MiniLM-L6-v2, not the configured default (which is this command's
        # own earlier output once shipped)
        "base_model": str(base_model or packaged_embedder()),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "hard_negatives": hard_negatives,
        "max_seq_length": max_seq_length,
        "eval_max_seq_length": eval_seq_length,
        "passage": passage,
        "limit": limit,
        "dev_limit": dev_limit,
        "eval_passages": "window" if eval_windows else "review",
        "seed": seed,
        "warmup": warmup,
        "scale": scale,
        "threads": n_threads,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "stop_after": stop_after,
    }
    output.mkdir(parents=True, exist_ok=True)
    ckpt = output / "checkpoint"
    if not ckpt.exists() and (output / "checkpoint.old").exists():
        (output / "checkpoint.old").rename(ckpt)  # a crash between the two renames
    log_path = output / "train_log.json"
    state: dict[str, Any] | None = None
    if (ckpt / STATE).is_file():
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
        assert state is not None
        if state["fingerprint"] != _fingerprint(args):
            diff = sorted(
                k
                for k in set(state["fingerprint"]) | set(_fingerprint(args))
                if state["fingerprint"].get(k) != _fingerprint(args).get(k)
            )
            raise BadRequest(
                f"{ckpt} was written with other settings ({', '.join(diff)}): rerun with the "
                "same ones to resume, or pick a new --output",
                field="output",
            )
    elif (output / "best").exists() and log_path.is_file():
        done = json.loads(log_path.read_text())
        if done.get("fingerprint") != _fingerprint(args):
            raise BadRequest(
                f"{output} holds a model trained with other settings: pick a new --output",
                field="output",
            )
        if done.get("finished"):
            print(f"[train-retriever] {output} is already trained; delete it to retrain")
            return dict(done)

    torch.manual_seed(seed)
    model = SentenceTransformer(str(ckpt / "model") if state else args["base_model"], device="cpu")
    model.max_seq_length = max_seq_length
    splitter = PassageSplitter(
        model.tokenizer,
        max_tokens=StoreConfig().passage_tokens,
        overlap=StoreConfig().passage_overlap,
    )
    everything: list[QAExample] = [ex for p in folders for ex in load_subjqa(p, "train")]
    train = everything
    if limit:
        train = random.Random(seed).sample(everything, min(limit, len(everything)))
    dev = load_dev(folders, dev_limit)

    # Every epoch's batches from (seed, epoch) alone: fresh negatives and order each epoch.
    plan: list[list[list[TrainPair]]] = []
    for epoch in range(math.ceil(epochs)):
        rng = random.Random(f"{seed}:{epoch}")
        pairs = build_pairs(train, hard_negatives, rng, passage, splitter.spans, everything)
        batches = no_duplicate_batches(pairs, batch_size, rng)
        if epoch + 1 > epochs:  # a fractional last epoch
            batches = batches[: max(1, math.ceil((epochs - epoch) * len(batches)))]
        plan.append(batches)
    if not plan or not plan[0]:
        raise BadRequest("no training pairs: each item needs reviews to contrast", field="data")
    steps = [(e, b) for e, batches in enumerate(plan) for b in batches]
    total = len(steps)
    epoch_ends = set(np.cumsum([len(b) for b in plan]).tolist())
    first = plan[0]
    pairs0 = [p for b in first for p in b]

    loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    opt, sched = adamw_with_warmup(model, lr, total, warmup)
    history: dict[str, Any] = {
        "args": args,
        "fingerprint": _fingerprint(args),
        "total_steps": total,
        "steps_per_epoch": [len(b) for b in plan],
        "data": {
            "train_questions": len(train),
            "train_pairs": len(pairs0),
            "negatives_from_other_items": sum(p.other_item for p in pairs0),
            "mean_batch": round(len(pairs0) / max(1, len(first)), 2),
            "dev_questions": len(dev.examples),
            "dev_candidate_reviews": len(dev.candidates()),
            "dev_mean_candidates": round(
                float(
                    np.mean(
                        [
                            len(d.by_item[q.item_id])
                            for d in dev.domains.values()
                            for q in d.questions
                        ]
                    )
                ),
                2,
            ),
        },
        "dev_random": random_tables(dev),
        "losses": [],
        "evals": [],
        "best": None,
        "resumed_from": [],
        "train_s": 0.0,
        "eval_s": 0.0,
        "wall_s": 0.0,
    }
    step = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        history = state["history"]
        history["args"] = args  # this run's threads and cadence
        history["resumed_from"].append(step)
        print(f"[train-retriever] resuming from {ckpt} at step {step}/{total}", flush=True)
    else:
        print(f"[train-retriever] {json.dumps(history['data'])} total_steps={total}", flush=True)

    wall0 = float(history["wall_s"])  # earlier runs of a resumed training

    def wall() -> float:
        history["wall_s"] = round(wall0 + time.time() - t0, 1)
        return float(history["wall_s"])

    def checkpoint() -> None:
        wall()
        tmp = output / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp / "model"), create_model_card=False)
        torch.save(
            {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "history": history,
                "fingerprint": _fingerprint(args),
            },
            tmp / STATE,
        )
        _replace_dir(tmp, ckpt)

    def run_eval() -> None:
        te = time.time()
        model.eval()
        res = evaluate(model, dev, eval_seq_length, splitter.spans if eval_windows else None)
        model.train()
        row = {
            "step": step,
            "epoch": round(step / len(plan[0]), 3),
            "dev": res,
            "eval_s": round(time.time() - te, 1),
            "wall_s": wall(),
        }
        history["eval_s"] = round(history["eval_s"] + row["eval_s"], 1)
        history["evals"].append(row)
        best = history["best"]
        if _better(res["pooled"], best and best["dev"]["pooled"]):
            history["best"] = best = row
            tmp = output / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.max_seq_length = eval_seq_length  # what the folder says it serves at
            model.save(str(tmp), create_model_card=False)
            model.max_seq_length = max_seq_length
            (tmp / "README.md").write_text(_model_card(best, history))
            _replace_dir(tmp, output / "best")
        p = res["pooled"]
        print(
            f"[train-retriever] eval step {step}: strict@1 {p['strict@1']:.4f} @3 "
            f"{p['strict@3']:.4f} book@1 {p['book@1']:.4f} @3 {p['book@3']:.4f} "
            f"({row['eval_s']}s); best step {best['step']} strict@1 "
            f"{best['dev']['pooled']['strict@1']:.4f}",
            flush=True,
        )
        _write_json(log_path, history)

    if not history["evals"]:
        run_eval()  # the untrained encoder: the figure to beat
        checkpoint()
    end = min(total, stop_after) if stop_after else total
    model.train()
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=step,
        disable=not progress,
        mininterval=1 if tty else 30,
        desc="train-retriever",
    )
    running: list[float] = []
    try:
        while step < end:
            _, batch = steps[step]
            ts = time.time()
            loss = mnrl_loss(model, loss_fn, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history["train_s"] = round(history["train_s"] + time.time() - ts, 2)
            running.append(float(loss.item()))
            bar.update(1)
            if step % log_every == 0 or step == end:
                history["losses"].append(
                    {
                        "step": step,
                        "loss": round(float(np.mean(running)), 5),
                        "lr": sched.get_last_lr()[0],
                        "wall_s": wall(),
                    }
                )
                bar.set_postfix(loss=f"{np.mean(running):.3f}")
                running = []
            last = history["evals"][-1]["step"]
            due = (eval_every and step - last >= eval_every) or step in epoch_ends
            if due or step == total:
                run_eval()
                if step < total:
                    checkpoint()
            elif step % checkpoint_every == 0 or step == end:
                checkpoint()
    except KeyboardInterrupt:
        if step > int(state["step"] if state else 0):
            checkpoint()
            print(f"\n[train-retriever] interrupted; checkpoint at step {step}", file=sys.stderr)
        raise
    finally:
        bar.close()
    history["steps"] = step
    wall()
    if step >= total:
        history["finished"] = True
        shutil.rmtree(ckpt, ignore_errors=True)  # ~3x the model; the best is kept in best/
    if history["train_s"] and step:
        history["steps_per_s"] = round(step / history["train_s"], 4)
    _write_json(log_path, history)
    return history


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="SubjQA root (<domain>/{train,dev,test}.csv from megagonlabs/SubjQA) or one domain",
    )
    p.add_argument("--output", type=Path, required=True, help="folder: best/, train_log.json")
    p.add_argument("--domains", nargs="+", default=None, help="default: every domain found")
    p.add_argument("--base-model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hard-negatives", type=int, default=1, help="same-item reviews per question")
    p.add_argument("--max-seq-length", type=int, default=256, help="training truncation (tokens)")
    p.add_argument(
        "--passage",
        choices=PASSAGES,
        default="review",
        help="positive: the whole review, or the store's 200-token window with the answer",
    )
    p.add_argument("--limit", type=int, default=None, help="a seeded sample of N train questions")
    p.add_argument("--dev-limit", type=int, default=None, help="first N dev questions per domain")
    p.add_argument(
        "--eval-passages",
        choices=PASSAGES,
        default="review",
        help="dev ranks whole reviews (book protocol) or by each review's best store window",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=None, help="steps (and every epoch's end)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--scale", type=float, default=20.0, help="MNRL's inverse temperature")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop at step N (checkpointed); rerun to go on"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    res = train_retriever(
        args.data,
        args.output,
        domains=args.domains,
        base_model=args.base_model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        hard_negatives=args.hard_negatives,
        max_seq_length=args.max_seq_length,
        passage=args.passage,
        limit=args.limit,
        dev_limit=args.dev_limit,
        eval_windows=args.eval_passages == "window",
        seed=args.seed,
        threads=args.threads,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        warmup=args.warmup,
        scale=args.scale,
        stop_after=args.stop_after,
        progress=not args.quiet,
    )
    best = res["best"]
    base = res["evals"][0]["dev"]["pooled"] if res["evals"] else None
    summary = {
        "best_step": best and best["step"],
        "best_dev": best and best["dev"]["pooled"],
        "base_dev": base,
        "steps": res.get("steps"),
        "total_steps": res["total_steps"],
        "finished": bool(res.get("finished")),
        "output": str(args.output / "best"),
    }
    print(json.dumps(summary))
    return 0


COMMAND = Command(
    "train-retriever",
    "fine-tune the retriever's encoder on SubjQA (selected on dev)",
    _add_args,
    _run,
    module="qaserve.offline.train_retriever",
    doc=__doc__,
    doc_in_cli=True,
)
register = COMMAND.register
