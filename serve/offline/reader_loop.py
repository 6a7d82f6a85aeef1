"""The resumable fine-tuning loop shared by `distill-reader` and `prune-reader`.

Features, batching, evaluation and span scoring are train_reader's (the same windows the
reader serves); what this adds is what those two commands need and train-reader lacks:
- a pluggable loss (distillation) and per-step hooks (pruning masks, structured cuts);
- the reader's own mask (context tokens + CLS) per window, for the loss;
- resumption: OUTPUT/resume.pt holds model, optimiser, step, RNG and log, written
  atomically every `save_every` steps and at every evaluation, so rerunning the same command
  continues where it stopped (each epoch's batch order is derived from (seed, epoch), so a
  resumed run sees the batches an uninterrupted one would).
The best dev checkpoint (pooled dev splits, SQuAD 2.0 official F1) goes to OUTPUT/best.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.offline.optim import lr_factor
from qaserve.offline.train_reader import (
    MAX_ANSWER_LEN,
    MAX_LENGTH,
    STRIDE,
    Feature,
    _write_json,
    collate,
    evaluate,
    length_batches,
    make_features,
)

RESUME_NAME = "resume.pt"
NEG = -10000.0  # what the reader writes over masked logits


@dataclass
class LoopConfig:
    """Hyper-parameters of one run; a resumed run must use the same ones."""

    epochs: float = 2.0
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 42
    eval_every: int | None = None
    save_every: int | None = None
    max_steps: int | None = None
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = MAX_LENGTH
    stride: int = STRIDE
    max_answer_len: int = MAX_ANSWER_LEN
    extra: dict[str, Any] = field(default_factory=dict)  # the command's own settings

    def total_steps(self, n_features: int) -> int:
        total = max(1, math.ceil(self.epochs * math.ceil(n_features / self.batch_size)))
        return min(total, self.max_steps) if self.max_steps else total


def window_key(ids: Sequence[int], types: Sequence[int]) -> str:
    """Content key of one window (several training targets share a window)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(np.asarray(ids, np.int32).tobytes())
    h.update(np.asarray(types, np.int8).tobytes())
    return h.hexdigest()


def context_masks(
    examples: Sequence[Any], tokenizer: Any, max_length: int, stride: int
) -> dict[str, np.ndarray]:
    """Per window: the tokens the reader's softmax sees (the context's and CLS)."""
    out: dict[str, np.ndarray] = {}
    for f in make_features(examples, tokenizer, max_length=max_length, stride=stride, train=False):
        keep = np.array([o is not None for o in f.offsets])
        keep[0] = True
        out[window_key(f.input_ids, f.token_type_ids)] = keep
    return out


