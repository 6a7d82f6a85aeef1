"""`qaserve distill-reader`: a smaller extractive reader trained to match a teacher's spans.

The loss is the efficient-transformers chapter's, on the start and the end distributions of
each window over the tokens the reader scores (context + CLS):

    alpha * CE(student, gold) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher's logits are computed ONCE per distinct training window with ONNX Runtime and
cached on disk (`<cache>/teacher-logits/<teacher hash>.npz`), which is all distillation needs
and makes a sweep over alpha and T cost no teacher passes. A teacher is either an exported
reader folder (model.onnx, such as the shipped serve/assets/reader: distillation then runs
from a fresh clone) or an fp32 checkpoint, exported to ONNX fp32 through the engine's export
path first. Several `--teacher`s make an ensemble teacher: the mean of their logits.

The student is a subset of layers (`--student-layers 0,2,4`) of `--student-from`: by default
the first fp32 teacher (so it starts from the teacher's own weights, QA head included, as the
chapter advises), else the packaged all-MiniLM-L6-v2 with a fresh QA head.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.offline.command import Command
from qaserve.offline.reader_loop import (
    NEG,
    LoopConfig,
    Run,
    context_masks,
    masked_ce,
    pad_rows,
    train_loop,
    window_key,
)
from qaserve.offline.train_reader import MAX_ANSWER_LEN, MAX_LENGTH, STRIDE, make_features

log = logging.getLogger(__name__)

Logits = dict[str, tuple[np.ndarray, np.ndarray]]


# --- the loss ----------------------------------------------------------------------------


def distill_loss(
    student: tuple[Any, Any],
    teacher: tuple[Any, Any] | None,
    mask: Any,
    gold: tuple[Any, Any],
    alpha: float,
    temperature: float,
) -> Any:
    """Mean over start and end of alpha*CE + (1-alpha)*T^2*KL(teacher || student), both
    distributions restricted to `mask` (batch x tokens, True = context or CLS)."""
    import torch.nn.functional as F

    total = 0.0
    for k in range(2):
        s = student[k]
        term = masked_ce(s, mask, gold[k])
        if teacher is not None and alpha < 1.0:
            t = teacher[k].masked_fill(~mask, NEG) / temperature
            log_p_s = F.log_softmax(s.masked_fill(~mask, NEG) / temperature, dim=-1)
            kl = F.kl_div(log_p_s, F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
            term = alpha * term + (1.0 - alpha) * temperature**2 * kl
        total = total + term
    return total / 2


# --- teacher logits ----------------------------------------------------------------------


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def teacher_folder(teacher: str | Path, cache_dir: Path) -> Path:
    """An exported reader folder as is; a checkpoint exported to ONNX fp32 (cached)."""
    from qaserve.deployments.onnx_export import ONNX_NAME, export_reader

    path = Path(teacher).expanduser()
    if (path / ONNX_NAME).is_file():
        return path
    return export_reader(teacher, cache_dir, "fp32")


def check_vocab(folder: Path, tokenizer: Any) -> None:
    """Teacher and student must cut text into the same tokens, or logits do not line up."""
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    if theirs != tokenizer.get_vocab():
        raise ValueError(f"{folder}: the teacher's vocabulary differs from the student's")


def teacher_logits(
    folder: Path,
    windows: dict[str, tuple[list[int], list[int]]],
    cache_dir: Path,
    threads: int = 1,
    batch: int = 32,
    progress: bool = False,
) -> tuple[Logits, dict[str, Any]]:
    """Start/end logits of the teacher in `folder` for every window, cached by content.

    The cache file is keyed by the teacher's model.onnx hash; windows already in it are not
    run again. Returns the logits and {"computed", "cached", "seconds", "file"}."""
    from qaserve.deployments.onnx_export import ONNX_NAME

    t0 = time.time()
    digest = _file_hash(folder / ONNX_NAME)
    file = Path(cache_dir) / "teacher-logits" / f"{digest}.npz"
    have: Logits = {}
    if file.exists():
        with np.load(file) as z:
            keys, cuts = z["keys"], z["cuts"]
            starts, ends = z["start"], z["end"]
        for i, key in enumerate(keys.tolist()):
            have[key] = (starts[cuts[i] : cuts[i + 1]], ends[cuts[i] : cuts[i + 1]])
    missing = [k for k in windows if k not in have]
    if missing:
        have.update(_run_onnx(folder / ONNX_NAME, windows, missing, threads, batch, progress))
        _save_logits(file, have)
    stats = {
        "computed": len(missing),
        "cached": len(windows) - len(missing),
        "seconds": round(time.time() - t0, 1),
        "file": str(file),
    }
    return {k: have[k] for k in windows}, stats


def _run_onnx(
    model: Path,
    windows: dict[str, tuple[list[int], list[int]]],
    keys: list[str],
    threads: int,
    batch: int,
    progress: bool,
) -> Logits:
    import onnxruntime as ort
    from tqdm import tqdm

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    order = sorted(keys, key=lambda k: len(windows[k][0]))  # little padding per run
    out: Logits = {}
    for b in tqdm(range(0, len(order), batch), disable=not progress, desc="teacher logits"):
        chunk = order[b : b + batch]
        width = max(len(windows[k][0]) for k in chunk)
        ids = pad_rows([np.asarray(windows[k][0], np.int64) for k in chunk], width, 0)
        types = pad_rows([np.asarray(windows[k][1], np.int64) for k in chunk], width, 0)
        mask = pad_rows([np.ones(len(windows[k][0]), np.int64) for k in chunk], width, 0)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        start, end = session.run(["start_logits", "end_logits"], {n: feeds[n] for n in names})
        for r, k in enumerate(chunk):
            n = len(windows[k][0])
            out[k] = (start[r, :n].astype(np.float32), end[r, :n].astype(np.float32))
    return out


def _save_logits(file: Path, logits: Logits) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    keys = list(logits)
    cuts = np.cumsum([0, *(len(logits[k][0]) for k in keys)])
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        keys=np.array(keys),
        cuts=cuts,
        start=np.concatenate([logits[k][0] for k in keys]),
        end=np.concatenate([logits[k][1] for k in keys]),
    )
    os.replace(tmp, file)


def ensemble_logits(
    teachers: Sequence[str | Path],
    windows: dict[str, tuple[list[int], list[int]]],
    tokenizer: Any,
    cache_dir: Path,
    threads: int = 1,
    progress: bool = False,
) -> tuple[Logits, list[dict[str, Any]]]:
    """The mean of the teachers' logits per window (one teacher: its own)."""
    runs, all_stats = [], []
    for t in teachers:
        folder = teacher_folder(t, cache_dir)
        check_vocab(folder, tokenizer)
        logits, stats = teacher_logits(folder, windows, cache_dir, threads, progress=progress)
        runs.append(logits)
        all_stats.append({"teacher": str(t), **stats})
        print(f"[teacher-logits] {json.dumps(all_stats[-1])}", flush=True)
    if len(runs) == 1:
        return runs[0], all_stats
    mean = {
        k: (np.mean([r[k][0] for r in runs], axis=0), np.mean([r[k][1] for r in runs], axis=0))
        for k in windows
    }
    return mean, all_stats


