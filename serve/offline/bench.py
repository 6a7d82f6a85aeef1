"""`qaserve bench reader`: the book's PerformanceBenchmark for the extractive reader.

One process, one question set, one thread budget for every variant: the fp32 checkpoint run
in torch (the baseline), and its ONNX exports fp32, ORT-optimised fp32, dynamic int8 (what is
served), static int8 (calibrated on training windows) and bf16 (kept out, with the reason,
where ONNX Runtime's CPU provider cannot run it). `--reader NAME=PATH` adds other checkpoints
(a distilled student, a pruned reader) as their fp32 and int8 exports, through the same path.
The default model is the shipped reader folder (serve/assets/reader), whose weights/ holds the
fp32 weights stored as fp16: a fresh clone runs every variant.
Reported per variant: SubjQA EM/F1 of the top-1 answer on the gold review (no-answer allowed;
SQuAD 2.0's official rule, and the lenient best-over-every-gold figure), latency per question
at batch 1 (median and p95 after a warm-up), model size, and throughput at batches of 8 and
32 questions; then ratios against the torch baseline and against the served int8, the
issue's targets as PASS/FAIL, a JSON report and the book's plot (F1 against latency, bubble
area = size).

transformers 5 removed `pipeline("question-answering")`, so the torch baseline is the same
checkpoint in torch (fp32, eval, inference_mode) behind the ONNX reader's own tokenisation,
windowing, padding and span decoding: only the runtime differs between the variants.

Timed runs are interleaved (blocks of questions, the variants in rotating order) so that load
from other processes on a shared machine falls on every variant alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.config import DEFAULT_READER_DIR, ReaderConfig, default_cache_dir
from qaserve.deployments.onnx_export import (
    INPUT_NAMES,
    ONNX_NAME,
    WEIGHTS_DIR,
    checkpoint_hash,
    export_reader,
    read_export_meta,
    resolve_checkpoint,
)
from qaserve.deployments.onnx_variants import (
    DEFAULT_CALIBRATION_WINDOWS,
    Feeds,
    VariantUnsupported,
    export_bf16,
    export_static_int8,
)
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve.metrics import squad_em_f1
from qaserve.offline.bench_report import format_table, plot
from qaserve.offline.bench_variants import (
    BENCH_NULL_WEIGHT,
    calibration_feeds,
    calibration_pairs,
    default_calibration,
    extra_readers,
    onnx_reader,
    parse_reader_specs,
    shipped_others,
)
from qaserve.offline.command import Command
from qaserve.threads import bound_threads, cpu_budget
from qaserve_client.schema import ModelInfo, ReadDocument

VARIANTS = ("torch", "onnx-fp32", "onnx-fp32-opt", "onnx-int8", "onnx-int8-static", "onnx-bf16")
SERVED = "onnx-int8"  # what `qaserve serve` runs: the second reference of every ratio
DERIVED = ("onnx-int8-static", "onnx-bf16")  # built from the checkpoint by onnx_variants
BATCH_SIZES = (8, 32)
MIN_LATENCY_QUESTIONS = 100
# Batch-1 runs go variant by variant in blocks of this many questions, the variants in rotating
# order: shared-machine load drifts over every variant alike, while a runtime's idle threads
# (torch's OpenMP pool spins a while after a call) rarely sit beside another's timed call.
BLOCK = 10
# The targets for the int8 reader against the fp32 baseline.
TARGET_SPEEDUP = 2.0
TARGET_SIZE_RATIO = 3.5
TARGET_POINTS = 1.0
PIPELINE_NOTE = (
    "transformers 5 removed pipeline('question-answering'); the torch baseline is the same "
    "checkpoint in torch fp32 behind the reader's own pre/post-processing"
)
_REPO = Path(__file__).resolve().parents[2]


# --- the torch baseline --------------------------------------------------------------------


class _TorchSession:
    """The one InferenceSession method that Reader._logits calls, run by a torch model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
        got = {"start_logits": out.start_logits, "end_logits": out.end_logits}
        return [got[name].float().numpy() for name in output_names]


