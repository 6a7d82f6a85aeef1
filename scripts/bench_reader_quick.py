"""Quick reader benchmark: torch fp32 vs ONNX fp32 / fp32-opt / int8 at MiniLM-L6 size.

The model is the packaged all-MiniLM-L6-v2 encoder under a random QA head: the size and
speed of the reader that `qaserve train-reader` produces, not its accuracy. Reported per
variant: file size, model forward at batch 1 (median ms over --runs) for a typical SubjQA
review and for a full 384-token window, `Reader.read` end to end (tokenise, run, decode) for
the typical review, and how often its top span equals ONNX fp32's (which matches torch to
1e-5) over --pairs SubjQA (question, review) pairs. `--quant-study` also times and scores
the dynamic-int8 settings that `onnx_export.QUANT` was chosen from.

    HF_HUB_OFFLINE=1 python scripts/bench_reader_quick.py --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from qaserve.config import ReaderConfig, default_cache_dir, packaged_embedder
from qaserve.deployments.onnx_export import ONNX_NAME, export_reader
from qaserve.deployments.reader import Reader
from qaserve.threads import bound_threads
from qaserve_client.schema import ReadDocument

SUBJQA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "subjqa"
FALLBACK = [
    (
        "How is the battery?",
        "I bought these headphones for my commute. The battery lasts about 12 hours on a single "
        "charge, and a quick 10 minute charge gives another two hours. The noise cancelling is "
        "decent on the train but struggles with wind. The ear cushions get warm after an hour.",
    ),
    (
        "Is the sound good?",
        "Sound quality is warm with a bit too much bass for my taste, but the app's equaliser "
        "fixes that. Pairing with my laptop and phone at the same time works well. The case is "
        "bulky, so they do not fit in a jacket pocket. Calls sound clear to the other side.",
    ),
]


def load_pairs(data: Path, n: int) -> list[tuple[str, str]]:
    """(question, review) pairs from SubjQA electronics dev, one per question."""
    path = data / "electronics" / "dev.csv"
    if not path.exists():
        return FALLBACK * (n // len(FALLBACK) + 1)
    seen: dict[str, tuple[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            review = row["review"].removesuffix(" ANSWERNOTFOUND").strip()
            seen.setdefault(row["q_review_id"], (row["question"], review))
    return list(seen.values())[:n]


def build_checkpoint(dest: Path, head_std: float | None) -> Path:
    """The packaged MiniLM-L6 encoder under a random QA head (seeded, so runs compare)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    if (dest / "config.json").exists():
        return dest
    torch.manual_seed(0)
    src = packaged_embedder()
    model = AutoModelForQuestionAnswering.from_pretrained(src)
    if head_std is not None:
        with torch.no_grad():
            model.qa_outputs.weight.normal_(0.0, head_std)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def timed_medians(jobs: dict[str, Any], runs: int) -> dict[str, float]:
    """Median ms of each job, measured round-robin so that load from other processes on a
    shared machine falls on every variant alike rather than on whichever ran last."""
    for fn in jobs.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            jobs[name]()
            times[name].append((time.perf_counter() - t) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def encode(checkpoint: Path, question: str, context: str, window: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    if window:  # a full 384-token window: repeat the context until it overflows
        context = (context + " ") * 20
    enc = tok(question, context, truncation="only_second", max_length=384, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def torch_jobs(checkpoint: Path, feeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(checkpoint).eval()

    def job(inputs: dict[str, Any]) -> Any:
        def run() -> None:
            with torch.inference_mode():
                model(**inputs)

        return run

    return {
        f"forward_ms_{label}": job({k: torch.from_numpy(v) for k, v in f.items()})
        for label, f in feeds.items()
    }


def onnx_jobs(reader: Reader, feeds: dict[str, dict[str, Any]], pair: tuple[str, str]):
    names = [i.name for i in reader.session.get_inputs()]
    jobs: dict[str, Any] = {}
    for label, f in feeds.items():
        inputs = {n: f[n] for n in names}
        jobs[f"forward_ms_{label}"] = lambda i=inputs: reader.session.run(None, i)
    docs = [ReadDocument(text=pair[1])]
    jobs["read_ms_typical"] = lambda: reader.read(pair[0], docs, top_k=3)
    return jobs


def fidelity(
    reader: Reader, ref: Reader, pairs: list[tuple[str, str]], ref_spans: list[tuple[int, int]]
) -> dict[str, float]:
    """Top-1 span agreement with ONNX fp32, and logit error relative to the logits' spread."""
    same = [
        (best.start, best.end) == want
        for (q, c), want in zip(pairs, ref_spans, strict=True)
        for best in reader.read(q, [ReadDocument(text=c)], top_k=1).answers[:1]
    ]
    err, spread = [], []
    for q, c in pairs[:50]:
        e = ref.tokenizer.encode(q, c)  # the first window
        feeds = {
            "input_ids": np.array([e.ids], np.int64),
            "attention_mask": np.array([e.attention_mask], np.int64),
            "token_type_ids": np.array([e.type_ids], np.int64),
        }
        a, b = (
            r.session.run(
                ["start_logits"], {i.name: feeds[i.name] for i in r.session.get_inputs()}
            )[0]
            for r in (reader, ref)
        )
        err.append(float(np.sqrt(np.mean((a - b) ** 2))))
        spread.append(float(np.std(b)))
    return {
        "top1_agree_fp32": round(float(np.mean(same)), 3),
        "logit_rel_err": round(float(np.mean(err) / np.mean(spread)), 4),
    }


def top_spans(reader: Reader, pairs: list[tuple[str, str]]) -> list[tuple[int, int]]:
    out = []
    for q, c in pairs:
        best = reader.read(q, [ReadDocument(text=c)], top_k=1).answers[0]
        out.append((best.start, best.end))
    return out


def quant_variants(opt_folder: Path, work: Path) -> list[tuple[str, Path]]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {
        "all-ops": {},
        "all-ops+per_channel": {"per_channel": True},
        "all-ops+reduce_range": {"reduce_range": True},
        "all-ops+per_channel+reduce_range": {"per_channel": True, "reduce_range": True},
        "matmul+attention": {"op_types_to_quantize": ["MatMul", "Attention"]},
        "matmul+attention+per_channel": {
            "op_types_to_quantize": ["MatMul", "Attention"],
            "per_channel": True,
        },
        "matmul-only+per_channel": {"op_types_to_quantize": ["MatMul"], "per_channel": True},
    }
    out = []
    for label, kwargs in settings.items():
        folder = work / "quant" / label
        if not (folder / ONNX_NAME).exists():
            folder.mkdir(parents=True, exist_ok=True)
            for item in opt_folder.iterdir():
                if item.name not in (ONNX_NAME, "export.json"):
                    shutil.copy2(item, folder / item.name)
            quantize_dynamic(
                str(opt_folder / ONNX_NAME),
                str(folder / ONNX_NAME),
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                **kwargs,
            )
        out.append((f"int8 {label}", folder))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--data", type=Path, default=SUBJQA)
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument(
        "--head-std",
        type=float,
        default=None,
        help="re-draw the QA head with this std (default: transformers' init, 0.02); a larger "
        "one makes start/end distributions peaked, as a trained reader's are",
    )
    parser.add_argument("--quant-study", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    threads = bound_threads(args.threads)
    work = args.cache / "bench-reader"
    checkpoint = build_checkpoint(work / f"minilm-l6-qa-{args.head_std or 'init'}", args.head_std)
    variants = ("fp32", "fp32-opt", "int8")
    folders = {v: export_reader(str(checkpoint), args.cache, v) for v in variants}
    readers = {
        f"onnx {v}": Reader(ReaderConfig(model=str(f)), args.cache, threads=threads)
        for v, f in folders.items()
    }
    if args.quant_study:
        for name, folder in quant_variants(folders["fp32-opt"], work / checkpoint.name):
            readers[name] = Reader(ReaderConfig(model=str(folder)), args.cache, threads=threads)
    pairs = load_pairs(args.data, args.pairs)
    ref = readers["onnx fp32"]
    lengths = [len(ref.tokenizer.encode(q, c).ids) for q, c in pairs]
    typical = pairs[int(np.argsort(lengths)[len(lengths) // 2])]  # the median-length pair
    feeds = {
        "typical": encode(checkpoint, *typical, window=False),
        "window384": encode(checkpoint, *typical, window=True),
    }
    load = os.getloadavg()[0]
    print(
        f"MiniLM-L6 reader, {threads} threads, median of {args.runs} round-robin runs; typical "
        f"pair: {feeds['typical']['input_ids'].shape[1]} tokens (median of {len(pairs)} SubjQA "
        f"pairs); load average {load:.1f} on {os.cpu_count()} CPUs at start"
    )

    jobs: dict[str, Any] = {}
    for label, fn in torch_jobs(checkpoint, feeds).items():
        jobs[f"torch fp32|{label}"] = fn
    for name, reader in readers.items():
        for label, fn in onnx_jobs(reader, feeds, typical).items():
            jobs[f"{name}|{label}"] = fn
    timings = timed_medians(jobs, args.runs)

    ref_spans = top_spans(ref, pairs)
    rows = []
    for name in ["torch fp32", *readers]:
        if name == "torch fp32":
            size = (checkpoint / "model.safetensors").stat().st_size
        else:
            size = (readers[name].folder / ONNX_NAME).stat().st_size
        row: dict[str, Any] = {"variant": name, "size_mb": round(size / 2**20, 1)}
        row.update({k.split("|")[1]: v for k, v in timings.items() if k.split("|")[0] == name})
        if name not in ("torch fp32", "onnx fp32"):
            row.update(fidelity(readers[name], ref, pairs, ref_spans))
        rows.append(row)

    cols = [
        "variant",
        "size_mb",
        "forward_ms_typical",
        "forward_ms_window384",
        "read_ms_typical",
        "top1_agree_fp32",
        "logit_rel_err",
    ]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "-")) for c in cols))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
