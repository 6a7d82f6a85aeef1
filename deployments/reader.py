"""Extractive reader: an ONNX Runtime QA model over sliding windows, with the QA pipeline's rules.

Span selection follows transformers' question-answering pipeline (v4.x; v5 removed it): the
question goes first and the context is cut into windows of `max_seq_len` tokens overlapping
by `doc_stride`; start/end logits are softmaxed over the context tokens and [CLS]; a span's
score is p_start * p_end with end - start < max_answer_len; spans are widened to whole words
and the same text (case-insensitive) found twice in one document sums its scores. Unlike the
pipeline, every window of every document (and, in `read_batch`, of every request) goes through
one `session.run`, padded to the longest window.

Where this differs from the pipeline, on purpose:
- the question is cut to `max_question_len` tokens (the pipeline's fast path fails on long
  questions instead);
- spans the pipeline would return with score 0 (padding candidates when a context has fewer
  spans than asked for, e.g. end before start) are dropped;
- several documents: answers from all documents are ranked together. A document's no-answer
  score is the pipeline's (min over its windows of p_start[CLS] * p_end[CLS]). The reported
  no-answer score is, by `ReaderConfig.no_answer`, the highest over the documents read
  ("most_confident", the default: a span must beat every document's "no answer") or that of
  the document holding the best span ("best_document": the empty answer wins exactly when
  the pipeline run on that document alone would return it). Softmax scores are per window,
  so a span from a review that does not answer the question is not comparable with another
  review's spans; on the SubjQA dev splits the strict rule is 15 points of F1 better.

The serving path needs only onnxruntime, tokenizers and numpy; torch is imported only when a
checkpoint has to be exported first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.cancel import CancelToken, check
from qaserve.config import EngineConfig, ReaderConfig
from qaserve.deployments.onnx_export import ONNX_NAME, export_reader, read_export_meta
from qaserve.errors import BadRequest, ConfigError
from qaserve.threads import cpu_budget
from qaserve_client.schema import Answer, ModelInfo, ReadDocument, ReadResponse

_MASKED = np.float32(-10000.0)  # what the pipeline writes over non-context logits


@dataclass
class _Job:
    question: str
    documents: list[Any]
    top_k: int
    max_answer_len: int
    handle_impossible_answer: bool


@dataclass
class _Window:
    job: int
    doc: int
    encoding: Any  # tokenizers.Encoding


class Reader:
    """Top-k answer spans for a question over a list of documents."""

    def __init__(
        self,
        cfg: ReaderConfig,
        cache_dir: Path,
        threads: int | None = None,
        max_batch_windows: int = 32,
    ) -> None:
        """`max_batch_windows` caps one session.run, bounding memory for 100-document reads."""
        self.cfg = cfg
        self.folder = _model_folder(cfg, Path(cache_dir))
        self.meta = read_export_meta(self.folder)
        self.null_weight = null_weight(cfg, self.folder)
        self.max_batch_windows = max(1, max_batch_windows)
        self._load_tokenizer()
        self._load_session(cpu_budget(threads))

    # --- public API ----------------------------------------------------------------------

    def read(
        self,
        question: str,
        documents: Sequence[ReadDocument | str],
        top_k: int = 3,
        max_answer_len: int | None = None,
        handle_impossible_answer: bool = False,
        cancel: CancelToken | None = None,
    ) -> ReadResponse:
        if max_answer_len is None:
            max_answer_len = self.cfg.max_answer_len
        job = _Job(question, list(documents), top_k, max_answer_len, handle_impossible_answer)
        return self._run([job], cancel)[0]

    def read_batch(
        self, requests: Sequence[Any], cancel: CancelToken | None = None
    ) -> list[ReadResponse]:
        """Several ReadRequest-like objects (or dicts) with all their windows in one run.
        A set `cancel` stops the work before the next session run (qaserve.cancel)."""
        return self._run([self._job(r) for r in requests], cancel)

    def info(self) -> ModelInfo:
        size = (self.folder / ONNX_NAME).stat().st_size / 2**20
        return ModelInfo(
            stage="reader",
            model=str(self.cfg.model),
            format=self.meta.get("format", "onnx"),
            size_mb=round(size, 2),
            device=self.device,
        )

    # --- loading -------------------------------------------------------------------------

    def _load_tokenizer(self) -> None:
        from tokenizers import Tokenizer

        path = self.folder / "tokenizer.json"
        if path.exists():
            tok = Tokenizer.from_file(str(path))
        else:  # a folder from other tools: let transformers build the fast tokenizer
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.folder).backend_tokenizer
        conf_path = self.folder / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        tok.no_padding()  # windows are padded here, per session.run
        tok.no_truncation()
        self._plain = Tokenizer.from_str(tok.to_str())  # for questions alone, never truncated
        self.question_first = conf.get("padding_side", "right") == "right"
        self.context_seq = 1 if self.question_first else 0
        max_len = int(conf.get("model_max_length") or 10**9)
        self.max_seq_len = min(self.cfg.max_seq_len, max_len)
        # The tokenizer refuses a stride that is not below the room left for the context.
        specials = tok.post_processor.num_special_tokens_to_add(True) if tok.post_processor else 0
        self.max_question_len = min(
            self.cfg.max_question_len, self.max_seq_len - specials - self.cfg.doc_stride - 1
        )
        if self.max_question_len < 1:
            raise ConfigError(
                f"max_seq_len ({self.max_seq_len}) leaves no room for a question beside "
                f"doc_stride ({self.cfg.doc_stride})",
                field="reader.doc_stride",
            )
        tok.enable_truncation(
            self.max_seq_len,
            stride=self.cfg.doc_stride,
            strategy="only_second" if self.question_first else "only_first",
        )
        self.cls_id = _token_id(tok, conf.get("cls_token"))
        pad_id = _token_id(tok, conf.get("pad_token"))
        self.pad_id = 0 if pad_id is None else pad_id
        self.pad_type_id = int(conf.get("pad_token_type_id", 0))
        self.tokenizer = tok

    def _load_session(self, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No busy-waiting after a run: spinning ORT threads hold cores that the other stages'
        # replicas (and the other sessions) on the same machine need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        device = self.cfg.device
        # On CUDA, prefer precision fp32: ORT runs the int8 ops (DynamicQuantizeMatMul, ...)
        # on the CPU only, so an int8 graph would bounce between the devices.
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.session = ort.InferenceSession(
            str(self.folder / ONNX_NAME), options, providers=providers
        )
        self.device = "cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ConfigError(f"{self.folder}: unexpected model inputs {sorted(unknown)}")

    # --- the work ------------------------------------------------------------------------

    def _job(self, request: Any) -> _Job:
        if isinstance(request, Mapping):
            get = request.get
        else:

            def get(key: str, default: Any = None) -> Any:
                return getattr(request, key, default)

        question = get("question")
        if not isinstance(question, str):
            raise BadRequest("a read request needs a question", field="question")
        max_answer_len = get("max_answer_len")
        return _Job(
            question,
            list(get("documents") or []),
            int(get("top_k", 3)),
            int(max_answer_len) if max_answer_len is not None else self.cfg.max_answer_len,
            bool(get("handle_impossible_answer", False)),
        )

    def _run(self, jobs: list[_Job], cancel: CancelToken | None = None) -> list[ReadResponse]:
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[int, int]] = []
        for j, job in enumerate(jobs):
            if not job.question or not job.question.strip():
                raise BadRequest("the question must not be empty", field="question")
            if job.top_k < 1 or job.max_answer_len < 1:
                raise BadRequest("top_k and max_answer_len must be at least 1")
            question = self._cut_question(job.question)
            for d, doc in enumerate(job.documents):
                text = _text(doc)
                pairs.append((question, text) if self.question_first else (text, question))
                owners.append((j, d))
        windows: list[_Window] = []
        if pairs:
            for (j, d), enc in zip(owners, self.tokenizer.encode_batch(pairs), strict=True):
                windows.extend(_Window(j, d, e) for e in (enc, *enc.overflowing))
        starts, ends = self._logits(windows, cancel)
        rows: list[list[int]] = [[] for _ in jobs]
        for i, w in enumerate(windows):
            rows[w.job].append(i)
        return [self._answers(job, rows[j], windows, starts, ends) for j, job in enumerate(jobs)]

    def _cut_question(self, question: str) -> str:
        enc = self._plain.encode(question, add_special_tokens=False)
        limit = self.max_question_len
        if len(enc.ids) <= limit:
            return question
        return question[: enc.offsets[limit - 1][1]]

    def _logits(
        self, windows: list[_Window], cancel: CancelToken | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start/end logits per window (unpadded), in as few session runs as the cap allows;
        `cancel` is checked before each run."""
        starts: list[np.ndarray] = [np.empty(0, np.float32)] * len(windows)
        ends: list[np.ndarray] = [np.empty(0, np.float32)] * len(windows)
        # Longest first, so a capped chunk pads little.
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].encoding))
        for c in range(0, len(order), self.max_batch_windows):
            check(cancel)
            chunk = order[c : c + self.max_batch_windows]
            encs = [windows[i].encoding for i in chunk]
            width = max(len(e) for e in encs)
            feeds = {
                "input_ids": np.full((len(encs), width), self.pad_id, np.int64),
                "attention_mask": np.zeros((len(encs), width), np.int64),
                "token_type_ids": np.full((len(encs), width), self.pad_type_id, np.int64),
            }
            for row, e in enumerate(encs):
                n = len(e)
                feeds["input_ids"][row, :n] = e.ids
                feeds["attention_mask"][row, :n] = e.attention_mask
                feeds["token_type_ids"][row, :n] = e.type_ids
            out = self.session.run(
                ["start_logits", "end_logits"], {k: feeds[k] for k in self.input_names}
            )
            for row, i in enumerate(chunk):
                n = len(encs[row])
                starts[i] = out[0][row, :n].astype(np.float32)
                ends[i] = out[1][row, :n].astype(np.float32)
        return starts, ends

    def _answers(
        self,
        job: _Job,
        rows: list[int],
        windows: list[_Window],
        starts: list[np.ndarray],
        ends: list[np.ndarray],
    ) -> ReadResponse:
        if not rows:
            return ReadResponse(answers=[], no_answer_score=None)
        encs = [windows[i].encoding for i in rows]
        width = max(len(e) for e in encs)
        valid = np.zeros((len(rows), width), bool)
        start = np.zeros((len(rows), width), np.float32)
        end = np.zeros((len(rows), width), np.float32)
        for r, (i, e) in enumerate(zip(rows, encs, strict=True)):
            n = len(e)
            seq = np.array(e.sequence_ids, dtype=np.float64)  # None -> nan: no sequence
            ok = (seq == self.context_seq) & (np.asarray(e.attention_mask) == 1)
            if self.cls_id is not None:  # [CLS] stays in the softmax (it is the no-answer)
                ok |= np.asarray(e.ids) == self.cls_id
            valid[r, :n] = ok
            start[r, :n] = starts[i]
            end[r, :n] = ends[i]
        p_start, p_end = (
            _softmax(np.where(valid, start, _MASKED)),
            _softmax(np.where(valid, end, _MASKED)),
        )
        null = p_start[:, 0] * p_end[:, 0] * self.null_weight
        p_start[:, 0] = p_end[:, 0] = 0.0

        # Span scores on the band end - start < max_answer_len: [windows, start, length].
        k = job.max_answer_len
        end_idx = np.arange(width)[:, None] + np.arange(k)[None, :]
        inside = end_idx < width
        band = p_start[:, :, None] * p_end[:, np.minimum(end_idx, width - 1)]
        band[:, ~inside] = 0.0
        pre_topk = job.top_k * 2 + 10  # as the pipeline: word alignment may merge some

        per_doc: dict[int, dict[str, dict[str, Any]]] = {}
        doc_null: dict[int, float] = {}
        for r, i in enumerate(rows):
            w = windows[i]
            doc_null[w.doc] = min(doc_null.get(w.doc, 1e6), float(null[r]))
            merged = per_doc.setdefault(w.doc, {})
            flat = band[r].ravel()
            n = min(pre_topk, flat.size)
            top = np.argpartition(-flat, n - 1)[:n] if n < flat.size else np.arange(flat.size)
            top = top[np.argsort(-flat[top], kind="stable")]
            text = _text(job.documents[w.doc])
            for idx in top:
                score = float(flat[idx])
                if score <= 0.0:
                    break
                s, length = divmod(int(idx), k)
                a, b = self._char_span(w.encoding, s, s + length)
                answer = text[a:b]
                key = answer.lower()
                if key in merged:
                    merged[key]["score"] += score
                else:
                    merged[key] = {"answer": answer, "score": score, "start": a, "end": b}

        # Plain dicts until the top k are known: an Answer model per candidate costs more
        # than the span search at batch 1.
        cands: list[dict[str, Any]] = []
        best_doc, best_score = None, -1.0
        for d in sorted(per_doc):
            for cand in per_doc[d].values():
                cands.append({**cand, "doc": d})
                if cand["score"] > best_score:
                    best_doc, best_score = d, cand["score"]
        if best_doc is None or self.cfg.no_answer == "most_confident":
            best_doc = max(doc_null, key=doc_null.__getitem__)  # the most confident no-answer
        no_answer = doc_null[best_doc]
        if job.handle_impossible_answer:
            cands.append({"answer": "", "score": no_answer, "start": 0, "end": 0, "doc": best_doc})
        cands.sort(key=lambda c: c["score"], reverse=True)
        answers = [
            Answer(
                answer=c["answer"],
                score=c["score"],
                start=c["start"],
                end=c["end"],
                document_id=_doc_id(job.documents[c["doc"]], c["doc"]),
            )
            for c in cands[: job.top_k]
        ]
        return ReadResponse(answers=answers, no_answer_score=no_answer)

    def _char_span(self, enc: Any, s: int, e: int) -> tuple[int, int]:
        """Token span to characters of the context, widened to whole words (align_to_words)."""
        try:
            start_word, end_word = enc.token_to_word(s), enc.token_to_word(e)
            a = enc.word_to_chars(start_word, sequence_index=self.context_seq)[0]
            b = enc.word_to_chars(end_word, sequence_index=self.context_seq)[1]
        except Exception:  # tokens with no word (e.g. [CLS]): keep to offsets, as the pipeline
            a, b = enc.offsets[s][0], enc.offsets[e][1]
        return a, b