class TorchReader(Reader):
    """A Reader whose logits come from the torch checkpoint instead of an ONNX session.

    Tokenisation, windows, padding, batching and span decoding are Reader's own code, so a
    difference from the ONNX variants is the runtime's alone.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        cfg: ReaderConfig | None = None,
        threads: int | None = None,
        max_batch_windows: int = 32,
    ) -> None:
        self.cfg = cfg or ReaderConfig(
            model=str(checkpoint), precision="fp32", optimize=False, null_weight=BENCH_NULL_WEIGHT
        )
        self.folder = resolve_checkpoint(checkpoint)
        self.null_weight = self.cfg.null_weight or 1.0
        self.meta = {"format": "torch-fp32", "source": str(checkpoint)}
        self.max_batch_windows = max(1, max_batch_windows)
        self._load_tokenizer()
        self._load_session(cpu_budget(threads))

    def _load_session(self, threads: int) -> None:
        import torch
        from transformers import AutoModelForQuestionAnswering

        torch.set_num_threads(threads)
        model = AutoModelForQuestionAnswering.from_pretrained(self.folder).float().eval()
        # The size it runs at (the book's state-dict size): the shipped weights are stored fp16.
        self.fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
        accepted = inspect.signature(model.forward).parameters
        self.input_names = [n for n in INPUT_NAMES if n in accepted]
        self.session = _TorchSession(model)
        self.device = "cpu"

    def info(self) -> ModelInfo:
        return ModelInfo(
            stage="reader",
            model=str(self.cfg.model),
            format="torch-fp32",
            size_mb=round(self.fp32_bytes / 2**20, 2),
            device=self.device,
        )


def weights_bytes(checkpoint: Path) -> int:
    """Bytes of a checkpoint's weight files (safetensors, else PyTorch .bin)."""
    files = sorted(checkpoint.glob("model*.safetensors")) or sorted(
        checkpoint.glob("pytorch_model*.bin")
    )
    if not files:
        raise ConfigError(f"{checkpoint}: no model*.safetensors or pytorch_model*.bin weights")
    return sum(f.stat().st_size for f in files)


def model_bytes(reader: Reader) -> int:
    """The torch model's fp32 state dict; an ONNX variant's model.onnx."""
    if isinstance(reader, TorchReader):
        return reader.fp32_bytes
    return (reader.folder / ONNX_NAME).stat().st_size


# --- finding the models ----------------------------------------------------------------------


@dataclass
class Models:
    """Where each variant comes from: the fp32 checkpoint and/or exported folders."""

    checkpoint: Path | None
    exported: dict[str, Path] = field(default_factory=dict)  # variant -> folder with model.onnx
    source: str = ""
    hint: str = ""

    def folder(self, variant: str, cache_dir: Path) -> Path:
        if variant in self.exported:
            return self.exported[variant]
        if self.checkpoint is None:
            raise self.missing(variant, cache_dir)
        return export_reader(str(self.checkpoint), cache_dir, variant.removeprefix("onnx-"))

    def missing(self, variant: str, cache_dir: Path) -> ConfigError:
        return ConfigError(
            f"variant {variant!r} needs the fp32 checkpoint {self.source!r}, which is not "
            f"on this machine (nor its export in {cache_dir}; a folder written by "
            f"write_reader_folder(..., weights=True) carries it in {WEIGHTS_DIR}/). Pass the "
            f"checkpoint with --model, or recreate it: {self.hint}",
            field="model",
        )