# --- the student -------------------------------------------------------------------------


def encoder_layers(model: Any) -> Any:
    """The transformer's list of layers (BERT-like: base_model.encoder.layer)."""
    import torch

    n = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} layers found")


def keep_layers(model: Any, layers: Sequence[int]) -> Any:
    """Drop every transformer layer but `layers` (in that order), in place."""
    import torch

    stack = encoder_layers(model)
    n = len(stack)
    if not layers or any(i < 0 or i >= n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"--student-layers {list(layers)}: need distinct indices in 0..{n - 1}")
    kept = [stack[i] for i in layers]
    for parent in model.base_model.modules():
        for name, child in parent.named_children():
            if child is stack:
                setattr(parent, name, torch.nn.ModuleList(kept))
    for i, layer in enumerate(kept):  # a few modules keep their index (caches)
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    model.config.num_hidden_layers = len(kept)
    return model


def load_student(source: str, layers: Sequence[int] | None, seed: int) -> tuple[Any, Any]:
    """`source` (checkpoint or base encoder; a fresh QA head if it has none) cut to `layers`."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForQuestionAnswering.from_pretrained(source)
    if layers is not None:
        keep_layers(model, layers)
    return model, tokenizer


# --- the command -------------------------------------------------------------------------


def training_windows(train_feats: Sequence[Any]) -> dict[str, tuple[list[int], list[int]]]:
    """Distinct windows of the training features (several targets share one)."""
    return {
        window_key(f.input_ids, f.token_type_ids): (f.input_ids, f.token_type_ids)
        for f in train_feats
    }


def batch_loss(
    masks: dict[str, np.ndarray], logits: Logits | None, alpha: float, temperature: float
) -> Any:
    """The loop's loss: student forward; masks and teacher logits padded to the batch."""
    import torch

    def loss(model: Any, feats: list[Any], batch: dict[str, Any]) -> Any:
        keys = [window_key(f.input_ids, f.token_type_ids) for f in feats]
        width = batch["input_ids"].shape[1]
        mask = torch.from_numpy(pad_rows([masks[k] for k in keys], width, False))
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
        teacher = None
        if logits is not None and alpha < 1.0:
            start, end = (
                torch.from_numpy(pad_rows([logits[k][j] for k in keys], width, np.float32(NEG)))
                for j in range(2)
            )
            teacher = (start, end)
        return distill_loss(
            (out.start_logits, out.end_logits),
            teacher,
            mask,
            (batch["start_positions"], batch["end_positions"]),
            alpha,
            temperature,
        )

    return loss