# --- helpers -------------------------------------------------------------------------------


CALIBRATION_NAME = "calibration.json"


def null_weight(cfg: ReaderConfig, folder: Path) -> float:
    """The configured weight of the no-answer score, else the model folder's calibration
    (`qaserve calibrate-reader`), else 1.0: a model's balance between answering and
    abstaining is a property of its training, so it travels with its weights."""
    if cfg.null_weight is not None:
        return float(cfg.null_weight)
    for where in (folder, Path(str(cfg.model)).expanduser()):  # the export, or its checkpoint
        path = where / CALIBRATION_NAME
        if path.is_file():
            return float(json.loads(path.read_text())["null_weight"])
    return 1.0


def _model_folder(cfg: ReaderConfig, cache_dir: Path) -> Path:
    if cfg.model is None:
        raise ConfigError(
            "no reader model configured: set reader.model to a folder holding model.onnx, "
            "an extractive-QA checkpoint directory or a hub id (train one with "
            "`qaserve train-reader`)",
            field="reader.model",
        )
    path = Path(cfg.model).expanduser()
    if (path / ONNX_NAME).is_file():
        return path
    variant = "int8" if cfg.precision == "int8" else ("fp32-opt" if cfg.optimize else "fp32")
    try:
        return export_reader(cfg.model, cache_dir, variant)
    except Exception as exc:
        raise ConfigError(
            f"reader.model={cfg.model!r} is neither an exported reader folder nor a "
            f"loadable extractive-QA checkpoint: {exc}",
            field="reader.model",
        ) from exc


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _token_id(tok: Any, token: Any) -> int | None:
    if isinstance(token, dict):  # older configs store AddedToken dicts
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def _text(doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping):
        return doc["text"]
    return doc.text


def _doc_id(doc: Any, index: int) -> str:
    doc_id = doc.get("id") if isinstance(doc, Mapping) else getattr(doc, "id", None)
    return str(index) if doc_id is None else str(doc_id)


def build_reader(cfg: EngineConfig, threads: int | None, built: Mapping[str, Any]) -> Reader:
    """The registry's factory (qaserve.stages)."""
    return Reader(cfg.reader, cfg.cache_dir, threads=threads)