def locate_models(model: str | Path, cache_dir: Path) -> Models:
    """A checkpoint (dir or hub id), or an exported folder such as serve/assets/reader.

    For an exported folder, the fp32 checkpoint is its export.json "source" when that path
    still holds the bytes its "hash" names; the other ONNX variants come from the export
    cache under that hash.
    """
    path = Path(model).expanduser()
    if not (path / ONNX_NAME).is_file():
        try:
            checkpoint = resolve_checkpoint(model)
        except Exception as exc:
            raise ConfigError(
                f"--model {model}: neither an exported reader folder (model.onnx) nor a QA "
                f"checkpoint directory or locally cached hub id ({exc})",
                field="model",
            ) from exc
        return Models(checkpoint=checkpoint, source=str(model))
    meta = read_export_meta(path)
    source, digest = str(meta.get("source", "")), str(meta.get("hash", ""))
    models = Models(checkpoint=None, source=source or str(path), hint=_recreate_hint(path))
    models.exported[f"onnx-{meta.get('variant', 'int8')}"] = path
    if not digest:
        return models
    for candidate in (Path(source), _REPO / source, path / source):
        if source and candidate.is_dir() and _same_hash(candidate, digest):
            models.checkpoint = candidate
            break
    cached = Path(cache_dir).expanduser() / "reader" / digest
    for variant in ("fp32", "fp32-opt", "int8"):
        if (cached / variant / "export.json").exists():
            models.exported.setdefault(f"onnx-{variant}", cached / variant)
    return models


def _same_hash(candidate: Path, digest: str) -> bool:
    try:
        return checkpoint_hash(candidate) == digest
    except (OSError, ValueError):
        return False


def _recreate_hint(folder: Path) -> str:
    """The `qaserve train-reader` command from the folder's model card, or the generic one."""
    card = folder / "README.md"
    if card.exists():
        for line in card.read_text(encoding="utf-8").splitlines():
            text = line.strip().strip("`").strip()
            if text.startswith("qaserve train-reader"):
                return f"`{text}` (from {card})"
    return (
        "`qaserve train-reader --train <subjqa>/*/train.csv --dev <subjqa>/*/dev.csv "
        "--output runs/reader-ckpt` (see the model card, README.md, beside the export)"
    )


def build_readers(
    models: Models,
    variants: Sequence[str],
    cache_dir: Path,
    threads: int,
    calibration: Callable[[Path], list[Feeds]] | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, Reader]:
    """One reader per variant. `calibration(checkpoint)` gives static int8 its windows; a
    variant this ONNX Runtime cannot run goes into `skipped` with the reason (raised when
    `skipped` is None)."""
    readers: dict[str, Reader] = {}
    for variant in variants:
        if variant in ("torch", *DERIVED) and models.checkpoint is None:
            raise models.missing(variant, cache_dir)
        if variant == "torch":
            assert models.checkpoint is not None
            readers[variant] = TorchReader(models.checkpoint, threads=threads)
            continue
        try:
            folder = _variant_folder(models, variant, cache_dir, calibration)
        except VariantUnsupported as exc:
            if skipped is None:
                raise
            skipped[variant] = str(exc)
            continue
        readers[variant] = onnx_reader(folder, cache_dir, threads)
    return readers


def _variant_folder(
    models: Models,
    variant: str,
    cache_dir: Path,
    calibration: Callable[[Path], list[Feeds]] | None,
) -> Path:
    checkpoint = models.checkpoint
    if variant == "onnx-int8-static":
        assert checkpoint is not None
        if calibration is None:
            raise ConfigError("onnx-int8-static needs calibration windows", field="calibration")
        return export_static_int8(checkpoint, cache_dir, calibration(checkpoint))
    if variant == "onnx-bf16":
        assert checkpoint is not None
        return export_bf16(checkpoint, cache_dir)
    return models.folder(variant, cache_dir)


# --- measuring -----------------------------------------------------------------------------


def _request(ex: Any) -> dict[str, Any]:
    return {
        "question": ex.question,
        "documents": [ReadDocument(id=ex.review_id or ex.id, text=ex.context)],
        "top_k": 1,
        "handle_impossible_answer": True,
    }


def _top1(response: Any) -> str:
    return response.answers[0].answer if response.answers else ""


