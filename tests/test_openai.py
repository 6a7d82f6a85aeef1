"""The OpenAI-compatible route with the real `openai` SDK against the app on uvicorn.

The engine is the tiny one (tests/tiny_models.py): the reader and generator are random, so
the tests check the contract (what is answered where, streamed how, refused how), never the
quality of an answer. Raw httpx only where the wire itself is the point (SSE framing, the
error body's shape).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest
from tiny_models import FaultyBackend

from qaserve.config import ApiKey, EnsembleConfig, ServerConfig
from qaserve.errors import Overloaded
from qaserve.pipeline import Pipeline
from qaserve.runtime.api import build_app
from qaserve.runtime.openai_routes import MODELS, NO_ANSWER, Deltas
from qaserve_client.schema import (
    Answer,
    FinalAnswer,
    GeneratedToken,
    QueryResponse,
    ReadResponse,
)

pytestmark = pytest.mark.slow  # the retriever is the real packaged MiniLM

QUESTION = "How long does the battery last?"
COLLECTION = "openai"
REVIEWS: list[dict[str, Any]] = [
    {"id": "battery", "text": "The battery lasts about ten hours.", "meta": {"item_id": "laptop"}},
    {"id": "screen", "text": "The screen is bright and sharp.", "meta": {"item_id": "laptop"}},
    {"id": "hotel", "text": "The hotel room was clean and quiet.", "meta": {"item_id": "hotel"}},
]
ON_LAPTOPS = {"collection": COLLECTION, "filters": {"item_id": "laptop"}}


def sdk(url: str, key: str | None, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/openai/v1", api_key=key, max_retries=0, timeout=60, **kwargs
    )


@pytest.fixture(scope="module")
def reviews(api_server: Any) -> str:
    response = httpx.post(
        f"{api_server.url}/v1/documents",
        json={"collection": COLLECTION, "documents": REVIEWS},
        headers={"Authorization": f"Bearer {api_server.write_key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return COLLECTION


@pytest.fixture(scope="module")
def client(api_server: Any, reviews: str) -> Iterator[openai.OpenAI]:
    with sdk(api_server.url, api_server.read_key) as c:
        yield c


def ask(client: openai.OpenAI, model: str = "qaserve", **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": QUESTION}])
    kwargs.setdefault("extra_body", ON_LAPTOPS)
    return client.chat.completions.create(model=model, **kwargs)


def evidence(obj: Any) -> QueryResponse:
    extra = obj.model_extra or {}
    assert "qaserve" in extra, obj
    return QueryResponse.model_validate(extra["qaserve"])


def streamed(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    with ask(client, stream=True, **kwargs) as stream:
        return list(stream)


# --- models ------------------------------------------------------------------------------------


def test_models_are_the_query_modes(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert (
        [m.id for m in models]
        == list(MODELS)
        == [
            "qaserve",
            "qaserve-ensemble",
            "qaserve-extractive",
            "qaserve-generative",
        ]
    )
    assert {(m.object, m.owned_by) for m in models} == {("model", "qaserve")}
    assert client.models.retrieve("qaserve-extractive").id == "qaserve-extractive"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_v1_models_is_unchanged(api_server: Any) -> None:
    reader = {"X-API-Key": api_server.read_key}
    models = httpx.get(f"{api_server.url}/v1/models", headers=reader).json()["models"]
    stages = {m["stage"] for m in models}
    assert {"retriever", "reader", "generator"} <= stages


# --- completions -------------------------------------------------------------------------------


def test_completion_answers_with_its_evidence(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Answer from the reviews."},
        {"role": "user", "content": "Is the screen good?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": QUESTION},  # the last user message is the question
    ]
    done = ask(client, messages=messages, extra_body={**ON_LAPTOPS, "top_k": 2})
    assert done.object == "chat.completion" and done.model == "qaserve"
    assert done.id.startswith("chatcmpl-")
    (choice,) = done.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    qa = evidence(done)
    assert done.model_extra["qaserve"]["mode"] == "ensemble"
    assert {d.id for d in qa.documents} == {"battery", "screen"}  # filters and top_k applied
    assert all(d.text and d.meta == {"item_id": "laptop"} for d in qa.documents)
    assert {"retriever", "reader", "generator", "ensemble", "total"} <= set(qa.timings_ms)
    assert qa.generated is not None  # the ensemble generated too
    if qa.answer.source == "none":
        assert choice.message.content == NO_ANSWER
    else:
        assert choice.message.content == qa.answer.text
    if qa.answer.source in ("reader", "both"):  # a span, with its place in its document
        texts = {d["id"]: d["text"] for d in REVIEWS}
        start, end = qa.answer.start, qa.answer.end
        assert start is not None and end is not None and qa.answer.document_id is not None
        assert texts[qa.answer.document_id][start:end] == qa.answer.text


def test_each_model_is_its_mode(client: openai.OpenAI) -> None:
    extractive = evidence(ask(client, "qaserve-extractive"))
    assert extractive.generated is None and "generator" not in extractive.timings_ms
    assert extractive.answer.source in ("reader", "none")
    generative = ask(client, "qaserve-generative", max_tokens=3)
    qa = evidence(generative)
    assert qa.answers == [] and qa.no_answer_score is None  # nothing read
    assert qa.generated is not None and 1 <= len(qa.generated.tokens) <= 3
    assert qa.answer.source in ("generator", "none")
    expected = qa.generated.text.strip() or NO_ANSWER
    assert generative.choices[0].message.content == expected
    cut = qa.answer.source == "generator" and len(qa.generated.tokens) == 3
    assert generative.choices[0].finish_reason == ("length" if cut else "stop")


def test_token_limits_and_text_parts(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "How long does"}, {"type": "text", "text": "it last?"}]
    done = ask(
        client,
        "qaserve-generative",
        messages=[{"role": "user", "content": parts}],
        max_completion_tokens=2,
        max_tokens=7,  # max_completion_tokens wins, as in OpenAI's API
    )
    qa = evidence(done)
    assert qa.generated is not None and 1 <= len(qa.generated.tokens) <= 2
    # a limit over the API's own is an upper bound: capped, not refused
    assert ask(client, "qaserve-generative", max_tokens=100_000).choices


def test_harmless_openai_arguments_are_accepted(client: openai.OpenAI) -> None:
    done = ask(
        client,
        "qaserve-extractive",
        temperature=0.2,
        top_p=0.9,
        seed=7,
        user="someone",
        stop=["\n"],
        n=1,
        presence_penalty=0.0,
        response_format={"type": "text"},
    )
    assert done.choices[0].message.content


def test_an_empty_collection_says_there_is_no_answer(client: openai.OpenAI) -> None:
    done = ask(client, extra_body={"collection": "openai_empty"})
    assert done.choices[0].message.content == NO_ANSWER
    assert done.choices[0].finish_reason == "stop"
    qa = evidence(done)
    assert qa.documents == [] and qa.answer.source == "none" and qa.answer.text == ""


# --- streams -----------------------------------------------------------------------------------


def content(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks[1:] if c.choices[0].delta.content]


@pytest.mark.parametrize("model", ["qaserve", "qaserve-extractive", "qaserve-generative"])
def test_stream_is_the_completion_in_chunks(client: openai.OpenAI, model: str) -> None:
    chunks = streamed(client, model=model, max_tokens=5)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == model
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant" and first.finish_reason is None
    assert last.finish_reason in ("stop", "length") and not last.delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all("qaserve" not in (c.model_extra or {}) for c in chunks[:-1])
    qa = evidence(chunks[-1])  # the evidence rides on the last chunk
    plain = ask(client, model=model, max_tokens=5)
    assert "".join(content(chunks)) == plain.choices[0].message.content
    assert qa.answer == evidence(plain).answer
    assert last.finish_reason == plain.choices[0].finish_reason
    if model == "qaserve-generative" and qa.answer.source == "generator":
        assert qa.generated is not None
        words = [t for t in qa.generated.tokens if t.text.strip()]
        assert len(content(chunks)) == len(words)  # a delta per token, as decided
    else:  # the reader settled it (threshold 0): the span, or "no answer", as one delta
        assert len(content(chunks)) == 1


def _tokens(*texts: str) -> list[tuple[str, Any]]:
    return [("token", GeneratedToken(id=i, text=t, logprob=0.0)) for i, t in enumerate(texts)]


def _reading(score: float, no_answer: float) -> tuple[str, Any]:
    span = Answer(answer="ten hours", score=score, start=0, end=9, document_id="d")
    return "answers", ReadResponse(answers=[span], no_answer_score=no_answer)


def test_deltas_follow_the_ensemble_policy() -> None:
    def run(mode: Any, threshold: float | None, events: list[tuple[str, Any]]) -> list[str]:
        deltas = Deltas(mode, threshold)
        sent = [d for d in map(deltas.feed, events) if d]
        final = QueryResponse(
            answer=FinalAnswer(text="", source="none", score=0.0),
            answers=[],
            generated=None,
            documents=[],
            timings_ms={},
        )
        rest = deltas.finish(final)
        return sent + ([rest] if rest else [])

    words = _tokens(" The", " battery", " ", "lasts", " \n")
    # generated text, stripped as the answer is: whitespace held back until a word follows
    assert run("generative", 0.0, words) == ["The", " battery", " lasts"]
    assert run("generative", 0.0, _tokens(" ", "\n")) == [NO_ANSWER]  # nothing generated
    # the reader settles it: its span at once, or "no answer"; the tokens are not the answer
    assert run("ensemble", 0.0, [_reading(0.6, 0.1), *words]) == ["ten hours"]
    assert run("ensemble", 0.0, [_reading(0.1, 0.6), *words]) == [NO_ANSWER]
    # a span under the threshold: the generated text may decide, so it streams
    assert run("ensemble", 0.9, [_reading(0.6, 0.1), *words]) == ["The", " battery", " lasts"]
    assert run("ensemble", None, [_reading(0.6, 0.1), *words])[0] == "The"  # policy unknown
    assert run("extractive", 0.0, [_reading(0.6, 0.1)]) == [NO_ANSWER]  # the final answer's


def test_a_stream_the_reader_does_not_settle_streams_tokens(
    api_server: Any, serve_app: Any, reviews: str
) -> None:
    """An ensemble whose reader threshold no span reaches: the generated text decides unless
    it agrees with a span, so its tokens stream as they come."""
    backend = Pipeline(api_server.backend.calls, EnsembleConfig(reader_threshold=2.0))
    url = serve_app(build_app(backend, ServerConfig(api_keys=[])))
    with sdk(url, "unused") as c:
        chunks = streamed(c, max_tokens=6)
        plain = ask(c, max_tokens=6)
    qa = evidence(chunks[-1])
    assert qa.generated is not None and qa.generated.tokens
    if qa.answer.source == "generator":
        assert len(content(chunks)) == len([t for t in qa.generated.tokens if t.text.strip()])
        assert "".join(content(chunks)) == qa.answer.text == plain.choices[0].message.content
    elif qa.answer.source == "none":
        assert content(chunks) == [NO_ANSWER]


def test_stream_wire_format(api_server: Any, reviews: str) -> None:
    body = {
        "model": "qaserve-generative",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": 3,
        **ON_LAPTOPS,
    }
    response = httpx.post(
        f"{api_server.url}/openai/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_server.read_key}"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(chunks[-1]["qaserve"]) >= {"mode", "answer", "documents", "timings_ms"}


# --- refusals and errors -----------------------------------------------------------------------


def error_of(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    body = cast(dict[str, Any], caught.value.body)
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["message"]
    return body


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "gpt-4o")
    error = error_of(caught)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "qaserve-extractive" in error["message"]  # says what exists


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"extra_body": {"colection": "typo"}}, "colection"),  # unknown argument
        ({"extra_body": {"top_k": 0}}, "top_k"),  # qaserve's own checks, in OpenAI's names
        ({"extra_body": {"filters": {"item_id": []}}}, "filters"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0",
        ),
    ],
)
def test_refusals_are_400_and_name_the_parameter(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, **kwargs)
    assert error_of(caught)["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"messages": [{"role": "user", "content": "a \\ud800 b"}]', "messages.0.content"),
        (
            '"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
            "messages.0.content.0.text",
        ),
        ('"messages": [{"role": "user", "content": "ab"}], "user": "\\ud800"', "user"),
        (
            '"messages": [{"role": "user", "content": "ab"}], "metadata": {"k": "\\ud800"}',
            "metadata.k",
        ),
        (
            '"messages": [{"role": "user", "content": "ab"}], "filters": {"k": "\\ud800"}',
            "filters.k",
        ),
        ('"messages": [{"role": "user", "content": "ab"}], "collection": "c\\ud800"', "collection"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_parameter(
    api_server: Any, extra: str, param: str
) -> None:
    """Finding 2 on this route: JSON text with an escaped lone surrogate. In the question it
    was a 400 naming `messages`; in the fields passed along or ignored, accepted."""
    raw = '{"model": "qaserve", ' + extra + "}"
    response = httpx.post(
        f"{api_server.url}/openai/v1/chat/completions",
        content=raw.encode(),
        headers={
            "Authorization": f"Bearer {api_server.read_key}",
            "content-type": "application/json",
        },
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_body_that_is_not_json_is_415(api_server: Any) -> None:
    response = httpx.post(
        f"{api_server.url}/openai/v1/chat/completions",
        content=json.dumps({"model": "qaserve", "messages": [{"role": "user", "content": "q"}]}),
        headers={"Authorization": f"Bearer {api_server.read_key}", "content-type": "text/plain"},
        timeout=60,
    )
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["type"] == "invalid_request_error"


def test_n_above_one_says_why(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, n=2)
    assert "one" in error_of(caught)["message"]


def test_empty_messages_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as caught:
        ask(client, messages=[])
    assert error_of(cast(Any, caught))["param"] == "messages"


def test_keys(api_server: Any, serve_app: Any, reviews: str) -> None:
    with sdk(api_server.url, "not-a-key") as wrong, pytest.raises(openai.AuthenticationError):
        ask(wrong)
    cfg = ServerConfig(api_keys=[ApiKey(key=api_server.read_key)])
    url = serve_app(build_app(api_server.backend, cfg))
    with sdk(url, "not-a-key") as wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert error_of(caught)["code"] == "invalid_api_key"
    missing = httpx.post(f"{url}/openai/v1/chat/completions", json={})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    no_header = {"Authorization": openai.omit}  # the SDK sends no key at all
    with sdk(url, "x") as nokey, pytest.raises(openai.AuthenticationError) as caught:
        nokey.models.list(extra_headers=no_header)
    assert "required" in error_of(caught)["message"]
    with sdk(url, api_server.read_key) as right:  # Authorization: Bearer KEY
        assert ask(right, "qaserve-extractive").choices[0].message.content


def test_unknown_routes_answer_in_openai_shape(api_server: Any) -> None:
    url = f"{api_server.url}/openai/v1"
    reader = {"Authorization": f"Bearer {api_server.read_key}"}
    missing = httpx.post(f"{url}/embeddings", json={"input": "x"}, headers=reader)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    anonymous = httpx.post(f"{url}/embeddings", json={"input": "x"})
    assert anonymous.status_code == 401  # no key, no route map
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    wrong_method = httpx.get(f"{url}/chat/completions", headers=reader)
    assert wrong_method.status_code == 405
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}


def test_backend_errors_before_and_during_a_stream(
    api_server: Any, serve_app: Any, reviews: str
) -> None:
    backend = FaultyBackend(api_server.backend)
    cfg = ServerConfig(api_keys=[], retry_after_s=3)
    url = serve_app(build_app(cast(Any, backend), cfg))  # a duck-typed Pipeline
    with sdk(url, "unused") as c:
        backend.inject("query_events", Overloaded("the reader's queue is full"))
        with pytest.raises(openai.InternalServerError) as caught:
            streamed(c)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "3"
        assert error_of(cast(Any, caught))["code"] == "overloaded"
        backend.inject("query_events.next", None, RuntimeError("reader exploded"))
        with pytest.raises(openai.APIError) as mid:
            streamed(c)
        assert mid.value.message == "internal server error"
        assert "exploded" not in str(mid.value.body)
        assert streamed(c)[-1].choices[0].finish_reason == "stop"  # and it serves on
