"""RAG-Token generation: every next token is marginalised over the k retrieved documents.

As in Lewis et al. 2020 (and transformers' RagTokenForGeneration), the document prior
p(z|x) = softmax(retriever scores) weights each document-conditioned next-token distribution:

    log p(y_t | x, y_<t) = logsumexp_z [ log p(z|x) + log p(y_t | x, z, y_<t) ]

The k document-conditioned copies of the prompt run as one batch with a KV cache, so a step
costs one forward pass of k rows (k x beams for beam search), not k separate generations.
Works with causal LMs (prompted through their chat template; GGUF files are dequantised by
transformers) and with seq2seq models (T5/BART, "question: ... context: ..." input).
"""

from __future__ import annotations

import inspect
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from qaserve.cancel import CancelToken, check
from qaserve.config import EngineConfig, GeneratorConfig
from qaserve.deployments.generator_delta import GeneratorDelta
from qaserve.deployments.prior import NO_ANSWER_TEXT, document_prior, generate_response
from qaserve.deployments.span_scores import ScoreRequest, ScoreResponse, SpanScore
from qaserve.errors import BadRequest, ConfigError
from qaserve.threads import bound_threads
from qaserve_client.schema import (
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ReadDocument,
)

SYSTEM_PROMPT = (
    "Answer the question briefly, using only the document. "
    "If the document does not contain the answer, say that you do not know."
)
# End-of-turn markers of common chat templates: a chat model ends its answer with these,
# which are not always its config's eos_token_id.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_LENGTH_PENALTY = 1.0  # beam scores are sum(log p) / len ** penalty, as transformers does
# Prompt tokens (rows x columns) per forward pass of the prompt: 20 documents' prompts in one
# pass hold a core for tens of seconds, and a cancelled request can only stop between passes.
# 512 tokens are ~1.2 s of one core for SmolLM2-135M; the split costs ~1 % more CPU than one
# pass over 5 x 300 tokens (256: ~4 %).
PREFILL_TOKENS = 512


# --- model location and GGUF metadata -------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where from_pretrained reads: a local dir or hub id, plus the GGUF file name if any."""

    name_or_dir: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, model: str) -> _Source:
        path = Path(model).expanduser()
        if path.is_file():
            if path.suffix != ".gguf":
                raise ConfigError(f"generator model {model!r}: a file must be a .gguf", "model")
            return cls(str(path.parent), path.name)
        if path.is_dir() or not model.endswith(".gguf"):
            return cls(str(path) if path.is_dir() else model)
        # "org/repo/file.gguf" on the hub: the last part names the file inside the repo.
        repo, _, filename = model.rpartition("/")
        if not repo:
            raise ConfigError(f"generator model {model!r}: no such GGUF file", "model")
        return cls(repo, filename)

    @property
    def local_gguf(self) -> Path | None:
        if self.gguf_file is None:
            return None
        path = Path(self.name_or_dir) / self.gguf_file
        return path if path.is_file() else None


_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_value(f: Any, vtype: int) -> Any:
    if vtype == _GGUF_STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", "replace")
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    etype, n = struct.unpack("<IQ", f.read(12))
    if etype in _GGUF_SCALARS:
        f.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), os.SEEK_CUR)
    else:
        for _ in range(n):
            _gguf_value(f, etype)
    return None  # arrays are skipped: we only want a few scalars


