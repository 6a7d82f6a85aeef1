"""What `qaserve bench reader` needs beyond the served recipe's variants: the calibration
windows of static int8 (SubjQA training questions, fed through the Reader's own windowing),
and the other readers of `--reader NAME=PATH` (a distilled student, a pruned checkpoint),
with the sparsity and compressed size a pruned one is about.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from qaserve.config import ReaderConfig
from qaserve.deployments.onnx_export import export_reader, resolve_checkpoint
from qaserve.deployments.onnx_variants import Feeds, record_feeds
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve.offline.command import named_paths

CALIBRATION_SEED = 0
# The bench compares runtimes and models, not calibrations: spans win or lose against the
# no-answer score by the transformers pipeline's rule (a model's calibration.json is ignored).
BENCH_NULL_WEIGHT = 1.0
# What an extra --reader (a student, a pruned checkpoint) is benched as.
EXTRA_VARIANTS = ("onnx-fp32", "onnx-int8")


def onnx_reader(folder: Path, cache_dir: Path, threads: int) -> Reader:
    """A Reader over an exported folder, as `qaserve serve` would run it, at no-answer
    weight 1 (BENCH_NULL_WEIGHT): every variant and model decides by the same rule."""
    cfg = ReaderConfig(
        model=str(folder), precision="fp32", optimize=False, null_weight=BENCH_NULL_WEIGHT
    )
    return Reader(cfg, cache_dir, threads=threads)


# --- calibration -----------------------------------------------------------------------------


def default_calibration(data: Path) -> Path:
    """The training split beside the benchmark's data: `train.csv` next to a CSV, or the
    domain folder itself (its train split is read)."""
    data = Path(data)
    train = data if data.is_dir() else data.parent / "train.csv"
    if not (train.is_file() or (train / "train.csv").is_file() or (train / "splits").is_dir()):
        raise ConfigError(
            f"onnx-int8-static calibrates on training windows, and {train} holds no train "
            "split: pass "
            "--calibration (a SubjQA train CSV or domain folder), or leave the variant out",
            field="calibration",
        )
    return train


def calibration_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, review) of a SubjQA split, shuffled with a fixed seed: any prefix is a
    sample of the split rather than its first products."""
    from qaserve.subjqa import load_subjqa

    path = Path(path)
    examples = load_subjqa(path, split="train" if path.is_dir() else None)
    if not examples:
        raise ConfigError(f"no questions in {path} to calibrate on", field="calibration")
    pairs = [(ex.question, ex.context) for ex in examples]
    random.Random(CALIBRATION_SEED).shuffle(pairs)
    return pairs


def calibration_feeds(
    checkpoint: Path, cache_dir: Path, pairs: list[tuple[str, str]], windows: int
) -> list[Feeds]:
    """The inputs the served Reader builds for `pairs`, up to `windows` windows; tokenised
    by the checkpoint's own tokenizer (through its fp32 export, which static int8 starts
    from anyway)."""
    fp32 = export_reader(str(checkpoint), cache_dir, "fp32")
    return record_feeds(onnx_reader(fp32, cache_dir, threads=1), pairs, windows)


# --- other readers ---------------------------------------------------------------------------


def parse_reader_specs(specs: list[str] | None) -> dict[str, Path]:
    """`--reader NAME=PATH` strings to {NAME: PATH}; NAME also prefixes variant names
    (NAME/onnx-int8), so it has no '/'."""
    out = named_paths(specs, "--reader")
    for name in out:
        if "/" in name:
            raise ConfigError(
                f"--reader {name!r}: NAME must be unique and have no '/'", field="reader"
            )
    return out


def checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """Layers, parameters, the encoder linears' sparsity and the weights' zlib size: what a
    student or a pruned checkpoint changed (sizes from prune_reader's own helpers)."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from qaserve.offline.prune_reader import compressed_size, sparsity_report

    model = AutoModelForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32)
    info: dict[str, Any] = {
        "path": str(checkpoint),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "intermediate_size": getattr(model.config, "intermediate_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsity": sparsity_report(model)["sparsity"],
    }
    if (checkpoint / "model.safetensors").is_file():
        sizes = compressed_size(checkpoint)
        info["safetensors_mb"] = round(sizes["safetensors_bytes"] / 2**20, 2)
        info["zlib_mb"] = round(sizes["zlib_bytes"] / 2**20, 2)
    return info


def exported_info(folder: Path) -> dict[str, Any]:
    """What an exported folder says about itself (its config and export.json)."""
    config = json.loads((folder / "config.json").read_text())
    meta = json.loads((folder / "export.json").read_text())
    return {
        "path": str(folder),
        "layers": config.get("num_hidden_layers"),
        "intermediate_size": config.get("intermediate_size"),
        "format": meta.get("format"),
        "source": meta.get("source"),
    }


def shipped_others() -> dict[str, Path]:
    """The shipped readers other than the default (a distilled student), benched by default."""
    from qaserve.config import DEFAULT_READER_DIR, REPO_ASSETS, SHIPPED_READERS

    folders = {name: REPO_ASSETS / sub for name, sub in SHIPPED_READERS.items()}
    return {
        name: f
        for name, f in folders.items()
        if f != DEFAULT_READER_DIR and (f / "model.onnx").is_file()
    }


def extra_readers(
    specs: dict[str, Path], cache_dir: Path, threads: int
) -> tuple[dict[str, Reader], dict[str, dict[str, Any]]]:
    """Each checkpoint's EXTRA_VARIANTS as `NAME/variant` readers, and its checkpoint_info."""
    readers: dict[str, Reader] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name, path in specs.items():
        if (path / "model.onnx").is_file():  # an exported folder (a shipped reader): as served
            readers[f"{name}/onnx-int8"] = onnx_reader(path, cache_dir, threads)
            infos[name] = exported_info(path)
            continue
        try:
            checkpoint = resolve_checkpoint(path)
            infos[name] = checkpoint_info(checkpoint)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--reader {name}={path}: not a QA checkpoint directory ({exc})", field="reader"
            ) from exc
        for variant in EXTRA_VARIANTS:
            folder = export_reader(str(checkpoint), cache_dir, variant.removeprefix("onnx-"))
            readers[f"{name}/{variant}"] = onnx_reader(folder, cache_dir, threads)
    return readers, infos
