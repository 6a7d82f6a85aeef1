"""An OpenAI-compatible face of the query pipeline: `POST /openai/v1/chat/completions` and
`GET /openai/v1/models`, so the OpenAI SDK, LangChain and the like can use qaserve as a model
whose answers come with their evidence.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/openai/v1", api_key=KEY)
    done = client.chat.completions.create(model="qaserve", messages=[{"role": "user", ...}])
    done.choices[0].message.content, done.qaserve["answer"], done.qaserve["documents"]

The mapping (README, "OpenAI-compatible route"): the last user message is the question; the
model names a query mode (`MODELS`); `max_completion_tokens` / `max_tokens` is
`max_new_tokens` (capped at the API's limit: it is an upper bound); qaserve's own fields
(`filters`, `collection`, `top_k`, ...) come as extra body fields. The answer is the message
content (`NO_ANSWER` when the question is judged unanswerable) and the whole `/v1/query`
answer rides along as a top-level `qaserve` object (in a stream, on the last chunk).

Streams are built on `Pipeline.query_events`: generated tokens become content deltas as the
generator decides them; an answer the reader settles (extractive mode, or an ensemble whose
reader span already decides the answer) is its span as one delta, sent as soon as the reader
is done. Errors on these routes have OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, where `code` is qaserve's error type unless a more specific OpenAI code applies.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.config import JsonDict
from starlette.exceptions import HTTPException

from qaserve import __version__
from qaserve.errors import (
    InternalError,
    InvalidRequest,
    QAServeError,
    RateLimited,
    Unauthorized,
)
from qaserve.limits import SCHEMA_MAX_NEW_TOKENS, Limits, schema_max
from qaserve.pipeline import Event
from qaserve.runtime.api import ClientGone, _backend, _Calls
from qaserve.runtime.middleware import json_body
from qaserve.runtime.responses import (
    MEANINGS,
    allowed_methods,
    documented,
    error_headers,
    validation_error,
)
from qaserve_client.schema import (
    MAX_GENERATOR_DOCUMENTS,
    NON_BLANK,
    Collection,
    Filters,
    GeneratedToken,
    JsonRequest,
    QueryMode,
    QueryRequest,
    QueryResponse,
    ReadResponse,
    RetrievalMode,
    field_error,
)

log = logging.getLogger("qaserve.runtime.openai")

PREFIX = "/openai/v1"
MODELS: dict[str, QueryMode] = {
    "qaserve": "ensemble",
    "qaserve-ensemble": "ensemble",
    "qaserve-extractive": "extractive",
    "qaserve-generative": "generative",
}
NO_ANSWER = "I could not find an answer to that in the documents."
OWNER = "qaserve"


# QueryRequest's fields that an OpenAI request names differently, for error messages.
_OUR_NAMES = {"question": "messages", "top_k_retriever": "top_k", "max_new_tokens": "max_tokens"}


# --- errors ------------------------------------------------------------------------------------


_CODES: dict[type[QAServeError], str] = {
    Unauthorized: "invalid_api_key",
    RateLimited: "rate_limit_exceeded",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, exc: QAServeError, retry_after: int = 1) -> OpenAIError:
        code = _CODES.get(type(exc), exc.type)
        return cls(exc.status, exc.message, exc.field, code, error_headers(exc, retry_after))


def _invalid(exc: RequestValidationError) -> OpenAIError:
    first = next(iter(exc.errors()), None)
    if first is not None and first.get("type") == "extra_forbidden":
        name = ".".join(str(p) for p in first.get("loc", ())[1:])
        message = f"Unrecognized request argument supplied: {name}"
        return OpenAIError(400, message, name, "unknown_parameter")
    error = validation_error(exc)
    return OpenAIError(400, error.message, error.field, "invalid_value")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """The error body of these routes (OpenAI's shape), for the OpenAPI document."""

    error: OpenAIErrorDetail


_MEANINGS = {
    **MEANINGS,
    400: "invalid or unsupported request (`param` names the field)",
    404: "no such model",
}
# A stream: `data:` lines (event `message`), each a chat.completion.chunk, then `[DONE]`.
_SSE_DOC = {
    "description": 'With `"stream": true`: `text/event-stream` of chat.completion.chunk objects.',
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["event", "data"],
                "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
            }
        }
    },
}


