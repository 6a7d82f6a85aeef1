"""Export a checkpoint to ONNX: fp32, ORT-optimised fp32, and dynamic int8. Two kinds: the
extractive-QA reader (start and end logits) and the retriever's encoder (token embeddings;
pooling stays outside the graph, qaserve.deployments.encoder_onnx).

Exports are cached under `<cache_dir>/<kind>/<content-hash>/<variant>/`, keyed by a hash of
the checkpoint's config, weights and tokenizer files (plus this module's export settings), so
a restarted replica reuses them. Each variant is built in a temporary folder and renamed into
place, and a per-variant file lock stops concurrent replicas from exporting the same thing
twice; a reader never sees a half-written export.

torch and transformers are imported only inside the functions that export: serving an
exported folder needs neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp32-opt", "int8")
ONNX_NAME = "model.onnx"
META_NAME = "export.json"
WEIGHTS_DIR = "weights"  # a shipped reader folder's fp16 source weights (write_reader_folder)
OPSET = 17
# Candidate model inputs, in the order the exported graph takes them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("start_logits", "end_logits")
KINDS = ("reader", "encoder")
ENCODER_OUTPUT = "token_embeddings"
# Model types whose graphs onnxruntime's BERT fusions (Attention, EmbedLayerNormalization,
# SkipLayerNormalization, BiasGelu) understand; others get ORT's generic offline optimisation.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"}
# Dynamic int8 settings, chosen by measurement (scripts/bench_reader_quick.py --quant-study:
# MiniLM-L6 under a random QA head, 200 SubjQA pairs, AVX512-VNNI CPU). Per-channel weights
# halve the start-logit error against fp32 (0.16 vs 0.37 of the logits' spread; top-1 span
# agreement 0.72-0.77 vs 0.54-0.57) at the same speed and size. reduce_range only adds error
# on a VNNI CPU (it exists for u8s8 saturation on older AVX2 ones). Quantising every supported
# op (MatMul, Attention, and the Gather / EmbedLayerNormalization of the embeddings) costs no
# accuracy against MatMul+Attention only and makes the file 22 MB instead of 56.
QUANT: dict[str, Any] = {
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": False,
    "op_types": None,  # None = every op type ORT's dynamic quantiser supports
}
# Bump when the export recipe changes, so old cache entries are not reused.
EXPORT_VERSION = 1

_CHECKPOINT_SUFFIXES = {".json", ".txt", ".model", ".safetensors", ".bin"}


# --- locating and hashing a checkpoint -----------------------------------------------------


def resolve_checkpoint(model: str | Path) -> Path:
    """A local directory as is; a hub id through the local HF cache (HF_HUB_OFFLINE applies)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{model}: expected a checkpoint directory or a hub id, got a file")
    text = str(model)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{model}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    local = Path(snapshot_download(str(model), allow_patterns=patterns))
    if not any(local.glob("*.safetensors")):
        local = Path(snapshot_download(str(model), allow_patterns=[*patterns, "*.bin"]))
    return local


def checkpoint_files(path: Path) -> list[Path]:
    """The files that determine an export: config, weights and tokenizer files."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)


def checkpoint_hash(path: Path) -> str:
    """Content hash of a checkpoint (names and bytes) and of this module's export recipe."""
    h = hashlib.sha256()
    recipe = {"version": EXPORT_VERSION, "opset": OPSET, "quant": QUANT}
    h.update(json.dumps(recipe, sort_keys=True).encode())
    files = checkpoint_files(path)
    if not files:
        raise ValueError(f"{path}: no config, weights or tokenizer files to export")
    for file in files:
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:20]


# --- the public entry points ---------------------------------------------------------------


