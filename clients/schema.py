"""The v1 wire schema: one set of pydantic models imported by the server, the engine and the SDK.

Field names are the contract of DESIGN.md's HTTP table; add fields freely, rename none.
The server owns the defaults of model settings: an optional field left unset (null) means
"the value the server is configured with" (`reader.max_answer_len`, `generator.num_beams`...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = str | int | float | bool
FilterValue = Scalar | list[Scalar]
Filters = dict[str, FilterValue]

RetrievalMode = Literal["dense", "sparse", "hybrid"]
QueryMode = Literal["extractive", "generative", "ensemble"]

MAX_TOP_K = 100
MAX_QUESTION_CHARS = 2_000


class _Strict(BaseModel):
    # Unknown fields are an error: a typo in a field name must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


def _non_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _check_filters(value: Filters | None) -> Filters | None:
    if value is None:
        return None
    for key, v in value.items():
        if not key:
            raise ValueError("filter keys must not be empty")
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
    text: str = Field(..., description="The document's text; long texts are split into passages.")
    meta: dict[str, Scalar | list[Scalar] | None] = Field(default_factory=dict)

    _text = field_validator("text")(_non_blank)


class IngestRequest(_Strict):
    collection: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
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
    query: str = Field(..., max_length=MAX_QUESTION_CHARS)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    filters: Filters | None = None
    collection: str | None = None
    retrieval: RetrievalMode = "dense"

    _query = field_validator("query")(_non_blank)
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
    text: str
    score: float | None = None

    _text = field_validator("text")(_non_blank)


class ReadRequest(_Strict):
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    documents: list[ReadDocument] = Field(..., min_length=1, max_length=MAX_TOP_K)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)
    max_answer_len: int | None = Field(
        None, ge=1, le=512, description="In tokens, as in transformers; unset: the server's."
    )
    handle_impossible_answer: bool = False

    _question = field_validator("question")(_non_blank)


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
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    documents: list[ReadDocument] = Field(..., min_length=1, max_length=MAX_GENERATOR_DOCUMENTS)
    max_new_tokens: int | None = _max_new_tokens()
    num_beams: int | None = _num_beams()
    stream: bool = False

    _question = field_validator("question")(_non_blank)


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
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    top_k_retriever: int = Field(5, ge=1, le=MAX_TOP_K)
    top_k_reader: int = Field(3, ge=1, le=MAX_TOP_K)
    filters: Filters | None = None
    collection: str | None = None
    mode: QueryMode = "ensemble"
    retrieval: RetrievalMode = "dense"
    max_answer_len: int | None = Field(
        None, ge=1, le=512, description="Reader span limit in tokens; unset: the server's."
    )
    max_new_tokens: int | None = _max_new_tokens()
    num_beams: int | None = _num_beams()
    stream: bool = False

    _question = field_validator("question")(_non_blank)
    _filters = field_validator("filters")(_check_filters)

    @model_validator(mode="after")
    def _generator_documents(self) -> QueryRequest:
        if self.mode != "extractive" and self.top_k_retriever > MAX_GENERATOR_DOCUMENTS:
            raise ValueError(
                f"top_k_retriever: the generator reads at most {MAX_GENERATOR_DOCUMENTS} "
                f"documents (mode {self.mode!r})"
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


TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]


# --- health ------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    stages: dict[str, bool] = Field(default_factory=dict)
