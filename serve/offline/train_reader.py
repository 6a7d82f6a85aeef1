"""Fine-tune an extractive QA reader (e.g. the packaged MiniLM encoder) on SubjQA / SQuAD.

No extractive-QA checkpoint can be installed here, so the server's default reader is trained
by this module. Features are built exactly as the reader runs (question first, context
truncated `only_second` into overlapping windows) so that training, evaluation and serving
see the same windows; a window whose context does not hold the whole answer is labelled with
the CLS token, i.e. "no answer here".

Training targets: one feature set per *distinct* annotated answer of a question; a question
gets the null (CLS) target only when every annotation says ANSWERNOTFOUND. Questions that
mix answers and ANSWERNOTFOUND are thus trained as answerable, which is also how the SQuAD
2.0 metric scores them (it ignores empty golds when a non-empty one exists).

On CPU the cost is the padded sequence length: most reviews are far shorter than 384
tokens, so batches are drawn from length buckets and padded only to their longest feature.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from qaserve.offline.command import Command
from qaserve.subjqa import QAExample, load_examples
from qaserve.threads import bound_threads

log = logging.getLogger(__name__)

MAX_LENGTH = 384
STRIDE = 128
MAX_ANSWER_LEN = 15


@dataclass
class Feature:
    """One window of one (question, context, target answer)."""

    input_ids: list[int]
    token_type_ids: list[int]
    start: int  # target token; 0 (CLS) = no answer in this window
    end: int
    example: int  # index into the example list
    offsets: list[tuple[int, int] | None] = field(default_factory=list)  # None = not context


def _encode(tokenizer: Any, examples: Sequence[QAExample], max_length: int, stride: int) -> Any:
    return tokenizer(
        [ex.question for ex in examples],
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def training_targets(ex: QAExample) -> list[tuple[str, int]]:
    """Distinct non-empty answers, or the single null answer when there is none."""
    seen: dict[tuple[str, int], None] = {}
    for a in ex.answers:
        if a.text:
            seen.setdefault((a.text, a.start), None)
    return list(seen) or [("", -1)]


def _token_span(
    offsets: list[tuple[int, int] | None], start_char: int, end_char: int
) -> tuple[int, int]:
    """Token start/end of [start_char, end_char) if the window's context holds it all, else CLS."""
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if start_char < 0 or not ctx:
        return 0, 0
    first, last = ctx[0], ctx[-1]
    # The context's tokens are contiguous: every offset from first to last is set.
    spans = cast("list[tuple[int, int]]", offsets)
    if spans[first][0] > start_char or spans[last][1] < end_char:
        return 0, 0
    s = first
    while s <= last and spans[s][1] <= start_char:
        s += 1
    e = last
    while e >= first and spans[e][0] >= end_char:
        e -= 1
    if s > e:
        return 0, 0
    return s, e


def make_features(
    examples: Sequence[QAExample],
    tokenizer: Any,
    *,
    max_length: int = MAX_LENGTH,
    stride: int = STRIDE,
    train: bool = True,
) -> list[Feature]:
    """Windows per example; with `train`, one window set per training target, else one set."""
    enc = _encode(tokenizer, examples, max_length, stride)
    features: list[Feature] = []
    for i, ex_idx in enumerate(enc["overflow_to_sample_mapping"]):
        seq_ids = enc.sequence_ids(i)
        offsets: list[tuple[int, int] | None] = [
            tuple(o) if sid == 1 else None
            for o, sid in zip(enc["offset_mapping"][i], seq_ids, strict=True)
        ]
        ids = enc["input_ids"][i]
        ttype = enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * len(ids)
        ex = examples[ex_idx]
        targets = training_targets(ex) if train else [("", -1)]
        for text, start in targets:
            s, e = _token_span(offsets, start, start + len(text)) if text else (0, 0)
            features.append(Feature(ids, ttype, s, e, ex_idx, offsets if not train else []))
    return features


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within chunks of 50 batches by length, then shuffle the batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c : c + chunk], key=lambda j: lengths[j])
        batches.extend(part[b : b + batch_size] for b in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(features: Sequence[Feature], pad_id: int = 0) -> dict[str, Any]:
    import torch

    n, width = len(features), max(len(f.input_ids) for f in features)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, f in enumerate(features):
        k = len(f.input_ids)
        ids[r, :k] = torch.tensor(f.input_ids)
        types[r, :k] = torch.tensor(f.token_type_ids)
        mask[r, :k] = 1
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "start_positions": torch.tensor([f.start for f in features]),
        "end_positions": torch.tensor([f.end for f in features]),
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: list[tuple[int, int] | None],
    max_answer_len: int = MAX_ANSWER_LEN,
) -> tuple[float, float, int, int]:
    """(span score, null score, char start, char end) of one window, as the QA pipeline scores.

    Non-context tokens are masked except CLS, logits become per-window probabilities, a span
    scores p_start * p_end (at most max_answer_len tokens), the null answer p_start[0] * p_end[0].
    """
    keep = np.array([o is not None for o in offsets])
    keep[0] = True
    ps = _softmax(np.where(keep, start_logits, -10000.0))
    pe = _softmax(np.where(keep, end_logits, -10000.0))
    null = float(ps[0] * pe[0])
    ctx = np.array([o is not None for o in offsets])
    ps_c, pe_c = np.where(ctx, ps, 0.0), np.where(ctx, pe, 0.0)
    outer = np.triu(np.tril(np.outer(ps_c, pe_c), max_answer_len - 1))
    s, e = np.unravel_index(int(outer.argmax()), outer.shape)
    start, end = offsets[s], offsets[e]
    if outer[s, e] <= 0 or start is None or end is None:
        return 0.0, null, 0, 0
    return float(outer[s, e]), null, start[0], end[1]