class _OpenAIRoute(APIRoute):
    """Every failure of these routes (keys, validation, the backend) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            cfg = request.app.state.config
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _invalid(exc).response()
            except QAServeError as exc:
                return OpenAIError.of(exc, cfg.retry_after_s).response()
            except HTTPException as exc:
                headers = dict(exc.headers or {})
                return OpenAIError(exc.status_code, str(exc.detail), headers=headers).response()
            except ClientGone:
                return Response(status_code=499)  # the client left: the call was cancelled
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return OpenAIError.of(InternalError("internal server error")).response()

        return route


# --- the request -------------------------------------------------------------------------------


def _user_text(content: str | list[dict[str, Any]] | None) -> str | None:
    """A user message's text (a string, or its text parts joined); None if it has none."""
    if isinstance(content, str):
        return content.strip() or None
    if not content or any(
        p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content
    ):
        return None
    return "\n".join(p["text"] for p in content).strip() or None


# _user_text's rule in JSON Schema: a user message's content is text, or text parts of which
# one at least says something.
_TEXT_PART: JsonDict = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_USER_TEXT: JsonDict = {
    "anyOf": [
        {"properties": {"role": {"not": {"const": "user"}}}},
        {
            "required": ["content"],
            "properties": {
                "content": {
                    "anyOf": [
                        {"type": "string", "pattern": NON_BLANK},
                        {
                            "type": "array",
                            "items": _TEXT_PART,
                            "contains": {"properties": {"text": {"pattern": NON_BLANK}}},
                        },
                    ]
                }
            },
        },
    ]
}


class ChatMessage(JsonRequest):
    # History messages may carry what this server never reads (tool_calls, audio, refusal...).
    model_config = ConfigDict(extra="ignore", json_schema_extra=_USER_TEXT)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _user_says_something(self) -> ChatMessage:
        if self.role != "user" or _user_text(self.content) is not None:
            return self
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                message = "only text content parts are supported"
                raise field_error(type(self), ("content", j), message)
        raise ValueError("a user message is a question: it must hold text, not be empty")


# QueryRequest's rule on documents for a generating mode, stated on the model that names it.
_GENERATOR_DOCUMENTS: JsonDict = {
    "anyOf": [
        {"properties": {"model": {"const": "qaserve-extractive"}}},
        {"properties": {"top_k": {"maximum": MAX_GENERATOR_DOCUMENTS}}},
    ]
}


class ChatCompletionRequest(JsonRequest):
    """OpenAI's chat-completion body. Arguments that change nothing here (sampling, penalties,
    bookkeeping) are accepted and ignored; those whose effect cannot be honoured are refused
    with 400 (`unsupported`); any other name is refused as OpenAI does (400)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_GENERATOR_DOCUMENTS)

    # The schema states what the route refuses (404 for another model, 400 for the others)
    # so that OpenAPI clients know it; the route's own checks keep OpenAI's error codes.
    model: str = Field(..., json_schema_extra={"enum": list(MODELS)})
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        json_schema_extra={"contains": {"properties": {"role": {"const": "user"}}}},
    )
    stream: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, json_schema_extra={"maximum": 1})
    # accepted and ignored (or refused below when their value asks for what cannot be done)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None  # JSON numbers only
    logprobs: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    top_logprobs: int | None = Field(None, ge=0, le=20, json_schema_extra={"maximum": 0})
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        None, json_schema_extra={"enum": ["none", "auto", None]}
    )
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra={"properties": {"type": {"const": "text"}}}
    )
    modalities: list[str] | None = Field(None, json_schema_extra={"items": {"const": "text"}})
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # qaserve's own (the SDK's `extra_body`); unset means QueryRequest's default
    filters: Filters | None = None
    collection: Collection | None = None
    top_k: int | None = Field(
        None,
        ge=1,
        le=schema_max(QueryRequest, "top_k_retriever"),
        description="Documents retrieved (top_k_retriever).",
    )
    top_k_reader: int | None = Field(None, ge=1, le=schema_max(QueryRequest, "top_k_reader"))
    retrieval: RetrievalMode | None = None
    max_answer_len: int | None = Field(None, ge=1, le=schema_max(QueryRequest, "max_answer_len"))
    num_beams: int | None = Field(None, ge=1, le=schema_max(QueryRequest, "num_beams"))


def _unsupported(body: ChatCompletionRequest) -> OpenAIError | None:
    def refuse(param: str, message: str) -> OpenAIError:
        return OpenAIError(400, message, param, "unsupported_value")

    if body.n != 1:
        return refuse("n", "n must be 1: qaserve gives one grounded answer per question")
    if body.logprobs or body.top_logprobs:
        return refuse("logprobs", "logprobs are not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        return refuse("response_format", "only text responses are supported")
    if body.tool_choice is not None and body.tool_choice not in ("none", "auto"):
        return refuse("tool_choice", "qaserve does not call tools")
    if body.modalities and set(body.modalities) != {"text"}:
        return refuse("modalities", "only the text modality is supported")
    return None


def _question(messages: Sequence[ChatMessage]) -> str:
    """The text of the last user message (string content, or its text parts joined)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            break
    else:
        raise OpenAIError(400, "no user message: the last one is the question", "messages")
    question = _user_text(messages[i].content)
    if question is None:  # ChatMessage refuses it first
        raise OpenAIError(400, "the question (the last user message) is empty", f"messages.{i}")
    return question