def export_reader(
    model: str | Path, cache_dir: Path, variant: str = "int8", kind: str = "reader"
) -> Path:
    """Export `model` (checkpoint dir or hub id) once; return the cached variant's directory.

    The directory holds model.onnx, the tokenizer files, config.json and export.json.
    Building int8 also caches fp32 and fp32-opt, the steps it is made from.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    src = resolve_checkpoint(model)
    digest = checkpoint_hash(src)
    root = Path(cache_dir).expanduser() / kind / digest
    return _ensure_variant(str(model), src, digest, root, variant, kind)


def write_reader_folder(
    model: str | Path,
    dest: Path,
    variant: str = "int8",
    cache_dir: Path | None = None,
    weights: bool = False,
) -> Path:
    """Write a self-contained reader folder (model.onnx, tokenizer, export.json) to `dest`.

    weights=True is the shipped folder: `model`'s weights go into `dest/weights/` as fp16
    safetensors (half the bytes of fp32; loaded back as fp32), and model.onnx is exported
    from those rounded weights, so export.json's source ("weights") and hash name them and
    `qaserve bench reader` rebuilds every variant, torch included, from a fresh clone.
    Replaces `dest` if it exists (the new folder is complete before the old one goes), so
    the committed reader can be refreshed in place.
    """
    dest = Path(dest).expanduser().resolve()
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            source = save_fp16_weights(model, tmp / WEIGHTS_DIR) if weights else model
            built = export_reader(source, cache_dir, variant)
            for item in built.iterdir():
                shutil.copy2(item, tmp / item.name)
            if weights:
                meta = read_export_meta(tmp)
                meta.update(source=WEIGHTS_DIR, weights_from=str(model), weights_dtype="float16")
                (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            old = None
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.time_ns()}")
                dest.rename(old)
            tmp.chmod(0o755)
            tmp.rename(dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_fp16_weights(model: str | Path, dest: Path) -> Path:
    """`model` as a checkpoint folder with fp16 safetensors, config and tokenizer.

    config.json keeps dtype float32, so from_pretrained loads the weights back as fp32: only
    their storage is halved. Refuses weights beyond fp16's range (they would become inf).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    src = resolve_checkpoint(model)
    net = AutoModelForQuestionAnswering.from_pretrained(src, dtype=torch.float32)
    net.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    limit = torch.finfo(torch.float16).max
    for file in sorted(dest.glob("*.safetensors")):
        tensors = load_file(file)
        for name, t in tensors.items():
            if t.is_floating_point():
                if t.abs().max() > limit:
                    raise ValueError(f"{model}: {name} exceeds the fp16 range; keep it fp32")
                tensors[name] = t.to(torch.float16)
        save_file(tensors, file, metadata={"format": "pt"})
    return dest


def read_export_meta(folder: Path) -> dict[str, Any]:
    """export.json of an exported folder ({} for a folder made by other tools)."""
    meta = Path(folder) / META_NAME
    return json.loads(meta.read_text()) if meta.exists() else {}


# --- building variants ---------------------------------------------------------------------


