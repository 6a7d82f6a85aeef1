"""The cost bounds of a request, in one place beside the stage registry (qaserve.stages).

Each bound follows from what a stage accepts (its settings in EngineConfig) and from the
server's `limits:` section; `Limits.check` applies them at the edge, before any stage runs,
as a 422 naming the field (the OpenAI route turns it into its 400). The values are stated in
the OpenAPI document (`Limits.document`) and in the README's table.

Why these bounds (issue 14, finding 6): the generator prompts every document with the whole
question, so a 2,000-character question of CJK text made five prompts of ~5,500 tokens each
and held the CPU for 148 s, while the reader, which cuts the question to
`reader.max_question_len` tokens, took 0.5 s. A question is therefore bounded in tokens, and
generation by one budget over what the generator holds in its batch: documents x beams x
(prompt tokens per document), plus `max_new_tokens`, the number of decoding steps.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import annotated_types
from pydantic import BaseModel, ConfigDict, Field

from qaserve.errors import ConfigError, InvalidRequest
from qaserve_client.schema import (
    MAX_GENERATOR_DOCUMENTS,
    MAX_TOP_K,
    GenerateRequest,
    IngestRequest,
    QueryRequest,
    ReadRequest,
    RetrieveRequest,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qaserve.config import EngineConfig, ServerConfig

log = logging.getLogger("qaserve.limits")

CHARS_PER_TOKEN = 5  # English text in the reader's WordPiece: ~4.5 characters a token


def schema_max(model: type[BaseModel], field: str) -> int:
    """The `le` of a field of the wire schema: a configured bound may only lower it."""
    for constraint in model.model_fields[field].metadata:
        if isinstance(constraint, annotated_types.Le):
            return int(constraint.le)  # type: ignore[call-overload]
    raise LookupError(f"{model.__name__}.{field} has no upper bound")


SCHEMA_MAX_NEW_TOKENS = schema_max(QueryRequest, "max_new_tokens")
# ~100 words, well beyond a grounded answer; the steps cost ~0.1-0.2 s each on 2 shared
# cores whatever the batch (up to 40 rows, measured): 128 of them are ~15-25 s.
DEFAULT_MAX_NEW_TOKENS = 128


class LimitsConfig(BaseModel):
    """`server.limits`: None means "derived from the stages' settings" (see `Limits.build`)."""

    model_config = ConfigDict(extra="forbid")

    # Question length in the reader's tokens; None: the reader's max_question_len (it reads
    # no more than that: a longer question would be answered cut short).
    max_question_tokens: int | None = Field(None, ge=1)
    # retrieve top_k, query top_k_retriever and top_k_reader, read top_k and its documents.
    max_top_k: int = Field(MAX_TOP_K, ge=1, le=MAX_TOP_K)
    # Decoding steps; None: 128, or generator.max_new_tokens if higher.
    max_new_tokens: int | None = Field(None, ge=1, le=SCHEMA_MAX_NEW_TOKENS)
    # documents x beams x (generator.max_doc_tokens + question tokens); None: the generator's
    # most documents (20) with its configured beams and the longest question accepted.
    max_generation_tokens: int | None = Field(None, ge=1)
    # Characters of all documents of one /v1/read; None: max_top_k passages of the store's
    # passage_tokens (~5 characters a token): what a query's extractive read may hand over.
    max_read_chars: int | None = Field(None, ge=1)
    # Documents per ingest request (the body is bounded by server.max_body_bytes).
    max_ingest_documents: int = Field(1000, ge=1)


# --- counting a question in the reader's tokens ---------------------------------------------


_PIECES = re.compile(r"[A-Za-z0-9]+|\S")


def estimate_tokens(text: str) -> int:
    """Without the reader's tokenizer file: an ASCII word or number ~4 characters a token,
    any other character one token (WordPiece splits CJK text and punctuation per character)."""
    return sum(-(-len(piece) // 4) for piece in _PIECES.findall(text))


class QuestionTokens:
    """A question's length in the reader's tokens (its tokenizer.json, loaded once).

    A word the reader cannot spell ([UNK]: a run of 2,000 digits, emoji) counts one token per
    character: it is one token to the reader but up to a token per byte to the generator's
    byte-level tokenizer, and it is the generator's prompt that such a question makes long.
    """

    def __init__(self, folder: Path | None) -> None:
        self.tokenizer: Any = None
        self.unk_id: int | None = None
        self.specials = 3  # a question-context pair in BERT: [CLS] q [SEP] c [SEP]
        self.model_max_length: int | None = None
        path = folder / "tokenizer.json" if folder is not None else None
        if path is None or not path.is_file():
            return
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        conf_path = path.with_name("tokenizer_config.json")
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        unk = conf.get("unk_token")
        unk = unk.get("content") if isinstance(unk, dict) else unk
        self.unk_id = tok.token_to_id(unk) if isinstance(unk, str) else None
        if tok.post_processor is not None:
            self.specials = tok.post_processor.num_special_tokens_to_add(True)
        self.model_max_length = int(conf.get("model_max_length") or 10**9)
        self.tokenizer = tok

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return estimate_tokens(text)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return sum(
            max(1, end - start) if token == self.unk_id else 1
            for token, (start, end) in zip(enc.ids, enc.offsets, strict=True)
        )


def engine_of(backend: Any) -> EngineConfig:
    """The settings a pipeline's stages run with: an in-process pipeline's own (LocalStages'
    resolved config), else the defaults (a backend that is not a pipeline, in tests)."""
    from qaserve.config import EngineConfig

    cfg = getattr(getattr(backend, "calls", None), "cfg", None)
    return cfg if isinstance(cfg, EngineConfig) else EngineConfig()


def _reader_folder(engine: EngineConfig) -> Path | None:
    """The reader's folder when it is a local path (an exported reader or a checkpoint)."""
    model = engine.reader.model
    if model is None:
        return None
    path = Path(model).expanduser()
    return path if path.is_dir() else None


