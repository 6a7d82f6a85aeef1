"""The retriever's encoder on ONNX Runtime (fp32 or dynamic int8), behind the Embedder's
interface: the same tokenizer, pooling and normalisation as sentence-transformers, so its
vectors live in the same space as the torch encoder's and a store needs no re-ingest.

The graph returns token embeddings; pooling (the model's 1_Pooling config: mean, CLS or max)
and L2 normalisation run in numpy, so one export recipe serves any BERT-like encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.config import EmbedderConfig
from qaserve.threads import bound_threads
from qaserve_client.schema import ModelInfo

from .onnx_export import ONNX_NAME, export_reader, read_export_meta, resolve_checkpoint


def pooling_mode(model_dir: Path) -> str:
    """The sentence-transformers pooling of `model_dir` (mean when it says nothing)."""
    modules = model_dir / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                cfg = model_dir / module.get("path", "") / "config.json"
                if cfg.exists():
                    data = json.loads(cfg.read_text())
                    for mode in ("cls_token", "max_tokens", "mean_tokens"):
                        if data.get(f"pooling_mode_{mode}"):
                            return mode.removesuffix("_tokens").removesuffix("_token")
    return "mean"


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Sentence vectors from token states, as sentence-transformers' Pooling + Normalize."""
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = np.where(mask[..., None] > 0, hidden, -1e9).max(axis=1)
    else:
        weights = mask[..., None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)


class OnnxEmbedder:
    """The Embedder interface (dim, tokenizer, max_tokens, embed, info) on ONNX Runtime."""

    def __init__(
        self, cfg: EmbedderConfig, cache_dir: Path, threads: int | None = None, variant: str = ""
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.variant = variant or ("int8" if cfg.runtime == "onnx-int8" else "fp32-opt")
        source = resolve_checkpoint(cfg.model)
        self.folder = export_reader(source, cache_dir, self.variant, kind="encoder")
        self.meta = read_export_meta(self.folder)
        self.mode = pooling_mode(source)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.folder)
        self.max_seq_length = min(cfg.max_seq_length, int(self.tokenizer.model_max_length))
        options = ort.SessionOptions()
        options.intra_op_num_threads = bound_threads(threads or None)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.folder / ONNX_NAME), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self._dim = int(json.loads((self.folder / "config.json").read_text())["hidden_size"])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_tokens(self) -> int:
        return self.max_seq_length - 2

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Longest first, in batches of similar length: padding costs compute (as in ST).
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        size = max(1, self.cfg.batch_size)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            enc = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="np",
            )
            feed = {name: enc[name].astype(np.int64) for name in self.inputs}
            (hidden,) = self.session.run(None, feed)
            out[rows] = pool(hidden, enc["attention_mask"], self.mode)
        return out

    def info(self) -> ModelInfo:
        from qaserve.deployments.retriever import encoder_name

        size = (self.folder / ONNX_NAME).stat().st_size / 2**20
        return ModelInfo(
            stage="retriever",
            model=encoder_name(self.cfg.model),
            format=f"onnx {self.meta.get('variant', self.variant)} (onnxruntime)",
            size_mb=round(size, 1),
            device="cpu",
        )