def _ensure_variant(
    source: str, src: Path, digest: str, root: Path, variant: str, kind: str = "reader"
) -> Path:
    final = root / variant
    if (final / META_NAME).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{variant}.lock"):
        if (final / META_NAME).exists():  # another process built it while we waited
            return final
        parent = None
        if variant == "fp32-opt":
            parent = _ensure_variant(source, src, digest, root, "fp32", kind)
        elif variant == "int8":
            parent = _ensure_variant(source, src, digest, root, "fp32-opt", kind)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{variant}-", dir=root))
        try:
            started = time.perf_counter()
            if parent is None:
                details = _export_fp32(src, tmp, kind)
            else:
                for item in parent.iterdir():
                    if item.name not in (ONNX_NAME, META_NAME):
                        shutil.copy2(item, tmp / item.name)
                build = _optimize if variant == "fp32-opt" else _quantize
                details = build(parent / ONNX_NAME, tmp / ONNX_NAME, tmp)
            meta = {
                "source": source,
                "variant": variant,
                "kind": kind,
                "format": f"onnx-{variant}",
                "hash": digest,
                "export_version": EXPORT_VERSION,
                "opset": OPSET,
                "model_bytes": (tmp / ONNX_NAME).stat().st_size,
                "total_bytes": sum(p.stat().st_size for p in tmp.iterdir()),
                "seconds": round(time.perf_counter() - started, 2),
                **details,
            }
            if parent is not None:
                meta["inputs"] = read_export_meta(parent)["inputs"]
            # export.json last: its presence marks a complete folder.
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            move_into_place(tmp, final, META_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s %s (%s) to %s", kind, source, variant, final)
    return final


def move_into_place(tmp: Path, final: Path, marker: str) -> None:
    """One atomic rename of a finished temp folder; losing the race to a complete copy (its
    `marker` file present) is fine. Shared by the export cache and the model store."""
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache or store may be shared
    try:
        tmp.rename(final)
    except OSError:
        if not (final / marker).exists():
            raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An advisory lock where the OS has one; the atomic rename is what guarantees safety."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _export_fp32(src: Path, out: Path, kind: str = "reader") -> dict[str, Any]:
    import torch
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    if not tokenizer.is_fast:
        raise ValueError(f"{src}: ONNX export needs a fast (Rust) tokenizer with tokenizer.json")
    auto = AutoModelForQuestionAnswering if kind == "reader" else AutoModel
    # Eager attention traces to the MatMul/Softmax pattern that ORT fuses into one Attention op.
    try:
        model = auto.from_pretrained(src, attn_implementation="eager")
    except (ValueError, TypeError):
        model = auto.from_pretrained(src)
    model.eval()
    outputs = list(OUTPUT_NAMES) if kind == "reader" else [ENCODER_OUTPUT]

    accepted = inspect.signature(model.forward).parameters
    names = [
        n
        for n in INPUT_NAMES
        if n in accepted and (n == "input_ids" or n in tokenizer.model_input_names)
    ]
    sample = tokenizer(
        ["what is this?", "and that?"],
        ["a short context that is long enough to trace.", "another one."],
        padding=True,
        return_tensors="pt",
    )
    args = tuple(sample[n] for n in names)
    axes = {0: "batch", 1: "sequence"}
    dynamic = {n: axes for n in (*names, *outputs)}
    wrapper = _logits_only(model, names) if kind == "reader" else _hidden_only(model, names)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer notes on shape checks that are constant for every input this model takes.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index operator.*")
        try:
            # The TorchScript exporter's graph is the one ORT's transformer fusions match.
            torch.onnx.export(
                wrapper,
                args,
                str(out / ONNX_NAME),
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except (TypeError, RuntimeError) as exc:  # a torch without the TorchScript exporter
            log.warning("TorchScript export failed (%s); using the dynamo exporter", exc)
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                wrapper,
                args,
                str(out / ONNX_NAME),
                input_names=names,
                output_names=outputs,
                dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
                opset_version=18,
                external_data=False,
                dynamo=True,
            )
    tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    return {"inputs": names, "model_type": model.config.model_type}


def _logits_only(model: Any, names: list[str]) -> Any:
    """Wrap a QA model so its positional inputs are `names` and it returns just the logits."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(**dict(zip(names, tensors, strict=True)), return_dict=True)
            return out.start_logits, out.end_logits

    return LogitsOnly()


def _hidden_only(model: Any, names: list[str]) -> Any:
    """Wrap an encoder so its positional inputs are `names` and it returns the token states."""
    import torch

    class HiddenOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            out = self.model(**dict(zip(names, tensors, strict=True)), return_dict=True)
            return out.last_hidden_state

    return HiddenOnly()


def _optimize(src: Path, dst: Path, folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type in BERT_LIKE:
        from onnxruntime.transformers.optimizer import optimize_model

        heads = config.get("num_attention_heads") or config.get("n_heads") or 0
        hidden = config.get("hidden_size") or config.get("dim") or 0
        optimized = optimize_model(
            str(src), model_type="bert", num_heads=int(heads), hidden_size=int(hidden)
        )
        optimized.save_model_to_file(str(dst))
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        return {"optimizer": "onnxruntime.transformers bert", "fused_ops": fused}
    import onnxruntime as ort

    options = ort.SessionOptions()
    # EXTENDED, not ALL: ALL adds layout changes tied to the exporting machine's CPU.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return {"optimizer": "onnxruntime offline ORT_ENABLE_EXTENDED"}


def _quantize(src: Path, dst: Path, folder: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=QUANT["op_types"],
        per_channel=QUANT["per_channel"],
        reduce_range=QUANT["reduce_range"],
        weight_type=getattr(QuantType, QUANT["weight_type"]),
        # Shape inference cannot type the outputs of ORT's fused contrib ops (Attention, ...).
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"quantization": {"mode": "dynamic", **QUANT}}