# --- the bounds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The resolved bounds and the stage settings they are checked against."""

    question_tokens: int
    top_k: int
    new_tokens: int
    generation_tokens: int
    read_chars: int
    ingest_documents: int
    body_bytes: int
    # what unset fields mean (the server owns the defaults) and the generator's document cut
    doc_tokens: int
    default_beams: int
    default_new_tokens: int
    count: Callable[[str], int]

    @classmethod
    def build(cls, server: ServerConfig, engine: EngineConfig) -> Limits:
        cfg = server.limits
        counter = QuestionTokens(_reader_folder(engine))
        if not counter.exact:
            log.warning(
                "no tokenizer.json beside reader.model=%r: question tokens are estimated",
                engine.reader.model,
            )
        question = cfg.max_question_tokens or _reader_question_len(engine, counter)
        gen = engine.generator
        new_tokens = cfg.max_new_tokens or max(DEFAULT_MAX_NEW_TOKENS, gen.max_new_tokens)
        budget = cfg.max_generation_tokens or (
            MAX_GENERATOR_DOCUMENTS * gen.num_beams * (gen.max_doc_tokens + question)
        )
        read_chars = cfg.max_read_chars or (
            cfg.max_top_k * engine.store.passage_tokens * CHARS_PER_TOKEN
        )
        limits = cls(
            question_tokens=question,
            top_k=cfg.max_top_k,
            new_tokens=new_tokens,
            generation_tokens=budget,
            read_chars=read_chars,
            ingest_documents=cfg.max_ingest_documents,
            body_bytes=server.max_body_bytes,
            doc_tokens=gen.max_doc_tokens,
            default_beams=gen.num_beams,
            default_new_tokens=gen.max_new_tokens,
            count=counter,
        )
        limits._check_defaults()
        return limits

    def _check_defaults(self) -> None:
        """The server's own defaults must pass its bounds: a request that sets nothing works."""
        if self.default_new_tokens > self.new_tokens:
            raise ConfigError(
                f"generator.max_new_tokens ({self.default_new_tokens}) is above "
                f"limits.max_new_tokens ({self.new_tokens})",
                field="limits.max_new_tokens",
            )
        default_docs = QueryRequest.model_fields["top_k_retriever"].default
        if default_docs > self.top_k:
            raise ConfigError(
                f"limits.max_top_k ({self.top_k}) is below the default top_k ({default_docs})",
                field="limits.max_top_k",
            )
        need = self.prompt_tokens(default_docs, self.default_beams, 1)
        if need > self.generation_tokens:
            raise ConfigError(
                f"limits.max_generation_tokens ({self.generation_tokens}) is below what a "
                f"default query needs ({need})",
                field="limits.max_generation_tokens",
            )

    # --- the checks -------------------------------------------------------------------------

    def prompt_tokens(self, documents: int, beams: int, question_tokens: int) -> int:
        """What the generator holds in its batch: one row per document and beam, each a
        prompt of at most max_doc_tokens of the document and the whole question."""
        return documents * beams * (self.doc_tokens + question_tokens)

    def check(self, request: BaseModel) -> None:
        """InvalidRequest (422) naming the first field over its bound; None when within."""
        if isinstance(request, RetrieveRequest):
            self._top_k("top_k", request.top_k)
        elif isinstance(request, ReadRequest):
            self._question(request.question)
            self._top_k("top_k", request.top_k)
            self._top_k("documents", len(request.documents), "documents")
            chars = sum(len(d.text) for d in request.documents)
            if chars > self.read_chars:
                raise InvalidRequest(
                    f"documents: {chars:,} characters in all; at most {self.read_chars:,} "
                    "(limits.max_read_chars): the reader's windows grow with the text",
                    "documents",
                )
        elif isinstance(request, GenerateRequest):
            tokens = self._question(request.question)
            self._generation(request, len(request.documents), "documents", tokens)
        elif isinstance(request, QueryRequest):
            tokens = self._question(request.question)
            self._top_k("top_k_retriever", request.top_k_retriever)
            self._top_k("top_k_reader", request.top_k_reader)
            if request.mode != "extractive":
                self._generation(request, request.top_k_retriever, "top_k_retriever", tokens)
        elif isinstance(request, IngestRequest) and len(request.documents) > self.ingest_documents:
            raise InvalidRequest(
                f"documents: {len(request.documents):,} in one request; at most "
                f"{self.ingest_documents:,} (limits.max_ingest_documents): send them in "
                "batches",
                "documents",
            )

    def cap_new_tokens(self, request: QueryRequest) -> QueryRequest:
        """max_new_tokens as an upper bound (OpenAI's max_tokens): at most the limit."""
        if request.max_new_tokens is None or request.max_new_tokens <= self.new_tokens:
            return request
        return request.model_copy(update={"max_new_tokens": self.new_tokens})

    def _question(self, question: str) -> int:
        tokens = self.count(question)
        if tokens > self.question_tokens:
            raise InvalidRequest(
                f"question: {tokens} tokens; at most {self.question_tokens} "
                "(limits.max_question_tokens, in the reader's tokens)",
                "question",
            )
        return tokens

    def _top_k(self, field: str, value: int, what: str = "") -> None:
        if value > self.top_k:
            noun = f" {what}" if what else ""
            raise InvalidRequest(
                f"{field}: {value}{noun}; at most {self.top_k} (limits.max_top_k)", field
            )

    def _generation(
        self, request: GenerateRequest | QueryRequest, documents: int, field: str, question: int
    ) -> None:
        steps = request.max_new_tokens
        if steps is not None and steps > self.new_tokens:
            raise InvalidRequest(
                f"max_new_tokens: {steps}; at most {self.new_tokens} (limits.max_new_tokens)",
                "max_new_tokens",
            )
        beams = request.num_beams if request.num_beams is not None else self.default_beams
        need = self.prompt_tokens(documents, beams, question)
        if need <= self.generation_tokens:
            return
        # Name what must shrink: the beams, when fewer of them would do; else the documents.
        if beams > 1 and self.prompt_tokens(documents, 1, question) <= self.generation_tokens:
            field = "num_beams"
        raise InvalidRequest(
            f"{field}: {documents} documents x {beams} beams x ({self.doc_tokens} document + "
            f"{question} question tokens) = {need:,} prompt tokens; at most "
            f"{self.generation_tokens:,} (limits.max_generation_tokens): fewer documents or "
            "beams, or a shorter question",
            field,
        )

    # --- documentation ----------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, config key, value) for each bound: the route descriptions and the README."""
        return [
            ("question length, in the reader's tokens", "limits.max_question_tokens",
             str(self.question_tokens)),
            ("top-k values and /v1/read documents", "limits.max_top_k", str(self.top_k)),
            ("max_new_tokens", "limits.max_new_tokens", str(self.new_tokens)),
            (f"documents x beams x ({self.doc_tokens} + question tokens)",
             "limits.max_generation_tokens", str(self.generation_tokens)),
            ("/v1/read: characters of all documents", "limits.max_read_chars",
             str(self.read_chars)),
            ("documents per ingest request", "limits.max_ingest_documents",
             str(self.ingest_documents)),
            ("request body, bytes (413)", "max_body_bytes", str(self.body_bytes)),
        ]  # fmt: skip

    def describe(self, keys: Iterable[str], status: int = 422) -> str:
        wanted = set(keys)
        lines = [f"- {what}: at most {value} (`{key}`)" for what, key, value in self.rows()]
        kept = [line for line, (_, key, _) in zip(lines, self.rows(), strict=True) if key in wanted]
        return f"Bounds (over one: {status} naming the field):\n" + "\n".join(kept)

    def document(self, app: FastAPI) -> None:
        """State the bounds in the OpenAPI document: each route's description lists those it
        checks, and the request schemas carry the configured maxima (`x-max-tokens` for the
        question, which JSON Schema cannot count)."""
        build = app.openapi

        def openapi() -> dict[str, Any]:
            schema = build()  # FastAPI's is cached: what is added here is added once
            for path, keys in _ROUTE_LIMITS.items():
                operation = schema.get("paths", {}).get(path, {}).get("post")
                text = self.describe(keys, 400 if path.startswith("/openai") else 422)
                if operation is not None and text not in operation.get("description", ""):
                    operation["description"] = f"{operation.get('description', '')}\n\n{text}"
            self._annotate(schema.get("components", {}).get("schemas", {}))
            return schema

        app.openapi = openapi  # type: ignore[method-assign]

    def _annotate(self, schemas: dict[str, Any]) -> None:
        def prop(model: str, field: str) -> dict[str, Any]:
            found: dict[str, Any] = schemas.get(model, {}).get("properties", {}).get(field, {})
            return found

        def set_max(node: dict[str, Any], key: str, value: int) -> None:
            for target in [node, *node.get("anyOf", [])]:
                if target.get("type") in ("integer", "array"):
                    target[key] = min(value, target.get(key, value))

        for model in ("ReadRequest", "GenerateRequest", "QueryRequest"):
            node = prop(model, "question")
            if node:
                node["x-max-tokens"] = self.question_tokens
        for model, field in (
            ("RetrieveRequest", "top_k"),
            ("ReadRequest", "top_k"),
            ("QueryRequest", "top_k_retriever"),
            ("QueryRequest", "top_k_reader"),
        ):
            set_max(prop(model, field), "maximum", self.top_k)
        set_max(prop("ReadRequest", "documents"), "maxItems", self.top_k)
        set_max(prop("IngestRequest", "documents"), "maxItems", self.ingest_documents)
        for model in ("GenerateRequest", "QueryRequest"):
            set_max(prop(model, "max_new_tokens"), "maximum", self.new_tokens)
            if model in schemas:
                schemas[model]["x-max-generation-tokens"] = self.generation_tokens


