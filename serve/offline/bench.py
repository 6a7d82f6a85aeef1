"""`qaserve bench reader`: the book's PerformanceBenchmark for the extractive reader.

One process, one question set, one thread budget for every variant: the fp32 checkpoint run
in torch (the baseline), and its ONNX exports fp32, ORT-optimised fp32 and dynamic int8.
Reported per variant: SubjQA EM/F1 of the top-1 answer on the gold review (no-answer allowed),
latency per question at batch 1 (median and p95 after a warm-up), model file size, and
throughput at batches of 8 and 32 questions; then ratios against the baseline, the issue's
targets as PASS/FAIL, a JSON report and the book's accuracy-vs-latency bubble plot.

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

from qaserve.config import ReaderConfig, default_cache_dir
from qaserve.deployments.onnx_export import (
    INPUT_NAMES,
    ONNX_NAME,
    checkpoint_hash,
    export_reader,
    read_export_meta,
    resolve_checkpoint,
)
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve.metrics import squad_em_f1
from qaserve.threads import bound_threads, cpu_budget
from qaserve_client.schema import ModelInfo, ReadDocument

VARIANTS = ("torch", "onnx-fp32", "onnx-fp32-opt", "onnx-int8")
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
        self.cfg = cfg or ReaderConfig(model=str(checkpoint), precision="fp32", optimize=False)
        self.folder = resolve_checkpoint(checkpoint)
        self.meta = {"format": "torch-fp32", "source": str(checkpoint)}
        self.max_batch_windows = max(1, max_batch_windows)
        self._load_tokenizer()
        self._load_session(cpu_budget(threads))

    def _load_session(self, threads: int) -> None:
        import torch
        from transformers import AutoModelForQuestionAnswering

        torch.set_num_threads(threads)
        model = AutoModelForQuestionAnswering.from_pretrained(self.folder).float().eval()
        accepted = inspect.signature(model.forward).parameters
        self.input_names = [n for n in INPUT_NAMES if n in accepted]
        self.session = _TorchSession(model)
        self.device = "cpu"

    def info(self) -> ModelInfo:
        return ModelInfo(
            stage="reader",
            model=str(self.cfg.model),
            format="torch-fp32",
            size_mb=round(weights_bytes(self.folder) / 2**20, 2),
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
    if isinstance(reader, TorchReader):
        return weights_bytes(reader.folder)
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
            f"on this machine (nor its export in {cache_dir}). Pass the checkpoint with "
            f"--model, or recreate it: {self.hint}",
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
    models: Models, variants: Sequence[str], cache_dir: Path, threads: int
) -> dict[str, Reader]:
    readers: dict[str, Reader] = {}
    for variant in variants:
        if variant == "torch":
            if models.checkpoint is None:
                raise models.missing(variant, cache_dir)
            readers[variant] = TorchReader(models.checkpoint, threads=threads)
        else:
            folder = models.folder(variant, cache_dir)
            cfg = ReaderConfig(model=str(folder), precision="fp32", optimize=False)
            readers[variant] = Reader(cfg, cache_dir, threads=threads)
    return readers


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
        scores = [
            squad_em_f1(p, [a.text for a in ex.answers])
            for p, ex in zip(preds[name], examples, strict=True)
        ]
        lat = np.asarray(times[name])
        results[name] = {
            "em": round(float(np.mean([s[0] for s in scores])), 4),
            "f1": round(float(np.mean([s[1] for s in scores])), 4),
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


def add_ratios(variants: dict[str, dict[str, Any]], baseline: str) -> None:
    """Each variant against the baseline: speed-up, times smaller, EM/F1 deltas in points."""
    base = variants[baseline]
    for row in variants.values():
        row["ratios"] = {
            "speedup_median": round(base["latency_ms"]["median"] / row["latency_ms"]["median"], 3),
            "speedup_p95": round(base["latency_ms"]["p95"] / row["latency_ms"]["p95"], 3),
            "size_ratio": round(base["size_mb"] / row["size_mb"], 3),
            "em_delta_points": round(100 * (row["em"] - base["em"]), 2),
            "f1_delta_points": round(100 * (row["f1"] - base["f1"]), 2),
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


def format_table(report: dict[str, Any]) -> str:
    baseline = report["baseline"]
    sizes = [str(s) for s in report["batch_sizes"]]
    head = (
        f"{'variant':<14} {'size MB':>8} {'smaller':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'speed-up':>8} {'EM %':>6} {'F1 %':>6} {'dEM':>6} {'dF1':>6}"
        + "".join(f" {'q/s@' + s:>8}" for s in sizes)
    )
    lines = [head, "-" * len(head)]
    for name, row in report["variants"].items():
        r = row["ratios"]
        lines.append(
            f"{name:<14} {row['size_mb']:>8.1f} {r['size_ratio']:>6.2f}x "
            f"{row['latency_ms']['median']:>8.2f} {row['latency_ms']['p95']:>8.2f} "
            f"{r['speedup_median']:>7.2f}x {100 * row['em']:>6.1f} {100 * row['f1']:>6.1f} "
            f"{r['em_delta_points']:>+6.1f} {r['f1_delta_points']:>+6.1f}"
            + "".join(f" {row['throughput_qps'][s]:>8.1f}" for s in sizes)
        )
    lines.append(
        f"ratios against {baseline}; dEM/dF1 in points; latency per question at batch 1 over "
        f"{report['questions']} questions after {report['warmup']} warm-up; "
        f"{report['machine']['threads']} threads"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """The book's plot: accuracy against median latency, bubble area = model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    biggest = max(r["size_mb"] for r in rows.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("em", "f1"), strict=True):
        for i, (name, r) in enumerate(rows.items()):
            ax.scatter(
                r["latency_ms"]["median"],
                100 * r[metric],
                s=1500 * r["size_mb"] / biggest,
                alpha=0.5,
                color=f"C{i}",
                edgecolors="k",
                label=f"{name} ({r['size_mb']:.0f} MB)",
            )
        legend = ax.legend(loc="best", fontsize=8, labelspacing=1.2)
        for handle in legend.legend_handles:
            handle.set_sizes([60])  # the legend names a variant; its bubble says the size
        ys = [100 * r[metric] for r in rows.values()]
        xs = [r["latency_ms"]["median"] for r in rows.values()]
        pad_y = max(2.0, (max(ys) - min(ys)) * 0.3)
        ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
        ax.set_xlim(0, max(xs) * 1.3)
        ax.set_xlabel("median latency per question, batch 1 (ms)")
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"reader benchmark: {report['data_name']} ({report['questions']} questions, "
        f"{report['machine']['threads']} threads); bubble area = model size",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
) -> dict[str, Any]:
    """Run the benchmark; write reader.json and reader.png under `output`; return the report."""
    from qaserve.subjqa import load_subjqa

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variants {unknown}; expected some of {VARIANTS}")
    threads = bound_threads(threads)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = locate_models(model, cache_dir)
    data = Path(data)
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
    readers = build_readers(models, list(variants), cache_dir, threads)
    load_s = round(time.perf_counter() - t0, 1)
    results = measure(readers, examples, min(warmup, len(examples)), batch_sizes, progress)

    rows: dict[str, dict[str, Any]] = {}
    for name, reader in readers.items():
        rows[name] = {
            "format": reader.meta.get("format", name),
            "path": str(reader.folder),
            "size_mb": round(model_bytes(reader) / 2**20, 2),
            **results[name],
        }
    baseline = next(v for v in ("torch", "onnx-fp32", *rows) if v in rows)
    add_ratios(rows, baseline)
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
        "variants": rows,
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
        warmup=args.warmup,
        batch_sizes=batch_sizes,
        progress=not args.quiet,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(format_table(report))
    failed = False
    for t in report["targets"]:
        failed |= not t["pass"]
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']} (got {t['value']})")
    print(f"wrote {args.output / 'reader.json'} and {args.output / 'reader.png'}")
    return 1 if failed and args.check else 0


def register(subparsers: Any) -> None:
    """Add `bench reader` to a CLI's argparse subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: reader and encoder, torch vs ONNX")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser(
        "reader",
        help="accuracy, latency, size and throughput of the reader's torch and ONNX variants",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="fp32 QA checkpoint (dir or hub id), or an exported reader folder whose "
        "export.json names its checkpoint (e.g. serve/assets/reader)",
    )
    p.add_argument("--data", type=Path, required=True, help="SubjQA CSV or domain folder")
    p.add_argument("--split", default="test", help="split file in a domain folder (default test)")
    p.add_argument("--questions", type=int, default=None, help="first N questions (default all)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--output", type=Path, default=Path("runs/bench"), help="folder for JSON+PNG")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--warmup", type=int, default=10, help="untimed questions per variant")
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)

    from qaserve.offline import bench_encoder

    bench_encoder.register(sub)
