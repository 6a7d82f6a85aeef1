"""The v1 wire schema: one set of pydantic models imported by the server, the engine and the SDK.

Field names are the contract of DESIGN.md's HTTP table; add fields freely, rename none.
The server owns the defaults of model settings: an optional field left unset (null) means
"the value the server is configured with" (`reader.max_answer_len`, `generator.num_beams`...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

# --- field rules, enforced and documented alike -------------------------------------------


@dataclass(frozen=True, eq=False)  # hashed by identity: typing hashes Annotated metadata
class _Documented:
    """JSON Schema keywords for a rule that a validator enforces: the OpenAPI document states
    the rule (clients and schemathesis see it), the validator keeps its plain message."""

    keywords: Mapping[str, Any]

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), **self.keywords}


# Python's whitespace (str.isspace, what str.strip removes) spelled out, not `\s`: `\s` means
# other characters in JSON Schema's regex dialect (ECMA-262: U+FEFF, not U+001C-U+001F) and in
# Rust's. Spelled out, the documented pattern and the server's check agree on every character.
_SPACES = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK = f"[^{_SPACES}]"  # unanchored: "has a character that is not whitespace"


def _non_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


# A text that must say something: stripped, refused (422) when nothing is left.
NonBlank = Annotated[
    str, AfterValidator(_non_blank), _Documented({"minLength": 1, "pattern": NON_BLANK})
]

COLLECTION_PATTERN = r"^[A-Za-z0-9_\-]+$"
MAX_COLLECTION_CHARS = 64
# The store's rule for a collection name (it names a folder), checked at the edge.
Collection = Annotated[
    str, Field(min_length=1, max_length=MAX_COLLECTION_CHARS, pattern=COLLECTION_PATTERN)
]

Scalar = str | int | float | bool
FilterValue = Scalar | Annotated[list[Scalar], _Documented({"minItems": 1})]
# A key names a metadata field in the store's filter syntax, where quotes cannot be escaped.
Filters = dict[
    Annotated[str, _Documented({"minLength": 1, "not": {"pattern": r'["\\]'}})], FilterValue
]

RetrievalMode = Literal["dense", "sparse", "hybrid"]
QueryMode = Literal["extractive", "generative", "ensemble"]

MAX_TOP_K = 100
MAX_QUESTION_CHARS = 2_000


# --- requests as JSON carries them ---------------------------------------------------------


def _not_json(value: Any, loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str] | None:
    """The first value in `value` (a field's: strings, numbers, lists, dicts) that JSON text
    cannot hold although Python's decoder lets it in, with its location and what is wrong
    with it; None when there is none."""
    if isinstance(value, float):
        return (
            None
            if math.isfinite(value)
            else (loc, "not a finite number (JSON has no NaN or Infinity)")
        )
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return loc, f"not valid Unicode text: a lone surrogate at character {exc.start}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _not_json(key, loc) is not None:
                return loc, "a key is not valid Unicode text (it holds a lone surrogate)"
            found = _not_json(item, (*loc, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _not_json(item, (*loc, i))
            if found is not None:
                return found
    return None


def field_error(
    model: type[BaseModel], loc: tuple[str | int, ...], message: str
) -> ValidationError:
    """A model validator's error located at a field (a plain ValueError would name none)."""
    error = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=None)
    return ValidationError.from_exception_data(model.__name__, [error])


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number"}