def _reader_question_len(engine: EngineConfig, counter: QuestionTokens) -> int:
    """The question length the reader keeps (as qaserve.deployments.reader.Reader computes
    it): reader.max_question_len, less when the window leaves no room beside doc_stride."""
    reader = engine.reader
    max_seq_len = min(reader.max_seq_len, counter.model_max_length or reader.max_seq_len)
    room = max_seq_len - counter.specials - reader.doc_stride - 1
    return max(1, min(reader.max_question_len, room))


# The bounds each route checks, by config key (their descriptions list them).
_QUESTION, _TOP_K = "limits.max_question_tokens", "limits.max_top_k"
_GENERATION = ("limits.max_new_tokens", "limits.max_generation_tokens")
_ROUTE_LIMITS: dict[str, tuple[str, ...]] = {
    "/v1/documents": ("limits.max_ingest_documents", "max_body_bytes"),
    "/v1/retrieve": (_TOP_K, "max_body_bytes"),
    "/v1/read": (_QUESTION, _TOP_K, "limits.max_read_chars", "max_body_bytes"),
    "/v1/generate": (_QUESTION, *_GENERATION, "max_body_bytes"),
    "/v1/query": (_QUESTION, _TOP_K, *_GENERATION, "max_body_bytes"),
    "/openai/v1/chat/completions": (_QUESTION, _TOP_K, *_GENERATION, "max_body_bytes"),
}