def gguf_metadata(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """Read a few header keys without gguf.GGUFReader, which parses the whole vocabulary (4 s)."""
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return found
            _, n_kv = struct.unpack("<QQ", f.read(16))
            for _ in range(n_kv):
                (klen,) = struct.unpack("<Q", f.read(8))
                key = f.read(klen).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                value = _gguf_value(f, vtype)
                if key in keys:
                    found[key] = value
                    if len(found) == len(keys):
                        break
    except (OSError, struct.error, ValueError):
        pass
    return found


def _gguf_quantisation(path: Path | None, filename: str) -> str:
    """'q4_1' etc. from general.file_type, else from the file name."""
    if path is not None:
        file_type = gguf_metadata(path, ["general.file_type"]).get("general.file_type")
        if file_type is not None:
            try:
                import gguf

                return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
            except (ImportError, ValueError):
                pass
    match = re.search(r"(I?Q\d[_A-Z0-9]*|BF16|F16|F32)", filename, re.IGNORECASE)
    return match.group(1).lower() if match else "unknown"


# --- incremental detokenisation --------------------------------------------------------------


class TextStream:
    """Token ids in, text pieces out, such that the pieces concatenate to the decoded text.

    Decoding tokens one at a time breaks byte-level BPE (a multi-byte character spans tokens)
    and sentencepiece (spaces live on the next token); decoding the whole prefix and emitting
    the new suffix does not. A piece that would end in an incomplete character is held back
    (emitted as "") until the character completes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        full = self._tokenizer.decode(
            self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if full.endswith("\ufffd"):
            return ""
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:
            # A decoder that rewrites earlier text (rare) cannot take back what was streamed:
            # emit what follows the longest common prefix.
            pairs = zip(full, self.text, strict=False)
            common = next((i for i, (a, b) in enumerate(pairs) if a != b), len(self.text))
            piece = full[common:]
        self.text = full
        return piece


# --- batched, cached forward passes ------------------------------------------------------------


def _cache_kwarg(model: Any) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; the cache is updated in place."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Session:
    """k (or beams x k) sequences decoded together; each step returns next-token log-probs."""

    def first(self, cancel: CancelToken | None = None) -> torch.Tensor:
        """The prompt's pass (in parts of at most PREFILL_TOKENS, `cancel` checked between)."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row; `rows` first reorders/duplicates the rows (beam search)."""
        raise NotImplementedError

    def score(
        self, rows: torch.Tensor, targets: torch.Tensor, cancel: CancelToken | None = None
    ) -> torch.Tensor:
        """Teacher forcing: row i continues document `rows[i]` with `targets[i]` (right-padded
        with -1); returns log p(target_t | document, target_<t) per position, 0 on padding.
        The documents' prompts run once, not once per target (`score_spans`)."""
        raise NotImplementedError


def _padded(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets right-padded with -1 -> (ids, 0/1 mask); padding reads token 0, masked out."""
    return targets.clamp(min=0), (targets >= 0).long()


def _target_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[ids] without materialising the whole log-softmax."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


class _CausalSession(_Session):
    def __init__(
        self,
        model: Any,
        prompts: list[list[int]],
        pad_id: int,
        device: str,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        from transformers import DynamicCache

        self.model = model
        self.prefill_tokens = prefill_tokens
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token then sits in the same (last) column.
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            self.mask[i, width - len(p) :] = 1
        self.ids, self.mask = ids.to(device), self.mask.to(device)
        self.cache = DynamicCache(config=model.config)
        self._cache_name = _cache_kwarg(model)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_name: self.cache},
            **kwargs,
        )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def first(self, cancel: CancelToken | None = None) -> torch.Tensor:
        """The prompt in column chunks over all rows (the cache fills in place), so a pass
        costs at most `prefill_tokens` tokens; a short prompt is one pass."""
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        rows, width = self.ids.shape
        columns = max(1, self.prefill_tokens // rows)
        full_mask = self.mask
        try:
            for start in range(0, width, columns):
                check(cancel)
                end = min(start + columns, width)
                self.mask = full_mask[:, :end]
                logprobs = self._forward(self.ids[:, start:end], positions[:, start:end])
        finally:
            self.mask = full_mask
        return logprobs

    def step(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            self.cache.reorder_cache(cast(torch.LongTensor, rows))  # int64 row indices
            self.mask = self.mask.index_select(0, rows)
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        return self._forward(tokens.view(-1, 1), positions)

    def score(
        self, rows: torch.Tensor, targets: torch.Tensor, cancel: CancelToken | None = None
    ) -> torch.Tensor:
        """The prompts' pass (its last column predicts every target's first token), then the
        cached prompt rows duplicated per target and all targets in one more pass."""
        ids, tmask = _padded(targets.to(self.ids.device))
        first = self.first(cancel).index_select(0, rows)
        out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        out[:, 0] = first.gather(1, ids[:, :1]).squeeze(1)
        if ids.shape[1] > 1:
            check(cancel)
            self.cache.reorder_cache(cast(torch.LongTensor, rows))
            prompt_mask = self.mask.index_select(0, rows)
            steps = torch.arange(ids.shape[1] - 1, device=ids.device)
            positions = prompt_mask.sum(-1, keepdim=True) + steps
            self.mask = torch.cat([prompt_mask, tmask[:, :-1]], dim=-1)
            logits = self.model(
                input_ids=ids[:, :-1],
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_name: self.cache},
            ).logits
            out[:, 1:] = _target_logprobs(logits, ids[:, 1:])
        return out * tmask


class _Seq2SeqSession(_Session):
    def __init__(
        self,
        model: Any,
        inputs: list[list[int]],
        pad_id: int,
        start_id: int,
        device: str,
        prefill_tokens: int = PREFILL_TOKENS,
        cancel: CancelToken | None = None,
    ) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        self.model = model
        width = max(len(p) for p in inputs)
        ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, p in enumerate(inputs):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, : len(p)] = 1
        self.mask = mask.to(device)
        ids = ids.to(device)
        # The encoder is bidirectional: it is split by rows (documents), not columns.
        rows = max(1, prefill_tokens // width)
        parts = []
        for start in range(0, len(inputs), rows):
            check(cancel)
            part = slice(start, start + rows)
            parts.append(model.get_encoder()(input_ids=ids[part], attention_mask=self.mask[part]))
        hidden = torch.cat([p.last_hidden_state for p in parts])
        self.encoded = type(parts[0])(last_hidden_state=hidden)
        self.start = torch.full((len(inputs),), start_id, dtype=torch.long, device=device)
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self._cache_name = _cache_kwarg(model)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(
            encoder_outputs=self.encoded,
            attention_mask=self.mask,
            decoder_input_ids=tokens.view(-1, 1),
            use_cache=True,
            **{self._cache_name: self.cache},
        )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def first(self, cancel: CancelToken | None = None) -> torch.Tensor:
        check(cancel)
        return self._forward(self.start)

    def step(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            self.cache.reorder_cache(cast(torch.LongTensor, rows))  # int64 row indices
            self.mask = self.mask.index_select(0, rows)
            hidden = self.encoded.last_hidden_state.index_select(0, rows)
            self.encoded = type(self.encoded)(last_hidden_state=hidden)
        return self._forward(tokens)

    def score(
        self, rows: torch.Tensor, targets: torch.Tensor, cancel: CancelToken | None = None
    ) -> torch.Tensor:
        """The documents are encoded once; the decoder reads every target in one pass."""
        check(cancel)
        ids, tmask = _padded(targets.to(self.start.device))
        start = self.start[:1].expand(len(rows)).unsqueeze(1)
        decoder_ids = torch.cat([start, ids[:, :-1]], dim=-1)
        hidden = self.encoded.last_hidden_state.index_select(0, rows)
        logits = self.model(
            encoder_outputs=type(self.encoded)(last_hidden_state=hidden),
            attention_mask=self.mask.index_select(0, rows),
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=torch.cat([tmask[:, :1], tmask[:, :-1]], dim=-1),
            use_cache=False,
        ).logits
        return _target_logprobs(logits, ids) * tmask


# --- decoding ----------------------------------------------------------------------------------


@dataclass
class _Choice:
    token_id: int
    logprob: float  # marginal log p(y_t | x, y_<t)
    document: int  # argmax_z of log p(z|x) + log p(y_t | x, z, y_<t)


@dataclass
class _Hypothesis:
    choices: list[_Choice] = field(default_factory=list)
    score: float = 0.0  # sum of marginal log-probs, EOS included once finished

    def normalised(self, length: int) -> float:
        return self.score / max(length, 1) ** _LENGTH_PENALTY


def marginalise(logprobs: torch.Tensor, log_prior: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(rows = beams x k, V) doc-conditioned log-probs -> (beams, V) marginal and joint terms."""
    k = log_prior.numel()
    joint = logprobs.view(-1, k, logprobs.shape[-1]) + log_prior.view(1, k, 1)
    return torch.logsumexp(joint, dim=1), joint


class RagTokenGenerator:
    """RAG-Token generator over a causal LM or a seq2seq model; one instance per replica."""

    stage = "generator"
    prefill_tokens = PREFILL_TOKENS  # prompt tokens per forward pass (see PREFILL_TOKENS)

    def __init__(self, cfg: GeneratorConfig, threads: int | None = None) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        self.cfg = cfg
        self.threads = bound_threads(threads)
        self.device = cfg.device
        # A delta folder (qaserve.deployments.generator_delta) loads its base, then itself.
        self.delta = GeneratorDelta.open(cfg.model)
        self.source = _Source.parse(self.delta.base.locate() if self.delta else cfg.model)
        src = self.source
        load: dict[str, Any] = {"gguf_file": src.gguf_file} if src.gguf_file else {}

        config = None
        kind = cfg.kind
        if kind is None and src.local_gguf is not None:
            # Parsing a GGUF's config costs seconds; its architecture key is enough here.
            arch = gguf_metadata(src.local_gguf, ["general.architecture"]).get(
                "general.architecture"
            )
            if arch is not None:
                kind = "seq2seq" if arch == "t5" else "causal"
        try:
            if kind is None:
                config = AutoConfig.from_pretrained(src.name_or_dir, **load)
                kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
            self.kind: Literal["causal", "seq2seq"] = kind
            self.tokenizer = AutoTokenizer.from_pretrained(src.name_or_dir, **load)
            auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
            if config is not None:
                load["config"] = config
            self.model = auto.from_pretrained(src.name_or_dir, dtype=torch.float32, **load)
            if self.delta is not None:
                self.tokenizer = self.delta.apply(self.model, self.tokenizer)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load generator model {cfg.model!r}: {exc}", "model") from exc
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # its @wraps(Module.to) unbinds it
        self.eos_token_ids = self._eos_ids()
        self.end_id = self._end_id()
        self.pad_id = self._pad_id()

    # --- public API ------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dtype = str(self.model.dtype).removeprefix("torch.").replace("float", "fp")
        if self.source.gguf_file:
            quant = _gguf_quantisation(self.source.local_gguf, self.source.gguf_file)
            fmt = f"gguf-{quant} dequantised to {dtype} (torch)"
        else:
            fmt = f"{dtype} (torch)"
        if self.delta is not None:
            fmt += f" + int8 delta of {len(self.delta.tensors)} tensors"
        return ModelInfo(
            stage=self.stage,
            model=self.cfg.model,
            format=fmt,
            size_mb=round(params / 1e6, 1),
            device=self.device,
        )

    def generate(
        self,
        question: str,
        documents: list[ReadDocument],
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerateResponse:
        """Greedy (num_beams=1) or beam search over the marginal; returns the best sequence.
        A set `cancel` stops the work at the next pass (qaserve.cancel)."""
        tokens = list(self.stream(question, documents, max_new_tokens, num_beams, cancel))
        return generate_response(tokens, documents)

    def stream(
        self,
        question: str,
        documents: list[ReadDocument],
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[GeneratedToken]:
        """The tokens as soon as they are chosen: each one greedily, or, with beams > 1, all
        of them when the beam search ends (so a stream answers what `generate` answers).

        Not a generator function itself: a bad request raises here, before a server has
        started a streamed response; the forward passes run as the tokens are pulled.
        `cancel` is checked before every forward pass; once set, `Cancelled` ends the work.
        """
        beams = self.cfg.num_beams if num_beams is None else num_beams
        if beams < 1:
            raise BadRequest("num_beams must be at least 1", "num_beams")
        log_prior = self.log_prior(documents)
        session, steps = self._start(question, documents, max_new_tokens, cancel)
        if beams > 1:
            return self._beam_tokens(session, log_prior, steps, beams, documents, cancel)
        text = TextStream(self.tokenizer)
        return (
            self._token(choice, text, documents)
            for choice in self._greedy(session, log_prior, steps, cancel)
        )

    def generate_request(
        self, request: GenerateRequest, cancel: CancelToken | None = None
    ) -> GenerateResponse:
        """`generate` for a wire request, as both transports call it."""
        return self.generate(
            request.question, request.documents, request.max_new_tokens, request.num_beams, cancel
        )

    def stream_request(
        self, request: GenerateRequest, cancel: CancelToken | None = None
    ) -> Iterator[GeneratedToken]:
        """`stream` for a wire request, as both transports call it."""
        return self.stream(
            request.question, request.documents, request.max_new_tokens, request.num_beams, cancel
        )

    def score_spans(
        self,
        question: str,
        documents: list[ReadDocument],
        spans: Sequence[str],
        cancel: CancelToken | None = None,
    ) -> list[SpanScore]:
        """The RAG-Token log-likelihood of each span as this generator's answer, by teacher
        forcing: sum over its tokens (`target_ids`, end-of-answer included) of
        log sum_z p(z|x) p(y_t | x, z, y_<t), the marginal `generate` decodes by. A span ""
        is "no answer" (NO_ANSWER_TEXT). Every span x document row runs in one batch after
        one pass over the documents' prompts (`_Session.score`): for SmolLM2, 3 documents x
        4 spans, 3.4x less time than rag_objective's one pass over prompt + span rows (the
        training objective, which this equals; tests/test_span_scores.py)."""
        if not spans:
            raise BadRequest("at least one span is needed", "candidates")
        log_prior = self.log_prior(documents).to(self.device)
        targets = [self.target_ids(s) for s in spans]
        inputs = self.encode(question, documents)
        k, width = len(documents), max(len(t) for t in targets)
        padded = torch.full((len(targets) * k, width), -1, dtype=torch.long)
        for i, t in enumerate(targets):
            padded[i * k : (i + 1) * k, : len(t)] = torch.tensor(t, dtype=torch.long)
        rows = torch.arange(k, device=self.device).repeat(len(targets))  # row c*k+z: doc z
        session = self._session(inputs, cancel)
        with torch.inference_mode():
            per_doc = session.score(rows, padded, cancel).view(len(targets), k, width)
            marginal = torch.logsumexp(per_doc + log_prior.view(1, k, 1), dim=1)
        out = []
        for span, target, row in zip(spans, targets, marginal.tolist(), strict=True):
            logprobs = row[: len(target)]
            total = sum(logprobs)
            out.append(
                SpanScore(
                    text=span,
                    logprob=total,
                    tokens=len(target),
                    mean_logprob=total / len(target),
                    token_logprobs=logprobs,
                )
            )
        return out

    def score_request(
        self, request: ScoreRequest, cancel: CancelToken | None = None
    ) -> ScoreResponse:
        """`score_spans` for the pipeline's request, as both transports call it."""
        scores = self.score_spans(request.question, request.documents, request.candidates, cancel)
        return ScoreResponse(scores=scores, document_weights=document_prior(request.documents))

    def target_ids(self, answer: str) -> list[int]:
        """The tokens this generator answers `answer` with, the end-of-answer token included
        (a causal LM's: rag_objective.answer_ids, what training teaches); "" (no answer) is
        NO_ANSWER_TEXT."""
        text = answer.strip() or NO_ANSWER_TEXT
        if self.kind == "causal":
            from qaserve.deployments.rag_objective import answer_ids

            return answer_ids(self, text)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.end_id]

    def _beam_tokens(
        self,
        session: _Session,
        log_prior: torch.Tensor,
        steps: int,
        beams: int,
        documents: list[ReadDocument],
        cancel: CancelToken | None = None,
    ) -> Iterator[GeneratedToken]:
        choices = self._beam_search(session, log_prior, steps, beams, cancel)
        yield from self._to_tokens(choices, documents)

    def log_prior(self, documents: Sequence[ReadDocument]) -> torch.Tensor:
        """log p(z|x) (qaserve.deployments.prior)."""
        try:
            prior = document_prior(documents)
        except ValueError as exc:
            raise BadRequest(str(exc), "documents") from None
        return torch.tensor(prior, dtype=torch.float64).log().float()

    def encode(self, question: str, documents: Sequence[ReadDocument]) -> list[list[int]]:
        """One model input per document: chat prompt (causal) or question/context (seq2seq)."""
        question = question.strip()
        if not question:
            raise BadRequest("question must not be empty", "question")
        if not documents:
            raise BadRequest("at least one document is needed", "documents")
        inputs = []
        for doc in documents:
            context = self._truncate(doc.text)
            if self.kind == "seq2seq":
                ids = self.tokenizer(f"question: {question} context: {context}")["input_ids"]
            else:
                ids = self.tokenizer(self._prompt(question, context), add_special_tokens=False)[
                    "input_ids"
                ]
            inputs.append(list(ids))
        return inputs

    # --- internals -------------------------------------------------------------------------

    def _prompt(self, question: str, context: str) -> str:
        user = f"Document: {context}\n\nQuestion: {question}"
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ]
            prompt = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return cast(str, prompt)  # tokenize=False: the text
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{SYSTEM_PROMPT}\n\n{user}\nAnswer:"

    def _truncate(self, text: str) -> str:
        limit = self.cfg.max_doc_tokens
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= limit:
            return text
        return text[: enc["offset_mapping"][limit - 1][1]]

    def _start(
        self,
        question: str,
        documents: Sequence[ReadDocument],
        max_new_tokens: int | None,
        cancel: CancelToken | None = None,
    ) -> tuple[_Session, int]:
        steps = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 1:
            raise BadRequest("max_new_tokens must be at least 1", "max_new_tokens")
        return self._session(self.encode(question, documents), cancel), steps

    def _session(self, inputs: list[list[int]], cancel: CancelToken | None = None) -> _Session:
        check(cancel)
        with torch.inference_mode():
            if self.kind == "seq2seq":
                start = self._decoder_start_id()
                return _Seq2SeqSession(
                    self.model, inputs, self.pad_id, start, self.device, self.prefill_tokens, cancel
                )
            return _CausalSession(self.model, inputs, self.pad_id, self.device, self.prefill_tokens)

    def _greedy(
        self,
        session: _Session,
        log_prior: torch.Tensor,
        steps: int,
        cancel: CancelToken | None = None,
    ) -> Iterator[_Choice]:
        k = log_prior.numel()
        log_prior = log_prior.to(self.device)
        token = torch.zeros((), dtype=torch.long)
        for t in range(steps):
            check(cancel)
            # inference_mode per step, not around the yield: the caller's code between
            # tokens must not run inside it.
            with torch.inference_mode():
                logprobs = session.first(cancel) if t == 0 else session.step(token.expand(k))
                marginal, joint = marginalise(logprobs, log_prior)
                token = marginal[0].argmax()
                choice = _Choice(
                    token_id=int(token),
                    logprob=float(marginal[0, token]),
                    document=int(joint[0, :, token].argmax()),
                )
            if choice.token_id in self.eos_token_ids:
                return
            yield choice

    def _beam_search(
        self,
        session: _Session,
        log_prior: torch.Tensor,
        steps: int,
        num_beams: int,
        cancel: CancelToken | None = None,
    ) -> list[_Choice]:
        """Beam search on the marginal; beams x documents decode as one batch.

        Stops once num_beams hypotheses have ended (transformers' early_stopping=True); an
        EOS ranked below num_beams is ignored, as transformers does, so one beam is greedy.
        """
        k = log_prior.numel()
        log_prior = log_prior.to(self.device)
        arange_k = torch.arange(k, device=self.device)
        running = [_Hypothesis()]
        finished: list[tuple[float, _Hypothesis]] = []
        with torch.inference_mode():
            logprobs = session.first(cancel)
            for t in range(steps):
                marginal, joint = marginalise(logprobs, log_prior)
                scores = torch.tensor([h.score for h in running], device=self.device)
                flat = (scores[:, None] + marginal).view(-1)
                top = flat.topk(min(2 * num_beams, flat.numel()))
                vocab = marginal.shape[-1]
                survivors: list[tuple[int, int]] = []  # (beam, token)
                for rank, index in enumerate(top.indices.tolist()):
                    beam, token = divmod(index, vocab)
                    if token in self.eos_token_ids:
                        if rank < num_beams:
                            ended = _Hypothesis(running[beam].choices, float(flat[index]))
                            finished.append((ended.normalised(t + 1), ended))
                        continue
                    survivors.append((beam, token))
                    if len(survivors) == num_beams:
                        break
                if len(finished) >= num_beams or not survivors:
                    running = []
                    break
                running = [
                    _Hypothesis(
                        [
                            *running[beam].choices,
                            _Choice(
                                token,
                                float(marginal[beam, token]),
                                int(joint[beam, :, token].argmax()),
                            ),
                        ],
                        float(flat[beam * vocab + token]),
                    )
                    for beam, token in survivors
                ]
                if t == steps - 1:
                    break
                beams = torch.tensor([b for b, _ in survivors], device=self.device)
                rows = (beams[:, None] * k + arange_k).view(-1)
                tokens = torch.tensor([tok for _, tok in survivors], device=self.device)
                check(cancel)
                logprobs = session.step(tokens.repeat_interleave(k), rows)
        finished += [(h.normalised(len(h.choices)), h) for h in running]
        return max(finished, key=lambda pair: pair[0])[1].choices

    def _token(
        self, choice: _Choice, text: TextStream, documents: Sequence[ReadDocument]
    ) -> GeneratedToken:
        return GeneratedToken(
            id=choice.token_id,
            text=text.push(choice.token_id),
            logprob=choice.logprob,
            document_id=documents[choice.document].id,
            document_index=choice.document,
        )

    def _to_tokens(
        self, choices: list[_Choice], documents: Sequence[ReadDocument]
    ) -> list[GeneratedToken]:
        text = TextStream(self.tokenizer)
        return [self._token(c, text, documents) for c in choices]

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value if v is not None)
        if self.kind == "causal":
            vocab = self.tokenizer.get_vocab()
            special = set(getattr(self.tokenizer, "all_special_tokens", []))
            template = getattr(self.tokenizer, "chat_template", None) or ""
            for marker in _END_OF_TURN:
                # Only a marker the chat template really uses ends the answer.
                if marker in vocab and marker in special and marker in template:
                    ids.add(vocab[marker])
        if not ids:
            raise ConfigError(f"generator model {self.cfg.model!r} names no EOS token", "model")
        return ids

    def _end_id(self) -> int:
        """The token that ends an answer: the chat template's end-of-turn marker, else EOS."""
        vocab = self.tokenizer.get_vocab()
        for marker in _END_OF_TURN:
            if marker in vocab and vocab[marker] in self.eos_token_ids:
                return int(vocab[marker])
        eos = self.tokenizer.eos_token_id
        return (
            eos if isinstance(eos, int) and eos in self.eos_token_ids else min(self.eos_token_ids)
        )

    def _pad_id(self) -> int:
        for value in (self.tokenizer.pad_token_id, self.model.config.pad_token_id):
            if isinstance(value, int):
                return value
        return min(self.eos_token_ids)

    def _decoder_start_id(self) -> int:
        for source in (self.model.generation_config, self.model.config):
            value = getattr(source, "decoder_start_token_id", None)
            if isinstance(value, int):
                return value
        return self._pad_id()


def build_generator(
    cfg: EngineConfig, threads: int | None, built: Mapping[str, Any]
) -> RagTokenGenerator:
    """The registry's factory (qaserve.stages)."""
    return RagTokenGenerator(cfg.generator, threads=threads)