def query_request(body: ChatCompletionRequest, limits: Limits | None = None) -> QueryRequest:
    """The `/v1/query` request a chat completion asks for, within the server's cost bounds
    (max_tokens capped at its limit: it is an upper bound); OpenAIError if it cannot."""
    mode = MODELS.get(body.model)
    if mode is None:
        known = ", ".join(MODELS)
        message = f"The model {body.model!r} does not exist; qaserve serves {known}"
        raise OpenAIError(404, message, "model", "model_not_found")
    refused = _unsupported(body)
    if refused is not None:
        raise refused
    fields: dict[str, Any] = {"question": _question(body.messages), "mode": mode}
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        fields["max_new_tokens"] = min(limit, SCHEMA_MAX_NEW_TOKENS)
    extras = {
        "filters": body.filters,
        "collection": body.collection,
        "top_k_retriever": body.top_k,
        "top_k_reader": body.top_k_reader,
        "retrieval": body.retrieval,
        "max_answer_len": body.max_answer_len,
        "num_beams": body.num_beams,
    }
    fields.update({k: v for k, v in extras.items() if v is not None})
    try:
        query = QueryRequest(**fields)
        if limits is not None:
            query = limits.cap_new_tokens(query)
            limits.check(query)
        return query
    except InvalidRequest as exc:  # a cost bound: 400 here, as OpenAI answers a long prompt
        param = _OUR_NAMES.get(exc.field or "", exc.field)
        text = exc.message.removeprefix(f"{exc.field}: ")
        raise OpenAIError(400, f"{param}: {text}", param, "invalid_value") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        loc[0] = _OUR_NAMES.get(loc[0], loc[0])
    param = ".".join(loc) or None
    for ours, theirs in _OUR_NAMES.items():
        text = text.replace(ours, theirs)
    message = f"{param}: {text}" if param else text
    raise OpenAIError(400, message, param, "invalid_value")


# --- the answer --------------------------------------------------------------------------------


def content_of(response: QueryResponse) -> str:
    return response.answer.text or NO_ANSWER


def finish_reason(response: QueryResponse, request: QueryRequest) -> str:
    """`length` when the answer is generated text cut at the caller's token limit."""
    generated = response.generated
    limit = request.max_new_tokens
    if response.answer.source == "generator" and generated is not None and limit is not None:
        return "length" if len(generated.tokens) >= limit else "stop"
    return "stop"


def evidence(response: QueryResponse, request: QueryRequest) -> dict[str, Any]:
    """The `qaserve` field: the `/v1/query` answer, plus the mode that produced it."""
    return {"mode": request.mode, **response.model_dump(mode="json")}


