"""Reader exports beyond the served recipe of onnx_export (fp32 -> optimised -> dynamic int8):
static (calibrated) int8 and bf16, for `qaserve bench reader` to measure beside the rest.

- int8 static: activations get fixed scales from calibration windows instead of being measured
  per call (dynamic int8), in QDQ format (ORT's recommended static format on CPU), U8S8, weights
  per channel, MinMax ranges. The calibration windows enter the cache key: other windows,
  another export.
- bf16: every MatMul computed in bfloat16 (inputs cast, weights stored bf16, output cast back),
  norms and softmax in fp32, as torch autocast does. Whether the runtime can run it is checked
  when it is built: ONNX Runtime's CPU provider has no bf16 MatMul kernel (1.32), and then
  `VariantUnsupported` says so and nothing is cached.

Both derive from the checkpoint's cached fp32 export and live beside it, under
`<cache_dir>/reader/<hash>/<variant>/`, built in a temporary folder and renamed into place
under a file lock, as onnx_export does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.deployments.onnx_export import (
    META_NAME,
    ONNX_NAME,
    export_reader,
    file_lock,
    move_into_place,
    read_export_meta,
)

STATIC_VARIANT = "int8-static"
BF16_VARIANT = "bf16"
# Static int8 settings: the U8S8 QDQ recipe that quantize_static's docs give for VNNI CPUs
# (no reduce_range), per-channel weights as the served dynamic int8 uses, MinMax ranges.
# The ops dynamic int8 quantises in this graph: the matrix products and the embeddings'
# Gather (without it the word-embedding table, half of MiniLM's weights, stays fp32), except
# the FFN down-projections: their input, the GELU output, has outliers that one fixed 8-bit
# range per tensor cannot hold. Measured on the SubjQA reader (MiniLM-L6), 160 electronics
# train windows, 40 dev windows: mean |logit error| 0.22 of the logits' spread and top-1
# token agreement 0.89 with them quantised, 0.08 and 1.00 without (dynamic int8: 0.06, 0.96).
# Percentile and Entropy calibration keep every window's tensors in memory (17 GB for 160
# windows) and need equal shapes, so MinMax it is.
STATIC_QUANT: dict[str, Any] = {
    "format": "QDQ",
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": False,
    "calibrate_method": "MinMax",
    "op_types": ["MatMul", "Gather"],
    "exclude": "ffn-down",
    "extra_options": {},
}
DEFAULT_CALIBRATION_WINDOWS = 160


class VariantUnsupported(RuntimeError):
    """This ONNX Runtime cannot run the variant here; the message is the reason."""


Feeds = dict[str, np.ndarray]


# --- calibration data ----------------------------------------------------------------------


class _RecordingSession:
    """Stands in for a Reader's InferenceSession: keeps each run's feeds, returns zeros."""

    def __init__(self) -> None:
        self.feeds: list[Feeds] = []

    def run(self, output_names: Sequence[str], feeds: Feeds) -> list[np.ndarray]:
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        shape = feeds["input_ids"].shape
        return [np.zeros(shape, np.float32) for _ in output_names]


def record_feeds(reader: Any, pairs: Sequence[tuple[str, str]], windows: int) -> list[Feeds]:
    """The model inputs a Reader builds for (question, context) pairs, up to `windows` windows.

    The Reader's own tokenisation, windowing and padding make them, so calibration sees what
    serving feeds the graph; the pairs' order decides which ones are used."""
    if windows < 1:
        raise ValueError("calibration needs at least one window")
    session, reader.session = reader.session, _RecordingSession()
    recorder = reader.session
    try:
        for question, context in pairs:
            reader.read(question, [context], top_k=1)
            if sum(f["input_ids"].shape[0] for f in recorder.feeds) >= windows:
                break
    finally:
        reader.session = session
    if not recorder.feeds:
        raise ValueError("no calibration windows: no (question, context) pairs given")
    return recorder.feeds