def default_student_source(teachers: Sequence[str | Path]) -> str:
    """The first fp32 teacher (not an exported folder), else the packaged MiniLM."""
    from qaserve.config import packaged_embedder
    from qaserve.deployments.onnx_export import ONNX_NAME

    for t in teachers:
        if not (Path(t).expanduser() / ONNX_NAME).is_file():
            return str(t)
    return packaged_embedder()


def prepare_data(
    train_files: Sequence[Path], dev_files: Sequence[Path], tokenizer: Any, cfg: LoopConfig
) -> tuple[list[Any], list[Any], list[Any], dict[str, np.ndarray]]:
    """Training features, dev features and examples, and the reader's mask per window."""
    from qaserve.subjqa import load_examples

    train_ex = load_examples(train_files, "train")
    dev_ex = load_examples(dev_files, "dev") if dev_files else []
    size, stride = cfg.max_length, cfg.stride
    train_feats = make_features(train_ex, tokenizer, max_length=size, stride=stride)
    dev_feats = (
        make_features(dev_ex, tokenizer, max_length=size, stride=stride, train=False)
        if dev_ex
        else []
    )
    return train_feats, dev_feats, dev_ex, context_masks(train_ex, tokenizer, size, stride)


def distill_reader(
    train_files: Sequence[Path],
    dev_files: Sequence[Path],
    output_dir: Path,
    teachers: Sequence[str | Path],
    cfg: LoopConfig,
    *,
    student_from: str | None = None,
    student_layers: Sequence[int] | None = (0, 2, 4),
    alpha: float = 0.5,
    temperature: float = 2.0,
    cache_dir: Path | None = None,
    threads: int | None = None,
    stop_after: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, Any]:
    """Distil `teachers` into a student; OUTPUT/best (fp32) + OUTPUT/train_log.json."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (train_reader)
    from qaserve.config import default_cache_dir
    from qaserve.threads import bound_threads

    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError("need 0 <= alpha <= 1 and temperature > 0")
    if not teachers and alpha < 1.0:
        raise ValueError("no --teacher: only alpha=1 (plain cross-entropy) is possible")
    n_threads = bound_threads(threads)
    cache_dir = Path(cache_dir or default_cache_dir())
    source = student_from or default_student_source(teachers)
    model, tokenizer = load_student(source, student_layers, cfg.seed)
    train_feats, dev_feats, dev_ex, masks = prepare_data(train_files, dev_files, tokenizer, cfg)
    logits: Logits | None = None
    stats: list[dict[str, Any]] = []
    if teachers and alpha < 1.0:
        windows = training_windows(train_feats)
        logits, stats = ensemble_logits(
            teachers, windows, tokenizer, cache_dir, n_threads, progress
        )
    run = Run(
        model=model,
        tokenizer=tokenizer,
        train_feats=train_feats,
        dev_feats=dev_feats,
        dev_examples=dev_ex,
        loss=batch_loss(masks, logits, alpha, temperature),
    )
    cfg.extra.update(
        alpha=alpha,
        temperature=temperature,
        teachers=[str(t) for t in teachers],
        student_from=source,
        student_layers=list(student_layers) if student_layers is not None else None,
    )
    info = {
        "command": "distill-reader",
        "student": {
            "from": source,
            "layers": cfg.extra["student_layers"],
            "parameters": _params(model),
        },
        "teacher_logits": stats,
        "threads": n_threads,
        "train_files": [str(p) for p in train_files],
        "dev_files": [str(p) for p in dev_files],
    }
    return train_loop(
        run,
        cfg,
        output_dir,
        name="distill-reader",
        info=info,
        stop_after=stop_after,
        fresh=fresh,
        progress=progress,
        log_every=log_every,
    )


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def add_loop_args(p: argparse.ArgumentParser, lr: float = 1e-4) -> None:
    """Data, schedule and resumption options shared with prune-reader."""
    p.add_argument(
        "--train", nargs="+", type=Path, required=True, help="SubjQA CSVs/folders (split train)"
    )
    p.add_argument("--dev", nargs="*", type=Path, default=[], help="selection data (split dev)")
    p.add_argument(
        "--output", type=Path, required=True, help="run folder: best/, train_log.json, resume.pt"
    )
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None, help="shorten the schedule")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps")
    p.add_argument("--save-every", type=int, default=50, help="resume point every N steps")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop this run after step N (resume later)"
    )
    p.add_argument("--fresh", action="store_true", help="ignore OUTPUT/resume.pt")
    p.add_argument("--max-answer-len", type=int, default=MAX_ANSWER_LEN)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX exports and teacher logits")
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        help="exported reader folder (model.onnx) or fp32 checkpoint; repeat for an ensemble",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the gold cross-entropy")
    p.add_argument("--temperature", type=float, default=2.0)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        max_steps=args.max_steps,
        warmup=args.warmup,
        max_length=MAX_LENGTH,
        stride=STRIDE,
        max_answer_len=args.max_answer_len,
    )


def parse_layers(text: str | None) -> list[int] | None:
    if not text or text == "all":
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--student-layers {text!r}: e.g. 0,2,4") from None


def _add_args(p: argparse.ArgumentParser) -> None:
    add_loop_args(p)
    p.add_argument(
        "--student-from",
        default=None,
        help="checkpoint to cut the student from (default: first fp32 teacher, else MiniLM)",
    )
    p.add_argument(
        "--student-layers", type=parse_layers, default=[0, 2, 4], help="e.g. 0,2,4, or all"
    )


def _run(args: argparse.Namespace) -> int:
    res = distill_reader(
        args.train,
        args.dev,
        args.output,
        args.teacher,
        loop_config(args),
        student_from=args.student_from,
        student_layers=args.student_layers,
        alpha=args.alpha,
        temperature=args.temperature,
        cache_dir=args.cache_dir,
        threads=args.threads,
        stop_after=args.stop_after,
        fresh=args.fresh,
    )
    best = res["best"] or {}
    summary = {"best_step": best.get("step"), **best.get("all", {}), "wall_s": res["wall_s"]}
    print(json.dumps({**summary, "output": str(args.output / "best")}))
    return 0


COMMAND = Command(
    "distill-reader",
    "distil the reader into a smaller student",
    _add_args,
    _run,
    module="qaserve.offline.distill_reader",
    doc=__doc__,
    logs=True,
)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