def _json_type(annotation: Any) -> type | None:
    """bool, int or float for a field of that type (or None); None for any other field."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = set(get_args(annotation)) - {NoneType}
        annotation = kinds.pop() if len(kinds) == 1 else None
    return annotation if annotation in _JSON_TYPES else None


class JsonRequest(BaseModel):
    """A request as JSON says it: numbers and booleans of their JSON type, strings of text.

    Pydantic's lax mode would read "5" or true as the integer 5 or 1 and 0 as false, which
    the OpenAPI document (JSON Schema) calls invalid: such values are refused. 5.0 stays an
    integer (JSON Schema agrees). Internal callers' values (numpy numbers) pass as before.

    JSON can spell a lone surrogate ("\\ud800"); Python decodes it into a str that no UTF-8
    encoder accepts, so the tokenizers, the store and the JSON encoder would fail on it later
    (a 500). Python's decoder also reads NaN and Infinity, which JSON has not (and a response
    cannot carry). Both refused here instead: 422 naming the field. Nested models check
    themselves.
    """

    @model_validator(mode="before")
    @classmethod
    def _json_types(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kind, value = _json_type(field.annotation), data.get(name)
            if kind is None or value is None:
                continue
            if isinstance(value, str | bytes) or isinstance(value, bool) != (kind is bool):
                raise field_error(cls, (name,), f"Input should be a valid {_JSON_TYPES[kind]}")
        return data

    @model_validator(mode="after")
    def _json_values(self) -> Self:
        for name in type(self).model_fields:
            found = _not_json(getattr(self, name), (name,))
            if found is not None:
                raise field_error(type(self), *found)
        return self


class _Strict(JsonRequest):
    # Unknown fields are an error: a typo in a field name must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


def _check_filters(value: Filters | None) -> Filters | None:
    if value is None:
        return None
    for key, v in value.items():
        if not key:
            raise ValueError("filter keys must not be empty")
        if '"' in key or "\\" in key:
            raise ValueError(f"filter {key!r}: a key may not hold quotes or backslashes")
        if isinstance(v, list):
            if not v:
                raise ValueError(f"filter {key!r}: the list of accepted values is empty")
            for item in v:
                if not isinstance(item, str | int | float | bool):
                    raise ValueError(f"filter {key!r}: values must be scalars")
    return value


# --- documents ---------------------------------------------------------------------------


class DocumentIn(_Strict):
    id: str | None = Field(None, min_length=1, max_length=256)
    text: NonBlank = Field(
        ..., description="The document's text; long texts are split into passages."
    )
    meta: dict[str, Scalar | list[Scalar] | None] = Field(default_factory=dict)


class IngestRequest(_Strict):
    collection: Collection | None = None
    documents: list[DocumentIn] = Field(..., min_length=1)


class IngestResponse(BaseModel):
    ids: list[str]
    passages: int


class DocumentOut(BaseModel):
    id: str
    text: str
    meta: dict[str, Scalar | list[Scalar] | None] = Field(default_factory=dict)


# --- retrieval ---------------------------------------------------------------------------


class RetrieveRequest(_Strict):
    query: NonBlank = Field(..., max_length=MAX_QUESTION_CHARS)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    filters: Filters | None = None
    collection: Collection | None = None
    retrieval: RetrievalMode | None = Field(
        None,
        description="dense, sparse (BM25) or hybrid (RRF of both); unset: the server's "
        "configured mode (store.retrieval).",
    )

    _filters = field_validator("filters")(_check_filters)


class RetrievedDocument(BaseModel):
    id: str = Field(..., description="The caller's document id (the parent of the passage).")
    text: str
    score: float
    meta: dict[str, Scalar | list[Scalar] | None] = Field(default_factory=dict)
    passage: int = Field(0, description="Passage number within the document (0 if unsplit).")


class RetrieveResponse(BaseModel):
    documents: list[RetrievedDocument]


# --- reading -----------------------------------------------------------------------------


class ReadDocument(_Strict):
    id: str | None = None
    text: NonBlank
    score: float | None = None


class ReadRequest(_Strict):
    question: NonBlank = Field(..., max_length=MAX_QUESTION_CHARS)
    documents: list[ReadDocument] = Field(..., min_length=1, max_length=MAX_TOP_K)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)
    max_answer_len: int | None = Field(
        None, ge=1, le=512, description="In tokens, as in transformers; unset: the server's."
    )
    handle_impossible_answer: bool = False


class Answer(BaseModel):
    answer: str = Field(..., description="Exactly text[start:end] of its document; '' = no answer.")
    score: float
    start: int
    end: int
    document_id: str | None = None


class ReadResponse(BaseModel):
    answers: list[Answer]
    no_answer_score: float | None = Field(
        None, description="Best no-answer (CLS) score over the documents, as the QA pipeline does."
    )


# --- generation --------------------------------------------------------------------------


MAX_GENERATOR_DOCUMENTS = 20


def _max_new_tokens() -> Any:
    return Field(None, ge=1, le=512, description="Unset: the server's configured value.")


def _num_beams() -> Any:
    return Field(
        None,
        ge=1,
        le=8,
        description="Unset: the server's configured value. A stream with beams > 1 sends its "
        "tokens when the search ends.",
    )


class GenerateRequest(_Strict):
    question: NonBlank = Field(..., max_length=MAX_QUESTION_CHARS)
    documents: list[ReadDocument] = Field(..., min_length=1, max_length=MAX_GENERATOR_DOCUMENTS)
    max_new_tokens: int | None = _max_new_tokens()
    num_beams: int | None = _num_beams()
    stream: bool = False


class GeneratedToken(BaseModel):
    id: int
    text: str
    logprob: float = Field(..., description="log p(token) marginalised over the documents.")
    document_id: str | None = Field(None, description="The document that contributed most.")
    document_index: int | None = Field(
        None, description="Position of that document in the request (for documents without id)."
    )


class GenerateResponse(BaseModel):
    text: str
    tokens: list[GeneratedToken]
    document_weights: list[float] = Field(
        default_factory=list, description="p(z|x): softmax of the retriever scores."
    )


# --- query (the whole graph) -------------------------------------------------------------


class QueryRequest(_Strict):
    # _generator_documents, stated for clients: more than MAX_GENERATOR_DOCUMENTS documents
    # only in extractive mode (the mode's default, ensemble, generates).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"mode": {"const": "extractive"}}, "required": ["mode"]},
                {"properties": {"top_k_retriever": {"maximum": MAX_GENERATOR_DOCUMENTS}}},
            ]
        }
    )

    question: NonBlank = Field(..., max_length=MAX_QUESTION_CHARS)
    top_k_retriever: int = Field(5, ge=1, le=MAX_TOP_K)
    top_k_reader: int = Field(3, ge=1, le=MAX_TOP_K)
    filters: Filters | None = None
    collection: Collection | None = None
    mode: QueryMode = "ensemble"
    retrieval: RetrievalMode | None = Field(
        None,
        description="dense, sparse (BM25) or hybrid (RRF of both); unset: the server's "
        "configured mode (store.retrieval).",
    )
    max_answer_len: int | None = Field(
        None, ge=1, le=512, description="Reader span limit in tokens; unset: the server's."
    )
    max_new_tokens: int | None = _max_new_tokens()
    num_beams: int | None = _num_beams()
    stream: bool = False

    _filters = field_validator("filters")(_check_filters)

    @model_validator(mode="after")
    def _generator_documents(self) -> QueryRequest:
        if self.mode != "extractive" and self.top_k_retriever > MAX_GENERATOR_DOCUMENTS:
            raise field_error(
                type(self),
                ("top_k_retriever",),
                f"the generator reads at most {MAX_GENERATOR_DOCUMENTS} documents "
                f"(mode {self.mode!r})",
            )
        return self


class FinalAnswer(BaseModel):
    text: str = Field(..., description="'' when the question is judged unanswerable.")
    source: Literal["reader", "generator", "both", "none"]
    score: float
    document_id: str | None = None
    start: int | None = None
    end: int | None = None


class QueryResponse(BaseModel):
    answer: FinalAnswer
    answers: list[Answer]
    no_answer_score: float | None = Field(
        None, description="The reader's no-answer score (modes that read), as in ReadResponse."
    )
    generated: GenerateResponse | None
    documents: list[RetrievedDocument]
    timings_ms: dict[str, float]


# --- models and errors -------------------------------------------------------------------


class ModelInfo(BaseModel):
    stage: str
    model: str
    format: str
    size_mb: float | None = None
    device: str = "cpu"


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- write operations --------------------------------------------------------------------

OperationStatus = Literal["queued", "running", "done", "failed", "cancelled"]
OPERATION_FINISHED = ("done", "failed", "cancelled")


class OperationProgress(BaseModel):
    embedded: int = Field(0, description="Passages embedded so far.")
    passages: int = Field(0, description="Passages the write splits into.")


class Operation(BaseModel):
    """A write in progress or finished (`POST /v1/documents?wait=false`): poll it at
    `GET /v1/operations/{id}`. `cancelled` means stopped before its commit: nothing written."""

    id: str
    kind: Literal["ingest"] = "ingest"
    status: OperationStatus
    progress: OperationProgress = Field(default_factory=OperationProgress)
    result: IngestResponse | None = Field(None, description="Once `done`.")
    error: ErrorDetail | None = Field(None, description="Once `failed` or `cancelled`.")
    created_at: float = Field(..., description="Unix time the write was accepted.")
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in OPERATION_FINISHED


TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]


# --- health ------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    stages: dict[str, bool] = Field(default_factory=dict)