def feeds_hash(feeds: Sequence[Feeds]) -> str:
    """Content hash of calibration feeds (names, shapes, bytes), for the cache key."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:12]


# --- the exports ---------------------------------------------------------------------------


def export_static_int8(model: str | Path, cache_dir: Path, calibration: Sequence[Feeds]) -> Path:
    """Static int8 of `model` calibrated on `calibration` (Reader feeds, see record_feeds)."""
    if not calibration:
        raise ValueError("static int8 needs calibration feeds")
    feeds = list(calibration)
    key = feeds_hash(feeds)
    recipe = hashlib.sha256(json.dumps(STATIC_QUANT, sort_keys=True).encode()).hexdigest()[:6]

    def build(src: Path, dst: Path, tmp: Path) -> dict[str, Any]:
        return _quantize_static(src, dst, tmp, feeds)

    details = {"windows": sum(f["input_ids"].shape[0] for f in feeds), "hash": key}
    return _derive(model, cache_dir, STATIC_VARIANT, f"{key}-{recipe}", build, details)


def export_bf16(model: str | Path, cache_dir: Path) -> Path:
    """bf16-compute graph of `model`; VariantUnsupported when ONNX Runtime cannot run it."""
    return _derive(model, cache_dir, BF16_VARIANT, "", _to_bf16, {})


def _derive(
    model: str | Path,
    cache_dir: Path,
    variant: str,
    suffix: str,
    build: Callable[[Path, Path, Path], dict[str, Any]],
    calibration: dict[str, Any],
) -> Path:
    fp32 = export_reader(model, cache_dir, "fp32")
    root = fp32.parent
    final = root / (f"{variant}-{suffix}" if suffix else variant)
    if (final / META_NAME).exists():
        return final
    with file_lock(root / f".{final.name}.lock"):
        if (final / META_NAME).exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{variant}-", dir=root))
        try:
            for item in fp32.iterdir():
                if item.name not in (ONNX_NAME, META_NAME):
                    shutil.copy2(item, tmp / item.name)
            started = time.perf_counter()
            details = build(fp32 / ONNX_NAME, tmp / ONNX_NAME, tmp)
            _check_runs(tmp / ONNX_NAME, variant)
            meta = {
                **read_export_meta(fp32),
                "variant": variant,
                "format": f"onnx-{variant}",
                "model_bytes": (tmp / ONNX_NAME).stat().st_size,
                "total_bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
                "seconds": round(time.perf_counter() - started, 2),
                **({"calibration": calibration} if calibration else {}),
                **details,
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            move_into_place(tmp, final, META_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_runs(path: Path, variant: str) -> None:
    """Load the graph as the Reader will; a missing kernel becomes VariantUnsupported."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind error types
        text = str(exc)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            raise VariantUnsupported(
                f"ONNX Runtime {ort.__version__}'s CPUExecutionProvider cannot run it: "
                f"{text.strip()}"
            ) from exc
        raise


class _CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: Sequence[Feeds], names: Sequence[str]) -> None:
        self._feeds = feeds
        self._names = list(names)
        self._it: Iterator[Feeds] = iter(())
        self.rewind()

    def get_next(self) -> Feeds | None:
        feed = next(self._it, None)
        return None if feed is None else {n: feed[n] for n in self._names}

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _quantize_static(src: Path, dst: Path, tmp: Path, feeds: Sequence[Feeds]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    # The step quantize_static asks for: symbolic shapes and ORT's basic graph optimisation.
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    names = [i.name for i in graph.input]
    missing = [n for n in names if n not in feeds[0]]
    if missing:
        raise ValueError(f"calibration feeds lack the model inputs {missing}")
    q = STATIC_QUANT
    quantize_static(
        str(prepared),
        str(dst),
        _CalibrationReader(feeds, names),
        quant_format=getattr(QuantFormat, q["format"]),
        op_types_to_quantize=q["op_types"],
        per_channel=q["per_channel"],
        reduce_range=q["reduce_range"],
        activation_type=getattr(QuantType, q["activation_type"]),
        weight_type=getattr(QuantType, q["weight_type"]),
        calibrate_method=getattr(CalibrationMethod, q["calibrate_method"]),
        nodes_to_exclude=ffn_down_matmuls(graph, _intermediate_size(tmp)),
        # Not CalibMaxIntermediateOutputs: ORT 1.32 drops (not merges) the ranges collected
        # so far each time it reaches that count. MinMax keeps only each tensor's min and max
        # per run, so all windows fit in memory anyway.
        extra_options=dict(q["extra_options"]),
    )
    prepared.unlink()
    return {"quantization": {"mode": "static", **q}}


def ffn_down_matmuls(graph: Any, intermediate: int) -> list[str]:
    """MatMul nodes whose constant weight maps the FFN's `intermediate` width back down."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul"
        and len(shapes.get(n.input[1], [])) == 2
        and shapes[n.input[1]][0] == intermediate
    ]


def _intermediate_size(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    size = config.get("intermediate_size") or config.get("hidden_dim")  # BERT-likes, DistilBERT
    if not size:
        raise ValueError(f"{folder}/config.json names no FFN width (intermediate_size)")
    return int(size)


def _to_bf16(src: Path, dst: Path, tmp: Path) -> dict[str, Any]:
    """Every MatMul in bf16: constant weights stored as bf16, activations cast on the way in,
    the product cast back to fp32; everything else stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    converted: dict[str, str] = {}  # fp32 initializer -> its bf16 copy
    casts: dict[str, str] = {}  # fp32 activation -> its bf16 cast
    nodes: list[Any] = []
    count = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            nodes.append(node)
            continue
        count += 1
        inputs = []
        for name in node.input:
            init = inits.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT:
                if name not in converted:
                    converted[name] = f"{name}_bf16"
                    graph.initializer.append(_bf16_tensor(numpy_helper.to_array(init), name))
                inputs.append(converted[name])
            else:
                if name not in casts:
                    casts[name] = f"{name}_to_bf16"
                    nodes.append(
                        helper.make_node("Cast", [name], [casts[name]], to=TensorProto.BFLOAT16)
                    )
                inputs.append(casts[name])
        out = node.output[0]
        product = f"{out}_bf16"
        nodes.append(helper.make_node("MatMul", inputs, [product], name=node.name))
        nodes.append(helper.make_node("Cast", [product], [out], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(dst))
    return {"bf16": {"matmuls": count, "weights": len(converted)}}


def _bf16_tensor(values: np.ndarray, name: str) -> Any:
    """fp32 array to a bfloat16 TensorProto, rounded to nearest even."""
    from onnx import TensorProto, helper

    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(
        f"{name}_bf16", TensorProto.BFLOAT16, values.shape, rounded.tobytes(), raw=True
    )