def pad_rows(rows: Sequence[np.ndarray], width: int, fill: Any) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.asarray(rows[0]).dtype)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def masked_ce(logits: Any, mask: Any, gold: Any) -> Any:
    """Cross-entropy over the reader's candidates (context + CLS) only."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.masked_fill(~mask, NEG), gold)


Hook = Callable[[Any, int], None]


@dataclass
class Run:
    """What a command plugs into the loop."""

    model: Any
    tokenizer: Any
    train_feats: list[Feature]
    dev_feats: list[Feature]
    dev_examples: list[Any]
    loss: Callable[[Any, list[Feature], dict[str, Any]], Any]  # (model, feats, batch) -> loss
    param_groups: Callable[[Any], list[dict[str, Any]]] | None = None  # extra groups
    after_step: Hook | None = None  # (model, step): masks, schedules
    # (model, step) -> True when it replaced parameters (a structured cut): new optimiser
    before_step: Callable[[Any, int], bool] | None = None
    save_best: Callable[[Any, Path], None] | None = None  # write model (+tokenizer) to a dir
    state: Callable[[], dict[str, Any]] | None = None  # the command's resumable state
    restore: Callable[[Any, dict[str, Any]], Any] | None = None  # returns the model to use
    report: Callable[[Any], dict[str, Any]] | None = None  # extra figures per evaluation
    # Which steps may be chosen as best (pruning: only once the target sparsity is reached).
    selectable: Callable[[int], bool] | None = None


def optimizer_for(model: Any, cfg: LoopConfig, extra: list[dict[str, Any]]) -> Any:
    import torch

    from qaserve.offline.optim import decay_groups

    groups = [*decay_groups(model, cfg.weight_decay, skip=lambda n: n.endswith(".scores")), *extra]
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _save_resume(path: Path, blob: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def train_loop(
    run: Run,
    cfg: LoopConfig,
    output_dir: Path,
    *,
    name: str,
    info: dict[str, Any],
    stop_after: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, Any]:
    """Train, evaluate every `eval_every` steps and at each epoch's end, keep the best by F1.

    Returns the log also written to OUTPUT/train_log.json. `stop_after` ends this invocation
    early (the schedule is the full run's); rerunning resumes from OUTPUT/resume.pt unless
    `fresh`. A resume with other hyper-parameters is refused (ValueError)."""
    import torch
    from tqdm import tqdm

    t0 = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    best_dir = output_dir / "best"
    resume_path = output_dir / RESUME_NAME
    model = run.model
    lengths = [len(f.input_ids) for f in run.train_feats]
    steps_per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    total = cfg.total_steps(len(lengths))
    hparams = {**asdict(cfg), "total_steps": total}
    history: dict[str, Any] = {
        **info,
        "hparams": hparams,
        "data": {
            "train_features": len(run.train_feats),
            "dev_examples": len(run.dev_examples),
            "dev_features": len(run.dev_feats),
        },
        "losses": [],
        "evals": [],
        "best": None,
        "resumed_at": [],
    }
    torch.manual_seed(cfg.seed)
    step, prior_s = 0, 0.0
    blob = None
    if resume_path.exists() and not fresh:
        blob = torch.load(resume_path, map_location="cpu", weights_only=False)
        if blob["hparams"] != json.loads(json.dumps(hparams)):
            raise ValueError(
                f"{resume_path} was written with other settings ({blob['hparams']}); "
                "pass the same options to resume, or --fresh to start over"
            )
        if run.restore is not None:
            model = run.restore(model, blob["extra"])
        model.load_state_dict(blob["model"])
        step = blob["step"]
        history = blob["history"]
        history["resumed_at"].append(step)
        prior_s = float(history.get("wall_s") or 0.0)
        print(f"[{name}] resuming at step {step} of {total}", flush=True)
    opt = optimizer_for(model, cfg, run.param_groups(model) if run.param_groups else [])
    if blob is not None:
        opt.load_state_dict(blob["opt"])
        torch.set_rng_state(blob["torch_rng"])
    print(f"[{name}] {json.dumps(history['data'])} total_steps={total}", flush=True)

    def checkpoint() -> None:
        history["wall_s"] = round(prior_s + time.time() - t0, 1)
        _save_resume(
            resume_path,
            {
                "hparams": json.loads(json.dumps(hparams)),
                "step": step,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "extra": run.state() if run.state else {},
            },
        )

    def run_eval() -> None:
        te = time.time()
        res = (
            evaluate(model, run.dev_feats, run.dev_examples, cfg.max_answer_len)
            if run.dev_examples
            else {}
        )
        res.update(
            step=step, epoch=round(step / steps_per_epoch, 3), eval_s=round(time.time() - te, 1)
        )
        res["wall_s"] = round(prior_s + time.time() - t0, 1)
        if run.report:
            res.update(run.report(model))
        history["evals"].append(res)
        f1 = res.get("all", {}).get("f1", -1.0)
        best = history["best"]
        eligible = run.selectable(step) if run.selectable else True
        res["selectable"] = eligible
        better = best is None or f1 > best.get("all", {}).get("f1", -1.0) or not run.dev_examples
        if eligible and better:
            history["best"] = res
            (run.save_best or _save_plain)(model, best_dir)
            run.tokenizer.save_pretrained(best_dir)
        best_f1 = (history["best"] or {}).get("all", {}).get("f1", -1.0)
        note = "" if eligible else " (before the target: not selectable)"
        print(
            f"[{name}] eval step {step}: F1 {f1:.4f} best F1 {best_f1:.4f} "
            f"({res['eval_s']}s){note}",
            flush=True,
        )
        _write_json(output_dir / "train_log.json", history)
        checkpoint()

    model.train()
    end = min(total, stop_after) if stop_after else total
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total, initial=step, disable=not progress, mininterval=1 if tty else 30, desc=name
    )
    running, since = 0.0, 0
    while step < end:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = length_batches(lengths, cfg.batch_size, random.Random(cfg.seed * 1009 + epoch))
        for batch_idx in batches[skip:]:
            if run.before_step and run.before_step(model, step):
                opt = optimizer_for(model, cfg, run.param_groups(model) if run.param_groups else [])
            feats = [run.train_feats[i] for i in batch_idx]
            batch = collate(feats, run.tokenizer.pad_token_id or 0)
            factor = lr_factor(step, total, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss = run.loss(model, feats, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if run.after_step:
                run.after_step(model, step)
            running += loss.item()
            since += 1
            bar.update(1)
            if step % log_every == 0 or step == end:
                history["losses"].append(
                    {
                        "step": step,
                        "loss": running / since,
                        "lr": opt.param_groups[0]["lr"],
                        "wall_s": round(time.time() - t0, 1),
                    }
                )
                bar.set_postfix(loss=f"{running / since:.3f}")
                running, since = 0.0, 0
            last = history["evals"][-1]["step"] if history["evals"] else 0
            if cfg.eval_every and step - last >= cfg.eval_every and step < end:
                run_eval()
            elif cfg.save_every and step % cfg.save_every == 0 and step < end:
                checkpoint()
            if step >= end:
                break
        if not history["evals"] or history["evals"][-1]["step"] != step:
            run_eval()  # each epoch's end, and where this invocation stops
    bar.close()
    history["steps"] = step
    checkpoint()
    _write_json(output_dir / "train_log.json", history)
    return history


def _save_plain(model: Any, dest: Path) -> None:
    model.save_pretrained(dest)