class _Completion:
    """What every object of one completion shares: id, time, model."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"qaserve-{__version__}",
        }

    def whole(self, response: QueryResponse, request: QueryRequest) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content_of(response), "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(response, request),
        }
        return {
            **self.head("chat.completion"),
            "choices": [choice],
            "usage": None,
            "qaserve": evidence(response, request),
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        payload = {**self.head("chat.completion.chunk"), "choices": [choice], **(extra or {})}
        return _data(json.dumps(payload))  # ASCII: no raw U+2028 inside a data line


def _data(text: str) -> bytes:
    return f"data: {text}\n\n".encode()


def settled_by_reader(read: ReadResponse, threshold: float) -> str | None:
    """The ensemble's answer when the reader alone decides it (deployments/ensemble.py, rules
    1 and 2): "" when unanswerable, the best span when it reaches the threshold; None while
    the generated text may still decide."""
    spans = [a for a in read.answers if a.answer]
    null = read.no_answer_score if read.no_answer_score is not None else 0.0
    if not spans or null >= spans[0].score:
        return ""
    return spans[0].answer if spans[0].score >= threshold else None


def _reader_threshold(backend: Any) -> float | None:
    cfg = getattr(getattr(backend, "ensemble", None), "cfg", None)
    threshold = getattr(cfg, "reader_threshold", None)
    return float(threshold) if isinstance(threshold, int | float) else None


class Deltas:
    """Content deltas from the query's events.

    Generated tokens are deltas as they come (leading whitespace dropped, trailing held back:
    the streamed text is the stripped generated text, as the answer is); in ensemble mode
    only while the reader has not settled the answer, which it may do first: then its span
    (or NO_ANSWER) is one delta. `finish` says what to send when nothing was streamed.
    """

    def __init__(self, mode: QueryMode, threshold: float | None) -> None:
        self.mode = mode
        self.threshold = threshold
        self.tokens = mode == "generative"
        self.sent = ""
        self.held = ""

    def feed(self, event: Event) -> str | None:
        name, payload = event
        if name == "answers" and self.mode == "ensemble" and isinstance(payload, ReadResponse):
            settled = None
            if self.threshold is not None:
                settled = settled_by_reader(payload, self.threshold)
            self.tokens = settled is None
            return None if settled is None else self._send(settled or NO_ANSWER)
        if name == "token" and self.tokens and isinstance(payload, GeneratedToken):
            text = self.held + payload.text
            if not self.sent:
                text = text.lstrip()
            kept = text.rstrip()
            self.held = text[len(kept) :]
            return self._send(kept) if kept else None
        return None

    def _send(self, text: str) -> str:
        self.sent += text
        return text

    def finish(self, response: QueryResponse) -> str | None:
        return None if self.sent else content_of(response)


# --- the routes --------------------------------------------------------------------------------


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def register(app: FastAPI, call: _Calls, reads: Sequence[Any]) -> None:
    """Add the OpenAI-compatible routes under PREFIX, guarded by the read keys."""
    router = APIRouter(prefix=PREFIX, route_class=_OpenAIRoute, tags=["openai"])
    created = int(time.time())

    def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
        return documented(*statuses, model=OpenAIErrorResponse, meanings=_MEANINGS)

    @router.get("/models", dependencies=list(reads), responses=errors(401, 429, 500, 503))
    async def openai_models() -> Response:
        """The qaserve modes as models, in OpenAI's list format."""
        cards = [model_card(name, created) for name in MODELS]
        return JSONResponse({"object": "list", "data": cards})

    @router.get(
        "/models/{model:path}", dependencies=list(reads), responses=errors(401, 404, 429, 500, 503)
    )
    async def openai_model(
        model: str = Path(..., json_schema_extra={"enum": list(MODELS)}),  # 404 for others
    ) -> Response:
        if model not in MODELS:
            message = f"The model {model!r} does not exist"
            raise OpenAIError(404, message, "model", "model_not_found")
        return JSONResponse(model_card(model, created))

    @router.post(
        "/chat/completions",
        dependencies=[*reads, Depends(json_body)],
        responses={
            200: _SSE_DOC,
            **errors(400, 401, 404, 413, 415, 429, 500, 503, 504),
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions answered by the query pipeline; the mapping and the
        `qaserve` evidence field are in the README ("OpenAI-compatible route")."""
        query = query_request(body, request.app.state.limits)
        backend = _backend(request)
        completion = _Completion(body.model)
        if not body.stream:
            response = await call("query", backend.query(query), request=request)
            return JSONResponse(completion.whole(response, query))
        return await _stream(call, backend, query, completion)

    known = {f"{PREFIX}/chat/completions", f"{PREFIX}/models"}

    @router.api_route(
        "/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
        dependencies=list(reads),
    )
    async def openai_unknown(rest: str, request: Request) -> Response:
        if request.url.path in known:
            allow = {"Allow": allowed_methods(request) or ""}
            message = f"{request.method} is not allowed on {request.url.path}"
            raise OpenAIError(405, message, headers=allow)
        message = f"qaserve implements {PREFIX}/chat/completions and {PREFIX}/models only"
        raise OpenAIError(404, message, code="unknown_url")

    app.include_router(router)
    _without_422(app)


def _without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; these routes never answer
    one (an invalid request is OpenAI's 400), so it leaves their OpenAPI operations."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path, operations in schema["paths"].items():
            if path.startswith(PREFIX):
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _stream(
    call: _Calls, backend: Any, query: QueryRequest, completion: _Completion
) -> Response:
    """Chunks in OpenAI's format, then `data: [DONE]`. An error before the first event is an
    ordinary error response; after it, a `data: {"error": ...}` line ends the stream."""
    deltas = Deltas(query.mode, _reader_threshold(backend))

    async def render(items: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        yield completion.chunk({"role": "assistant", "content": ""})
        final: QueryResponse | None = None
        async for item in items:
            text = deltas.feed(item)
            if text:
                yield completion.chunk({"content": text})
            if item[0] == "answer" and isinstance(item[1], QueryResponse):
                final = item[1]
        if final is None:
            raise InternalError("the query stream ended without an answer")
        rest = deltas.finish(final)
        if rest:
            yield completion.chunk({"content": rest})
        extra = {"qaserve": evidence(final, query)}
        yield completion.chunk({}, finish_reason(final, query), extra)
        yield _data("[DONE]")

    def on_error(error: QAServeError) -> bytes:
        return _data(json.dumps(OpenAIError.of(error).body()))

    return await call.events("query", backend.query_events(query), render, on_error)