def predict(
    model: Any,
    features: Sequence[Feature],
    examples: Sequence[QAExample],
    *,
    batch_size: int = 64,
    max_answer_len: int = MAX_ANSWER_LEN,
) -> list[str]:
    """Top-1 answer text per example ('' when the null score wins over every window's span)."""
    import torch

    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            chunk = [features[i] for i in order[b : b + batch_size]]
            batch = collate(chunk)
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            )
            starts, ends = out.start_logits.float().numpy(), out.end_logits.float().numpy()
            for r, f in enumerate(chunk):
                k = len(f.input_ids)
                score, nul, cs, ce = best_span(
                    starts[r, :k], ends[r, :k], f.offsets, max_answer_len
                )
                null[f.example] = min(null.get(f.example, 1e6), nul)
                if score > best.get(f.example, (-1.0, ""))[0]:
                    best[f.example] = (score, examples[f.example].context[cs:ce])
    model.train(was_training)
    preds = []
    for i in range(len(examples)):
        score, text = best.get(i, (0.0, ""))
        preds.append("" if null.get(i, 0.0) > score else text)
    return preds


def _squad_em_f1(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    from qaserve.metrics import squad_em_f1

    return squad_em_f1(prediction, golds)


def evaluate(
    model: Any,
    features: Sequence[Feature],
    examples: Sequence[QAExample],
    max_answer_len: int = MAX_ANSWER_LEN,
) -> dict[str, Any]:
    """EM/F1 overall, per domain, and split by answerable / unanswerable gold."""
    preds = predict(model, features, examples, max_answer_len=max_answer_len)
    groups: dict[str, list[tuple[float, float]]] = {}
    for ex, pred in zip(examples, preds, strict=True):
        em, f1 = _squad_em_f1(pred, ex.gold_texts)
        kind = "no_answer" if ex.is_impossible else "has_answer"
        for key in ("all", ex.domain or "?", kind):
            groups.setdefault(key, []).append((em, f1))
    res: dict[str, Any] = {
        k: {
            "em": float(np.mean([v[0] for v in vs])),
            "f1": float(np.mean([v[1] for v in vs])),
            "n": len(vs),
        }
        for k, vs in groups.items()
    }
    res["null_rate"] = float(np.mean([p == "" for p in preds]))
    return res


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def train_reader(
    train_files: Sequence[Path],
    dev_files: Sequence[Path],
    output_dir: Path,
    base_model: str | None = None,
    epochs: float = 2.0,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 42,
    max_steps: int | None = None,
    eval_every: int | None = None,
    *,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    max_length: int = MAX_LENGTH,
    stride: int = STRIDE,
    max_answer_len: int = MAX_ANSWER_LEN,
    threads: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate on dev every `eval_every` steps and each epoch, keep the best by F1.

    `model`/`tokenizer` may be passed ready-made (tests); otherwise both load from `base_model`
    (default: the packaged MiniLM encoder, whose QA head then starts random). Returns the log
    that is also written to `output_dir/train_log.json`. `stop_after` ends training early
    but keeps the learning-rate schedule of the full run (`max_steps` shortens the schedule).
    """
    # Spinning OpenMP workers burn a contended core's time slices: measured here with other
    # jobs on the 2 cores, 17.4 s/step spinning vs 9.5 s/step passive (same 4.4 CPU-s of work).
    # libgomp reads this when torch loads, so it only helps if torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n_threads = bound_threads(threads)
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from qaserve.config import packaged_embedder
    from qaserve.offline.optim import adamw_with_warmup

    t0 = time.time()
    base_model = base_model or packaged_embedder()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    if model is None:
        model = AutoModelForQuestionAnswering.from_pretrained(base_model)

    train_ex = load_examples(train_files, "train")
    dev_ex = load_examples(dev_files, "dev") if dev_files else []
    train_feats = make_features(train_ex, tokenizer, max_length=max_length, stride=stride)
    dev_feats = make_features(dev_ex, tokenizer, max_length=max_length, stride=stride, train=False)
    lengths = [len(f.input_ids) for f in train_feats]
    steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    opt, sched = adamw_with_warmup(model, lr, total, warmup, weight_decay)

    history: dict[str, Any] = {
        "base_model": base_model,
        "train_files": [str(p) for p in train_files],
        "dev_files": [str(p) for p in dev_files],
        "hparams": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "max_length": max_length,
            "stride": stride,
            "max_answer_len": max_answer_len,
            "threads": n_threads,
            "total_steps": total,
            "stop_after": stop_after,
            "targets": "distinct answers; null only if all ANSWERNOTFOUND",
        },
        "data": {
            "train_examples": len(train_ex),
            "train_features": len(train_feats),
            "train_null_features": sum(f.start == 0 for f in train_feats),
            "mean_train_len": float(np.mean(lengths)) if lengths else 0.0,
            "dev_examples": len(dev_ex),
            "dev_features": len(dev_feats),
        },
        "losses": [],
        "evals": [],
        "best": None,
    }
    if dev_ex:
        history["dev_null_baseline"] = {
            "f1": float(np.mean([_squad_em_f1("", ex.gold_texts)[1] for ex in dev_ex]))
        }
    log.info("train: %s", history["data"])
    print(f"[train-reader] {json.dumps(history['data'])} total_steps={total}", flush=True)

    def run_eval(step: int, epoch: float) -> None:
        if not dev_ex:
            return
        te = time.time()
        res = evaluate(model, dev_feats, dev_ex, max_answer_len)
        res.update(
            step=step,
            epoch=round(epoch, 3),
            eval_s=round(time.time() - te, 1),
            wall_s=round(time.time() - t0, 1),
        )
        history["evals"].append(res)
        if history["best"] is None or res["all"]["f1"] > history["best"]["all"]["f1"]:
            history["best"] = res
            model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
        a = res["all"]
        print(
            f"[train-reader] eval step {step} epoch {epoch:.2f}: EM {a['em']:.4f} F1 {a['f1']:.4f} "
            f"null_rate {res['null_rate']:.3f} ({res['eval_s']}s) best F1 "
            f"{history['best']['all']['f1']:.4f}",
            flush=True,
        )
        _write_json(output_dir / "train_log.json", history)

    model.train()
    step, running, since = 0, 0.0, 0
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, disable=not progress, mininterval=1 if tty else 30, desc="train")
    epoch = 0
    end = min(total, stop_after) if stop_after else total
    while step < end:
        for batch_idx in length_batches(lengths, batch_size, rng):
            batch = collate([train_feats[i] for i in batch_idx], tokenizer.pad_token_id or 0)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            since += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                history["losses"].append(
                    {
                        "step": step,
                        "loss": running / since,
                        "lr": sched.get_last_lr()[0],
                        "wall_s": round(time.time() - t0, 1),
                    }
                )
                bar.set_postfix(loss=f"{running / since:.3f}")
                running, since = 0.0, 0
            last = history["evals"][-1]["step"] if history["evals"] else 0
            if eval_every and step - last >= eval_every and step < end:
                run_eval(step, step / steps_per_epoch)
            if step >= end:
                break
        epoch += 1
        if not history["evals"] or history["evals"][-1]["step"] != step:
            run_eval(step, step / steps_per_epoch)
    bar.close()
    if not dev_ex:  # nothing to select on: keep the last weights
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    history["wall_s"] = round(time.time() - t0, 1)
    history["steps"] = step
    _write_json(output_dir / "train_log.json", history)
    return history


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train",
        nargs="+",
        type=Path,
        required=True,
        help="SubjQA CSVs, domain folders or the data root (split 'train'), SQuAD JSON",
    )
    p.add_argument(
        "--dev",
        nargs="*",
        type=Path,
        default=[],
        help="same forms as --train (split 'dev'); the best checkpoint is chosen on these",
    )
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder (best dev F1)")
    p.add_argument("--base-model", default=None, help="hub id or folder (default: packaged MiniLM)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N steps, keeping the full run's learning-rate schedule",
    )
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--max-answer-len", type=int, default=MAX_ANSWER_LEN)
    p.add_argument("--threads", type=int, default=None)


def _run(args: argparse.Namespace) -> int:
    res = train_reader(
        args.train,
        args.dev,
        args.output,
        args.base_model,
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        args.max_steps,
        args.eval_every,
        warmup=args.warmup,
        max_answer_len=args.max_answer_len,
        threads=args.threads,
        stop_after=args.stop_after,
    )
    best = res["best"]
    print(
        json.dumps(
            {
                "best": best and {"step": best["step"], **best["all"]},
                "wall_s": res["wall_s"],
                "output": str(args.output),
            }
        )
    )
    return 0


COMMAND = Command(
    "train-reader",
    "fine-tune the extractive reader on SubjQA/SQuAD",
    _add_args,
    _run,
    module="qaserve.offline.train_reader",
    doc=__doc__,
    logs=True,
)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