def _rotations(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def measure(
    readers: dict[str, Reader],
    examples: Sequence[Any],
    warmup: int = 10,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Accuracy and batch-1 latency from one timed pass, then throughput per batch size."""
    from tqdm.auto import tqdm

    names = list(readers)
    requests = [_request(ex) for ex in examples]
    for req in tqdm(requests[:warmup], desc="warm-up", disable=not progress):
        for name in names:
            readers[name].read(**req)

    preds: dict[str, list[str]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with tqdm(total=len(requests), desc="batch 1", disable=not progress) as bar:
        for b, c in enumerate(range(0, len(requests), BLOCK)):
            for name in _rotations(names, b):
                for req in requests[c : c + BLOCK]:
                    t = time.perf_counter()
                    out = readers[name].read(**req)
                    times[name].append((time.perf_counter() - t) * 1000)
                    preds[name].append(_top1(out))
            bar.update(len(requests[c : c + BLOCK]))

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        golds = [[a.text for a in ex.answers] for ex in examples]
        pairs = list(zip(preds[name], golds, strict=True))
        scores = np.array([squad_em_f1(p, g) for p, g in pairs]).reshape(-1, 2)
        lenient = np.array([squad_em_f1(p, g, official=False) for p, g in pairs]).reshape(-1, 2)
        lat = np.asarray(times[name])
        results[name] = {
            "em": round(float(scores[:, 0].mean()), 4),
            "f1": round(float(scores[:, 1].mean()), 4),
            "lenient_em": round(float(lenient[:, 0].mean()), 4),
            "lenient_f1": round(float(lenient[:, 1].mean()), 4),
            "latency_ms": {
                "median": round(float(np.median(lat)), 3),
                "p95": round(float(np.percentile(lat, 95)), 3),
                "mean": round(float(lat.mean()), 3),
            },
            "throughput_qps": {},
            "batch_agrees_batch1": {},
            "predictions": preds[name],
        }

    for size in batch_sizes:
        chunks = [requests[c : c + size] for c in range(0, len(requests), size)]
        for name in names:  # warm-up: this batch shape's allocations
            readers[name].read_batch(chunks[0])
        spent = {n: 0.0 for n in names}
        batch_preds: dict[str, list[str]] = {n: [] for n in names}
        for i, chunk in enumerate(tqdm(chunks, desc=f"batch {size}", disable=not progress)):
            for name in _rotations(names, i):
                t = time.perf_counter()
                outs = readers[name].read_batch(chunk)
                spent[name] += time.perf_counter() - t
                batch_preds[name].extend(_top1(o) for o in outs)
        for name in names:
            results[name]["throughput_qps"][str(size)] = round(len(requests) / spent[name], 2)
            same = [a == b for a, b in zip(batch_preds[name], preds[name], strict=True)]
            results[name]["batch_agrees_batch1"][str(size)] = round(float(np.mean(same)), 4)
    return results


def add_ratios(variants: dict[str, dict[str, Any]], baseline: str, key: str = "ratios") -> None:
    """Each variant against the baseline: speed-up, times smaller, EM/F1 deltas in points;
    stored under row[key]."""
    base = variants[baseline]
    for row in variants.values():
        row[key] = {
            "speedup_median": round(base["latency_ms"]["median"] / row["latency_ms"]["median"], 3),
            "speedup_p95": round(base["latency_ms"]["p95"] / row["latency_ms"]["p95"], 3),
            "size_ratio": round(base["size_mb"] / row["size_mb"], 3),
            "em_delta_points": round(100 * (row["em"] - base["em"]), 2),
            "f1_delta_points": round(100 * (row["f1"] - base["f1"]), 2),
            "lenient_f1_delta_points": round(100 * (row["lenient_f1"] - base["lenient_f1"]), 2),
            **{
                f"throughput_ratio_{k}": round(v / base["throughput_qps"][k], 3)
                for k, v in row["throughput_qps"].items()
            },
        }


def check_targets(
    variants: dict[str, dict[str, Any]], baseline: str, candidate: str = "onnx-int8"
) -> list[dict[str, Any]]:
    """The issue's targets for int8 against fp32; [] when either side was not benchmarked."""
    if candidate not in variants or baseline not in variants or candidate == baseline:
        return []
    r = variants[candidate]["ratios"]
    checks = [
        (f"{candidate} >= {TARGET_SPEEDUP}x faster than {baseline} at batch 1 (median)",
         r["speedup_median"], r["speedup_median"] >= TARGET_SPEEDUP),
        (f"{candidate} >= {TARGET_SIZE_RATIO}x smaller than {baseline}",
         r["size_ratio"], r["size_ratio"] >= TARGET_SIZE_RATIO),
        (f"{candidate} EM within {TARGET_POINTS} point of {baseline}",
         r["em_delta_points"], abs(r["em_delta_points"]) <= TARGET_POINTS),
        (f"{candidate} F1 within {TARGET_POINTS} point of {baseline}",
         r["f1_delta_points"], abs(r["f1_delta_points"]) <= TARGET_POINTS),
    ]  # fmt: skip
    return [{"target": t, "value": v, "pass": bool(ok)} for t, v, ok in checks]


# --- report ----------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    for module in ("torch", "onnxruntime", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --- the command ---------------------------------------------------------------------------


def bench_reader(
    model: str | Path,
    data: str | Path,
    split: str = "test",
    questions: int | None = None,
    threads: int = 2,
    output: Path = Path("runs/bench"),
    variants: Sequence[str] = VARIANTS,
    cache_dir: Path | None = None,
    warmup: int = 10,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    progress: bool = True,
    log: Callable[[str], None] = print,
    readers: dict[str, Path] | None = None,
    calibration: Path | None = None,
    calibration_windows: int = DEFAULT_CALIBRATION_WINDOWS,
) -> dict[str, Any]:
    """Run the benchmark; write reader.json and reader.png under `output`; return the report.

    `readers`: other checkpoints, {NAME: path}, benched as NAME/onnx-fp32 and NAME/onnx-int8.
    `calibration`: SubjQA split for static int8 (default: the train.csv beside `data`)."""
    from qaserve.subjqa import load_subjqa

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variants {unknown}; expected some of {VARIANTS}")
    threads = bound_threads(threads)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = locate_models(model, cache_dir)
    data = Path(data)
    calibration_info: dict[str, Any] = {}
    if "onnx-int8-static" in variants:
        calibration = Path(calibration) if calibration else default_calibration(data)
        calibration_info = {"data": str(calibration), "windows_wanted": calibration_windows}

    def calibrate(checkpoint: Path) -> list[Feeds]:
        assert calibration is not None
        feeds = calibration_feeds(
            checkpoint, cache_dir, calibration_pairs(calibration), calibration_windows
        )
        calibration_info["windows"] = sum(f["input_ids"].shape[0] for f in feeds)
        calibration_info["questions"] = len(feeds)
        return feeds

    examples = load_subjqa(data, split=split if data.is_dir() else None)
    if questions:
        examples = examples[:questions]
    if not examples:
        raise ConfigError(f"no questions in {data}", field="data")
    if len(examples) < MIN_LATENCY_QUESTIONS:
        log(
            f"note: {len(examples)} questions; latency percentiles want at least "
            f"{MIN_LATENCY_QUESTIONS}"
        )
    log(f"note: {PIPELINE_NOTE}")
    machine = machine_info(threads)

    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    built = build_readers(models, list(variants), cache_dir, threads, calibrate, skipped)
    others, infos = extra_readers(readers or {}, cache_dir, threads)
    built.update(others)
    for name, reason in skipped.items():
        log(f"note: {name} not run: {reason}")
    if not built:
        raise ConfigError(f"no variant could run: {skipped}")
    load_s = round(time.perf_counter() - t0, 1)
    results = measure(built, examples, min(warmup, len(examples)), batch_sizes, progress)

    rows: dict[str, dict[str, Any]] = {}
    for name, reader in built.items():
        rows[name] = {
            "reader": name.split("/")[0] if "/" in name else "model",
            "format": reader.meta.get("format", name),
            "path": str(reader.folder),
            "size_mb": round(model_bytes(reader) / 2**20, 2),
            **results[name],
        }
        if isinstance(reader, TorchReader):
            rows[name]["stored_mb"] = round(weights_bytes(reader.folder) / 2**20, 2)
    baseline = next(v for v in ("torch", "onnx-fp32", *rows) if v in rows)
    add_ratios(rows, baseline)
    if SERVED in rows:
        add_ratios(rows, SERVED, key="vs_served")
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "benchmark": "reader",
        "note": PIPELINE_NOTE,
        "model": str(model),
        "checkpoint": str(models.checkpoint) if models.checkpoint else None,
        "data": str(data),
        "data_name": f"{examples[0].domain or data.stem}/{split if data.is_dir() else data.stem}",
        "questions": len(examples),
        "answerable": sum(any(a.text for a in ex.answers) for ex in examples),
        "warmup": min(warmup, len(examples)),
        "batch_sizes": list(batch_sizes),
        "top_k": 1,
        "handle_impossible_answer": True,
        "load_s": load_s,
        "machine": machine,
        "baseline": baseline,
        "served": SERVED if SERVED in rows else None,
        "variants": rows,
        "skipped": skipped,
        "readers": infos,
        "calibration": calibration_info,
    }
    report["targets"] = check_targets(rows, baseline)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    slim = {**report, "variants": {k: _slim(v) for k, v in rows.items()}}
    (output / "reader.json").write_text(json.dumps(slim, indent=2) + "\n")
    (output / "reader-predictions.json").write_text(
        json.dumps(
            {
                "ids": [ex.id for ex in examples],
                **{k: v["predictions"] for k, v in rows.items()},
            },
            indent=1,
        )
        + "\n"
    )
    plot(report, output / "reader.png")
    return report


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "predictions"}


def _cmd(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    report = bench_reader(
        args.model,
        args.data,
        split=args.split,
        questions=args.questions,
        threads=args.threads,
        output=args.output,
        variants=variants,
        cache_dir=args.cache_dir,
        warmup=args.warmup if args.warmup is not None else (2 if args.questions else 10),
        batch_sizes=batch_sizes,
        progress=not args.quiet,
        log=lambda m: print(m, file=sys.stderr),
        readers={**shipped_others(), **parse_reader_specs(args.reader)},
        calibration=args.calibration,
        calibration_windows=args.calibration_windows,
    )
    print(format_table(report))
    failed = False
    for t in report["targets"]:
        failed |= not t["pass"]
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']} (got {t['value']})")
    print(f"wrote {args.output / 'reader.json'} and {args.output / 'reader.png'}")
    return 1 if failed and args.check else 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=str(DEFAULT_READER_DIR),
        help="exported reader folder whose export.json names its checkpoint (default: the "
        "shipped serve/assets/reader, fp32 weights in its weights/), or an fp32 QA "
        "checkpoint (dir or hub id)",
    )
    p.add_argument(
        "--reader",
        action="append",
        metavar="NAME=PATH",
        help="another fp32 QA checkpoint (a distill-reader or prune-reader OUTPUT/best), "
        "benched as NAME/onnx-fp32 and NAME/onnx-int8, or an exported folder (model.onnx), "
        "benched as served; repeatable. The shipped readers are always in the run",
    )
    p.add_argument("--data", type=Path, required=True, help="SubjQA CSV or domain folder")
    p.add_argument("--split", default="test", help="split file in a domain folder (default test)")
    p.add_argument(
        "--limit",
        "--questions",
        dest="questions",
        metavar="N",
        type=int,
        default=None,
        help="first N questions (default all; a short run for CI)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="SubjQA split whose windows calibrate onnx-int8-static (default: train.csv "
        "beside --data)",
    )
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=DEFAULT_CALIBRATION_WINDOWS,
        help=f"calibration windows (default {DEFAULT_CALIBRATION_WINDOWS})",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--output", type=Path, default=Path("runs/bench"), help="folder for JSON+PNG")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed questions per variant (default 10; 2 with --limit)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


COMMAND = Command(
    name="reader",
    help="accuracy, latency, size and throughput of the reader's torch and ONNX variants",
    add_args=_add_args,
    run=_cmd,
    module="qaserve.offline.bench",
    doc=__doc__,
    doc_in_cli=True,
)
main = COMMAND.main


def register(subparsers: Any) -> None:
    """`qaserve bench reader|encoder|ingest`: the group, then each bench's own Command."""
    from qaserve.offline import bench_encoder, bench_ingest

    bench = subparsers.add_parser("bench", help="benchmarks: reader and encoder, torch vs ONNX")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    for command in (COMMAND, bench_encoder.COMMAND, bench_ingest.COMMAND):
        command.register(sub)


if __name__ == "__main__":
    raise SystemExit(main())
