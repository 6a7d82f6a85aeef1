"""Cost bounds at the edge (qaserve.limits): each bound refuses one over it with a 422 naming
its field, before any stage runs, and accepts a request at it; the OpenAI route answers 400;
the OpenAPI document states them. Over the tiny engine (tests/tiny_models.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import WRITE_KEY, ApiServer

from qaserve.config import ApiKey, EngineConfig, GeneratorConfig, ReaderConfig, ServerConfig
from qaserve.errors import ConfigError
from qaserve.limits import Limits, LimitsConfig, estimate_tokens

# Finding 6: an ensemble query with a 2,000-character question held the CPU for 30-105 s.
LONG_ENGLISH = ("How is the bass on these headphones compared with the ones I had before? " * 30)[
    :2000
]
LONG_DIGITS = "7" * 2000  # one [UNK] to the reader, 2,000 tokens to a byte-level generator
LONG_CJK = "低音怎么样" * 400  # ~5,500 tokens a prompt to the packaged generator: 148 s
DOC = {"id": "d", "text": "The bass is deep and punchy; the treble is clear."}


def _error(r: httpx.Response) -> tuple[int, str | None, str | None]:
    error = r.json()["error"]
    return r.status_code, error.get("type"), error.get("field")


def _question(limits: Limits, tokens: int) -> str:
    """A question of exactly `tokens` of the reader's tokens."""
    question = " ".join(["bass"] * tokens)
    assert limits.count(question) == tokens
    return question


@pytest.fixture(scope="module")
def http(api_server: ApiServer) -> httpx.Client:
    return httpx.Client(
        base_url=api_server.url, timeout=120, headers={"X-API-Key": api_server.write_key}
    )


@pytest.fixture(scope="module")
def limits(http: httpx.Client, local_backend: Any, tiny_engine_config: Any) -> Limits:
    """The bounds the api_server derived from the tiny engine's settings."""
    return Limits.build(ServerConfig(), tiny_engine_config)


SMALL = LimitsConfig(
    max_top_k=10,
    max_new_tokens=8,  # the tiny generator's own max_new_tokens: not lower
    max_generation_tokens=5 * (64 + 8),  # 5 documents (the default), 1 beam, 8 question tokens
    max_read_chars=100,
    max_ingest_documents=2,
    max_question_tokens=8,
)


@pytest.fixture(scope="module")
def small(local_backend: Any, serve_app: Callable[[Any], str]) -> httpx.Client:
    """The app with small configured bounds (`server.limits`) over the same tiny engine."""
    from qaserve.runtime.api import build_app

    cfg = ServerConfig(api_keys=[ApiKey(key=WRITE_KEY, write=True)], limits=SMALL)
    url = serve_app(build_app(local_backend, cfg))
    return httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": WRITE_KEY})


# --- finding 6 ----------------------------------------------------------------------------


@pytest.mark.parametrize("question", [LONG_ENGLISH, LONG_DIGITS, LONG_CJK])
@pytest.mark.parametrize("stream", [False, True])
def test_a_long_question_is_refused_before_any_stage_runs(
    http: httpx.Client, question: str, stream: bool
) -> None:
    """Finding 6: the 2,000-character ensemble question was served (30-105 s of generation
    over five prompts holding the whole question); now a 422 naming the question, streamed or
    not, also when the reader would count it as one token (digits)."""
    r = http.post("/v1/query", json={"question": question, "stream": stream})
    assert _error(r) == (422, "validation_error", "question")
    assert "limits.max_question_tokens" in r.json()["error"]["message"]


def test_a_question_at_the_bound_is_answered(http: httpx.Client, limits: Limits) -> None:
    question = _question(limits, limits.question_tokens)
    body = {"question": question, "mode": "ensemble", "max_new_tokens": 2}
    assert http.post("/v1/query", json=body).status_code == 200
    over = {**body, "question": question + " bass"}
    assert _error(http.post("/v1/query", json=over)) == (422, "validation_error", "question")
    read = {"question": question + " bass", "documents": [DOC]}
    assert _error(http.post("/v1/read", json=read))[2] == "question"
    generate = {"question": question + " bass", "documents": [DOC]}
    assert _error(http.post("/v1/generate", json=generate))[2] == "question"


# --- generation ---------------------------------------------------------------------------


def test_generation_budget_from_the_generator_settings(http: httpx.Client, limits: Limits) -> None:
    """20 documents x 8 beams x 512 tokens was accepted; now documents x beams x (the
    generator's max_doc_tokens + question tokens) is bounded, derived from its settings
    (the generator's 20 documents, greedy, with the longest question) unless configured."""
    assert limits.generation_tokens == 20 * (64 + limits.question_tokens)
    question = _question(limits, limits.question_tokens)
    docs = [{"id": str(i), "text": DOC["text"]} for i in range(20)]
    at = {"question": question, "documents": docs, "max_new_tokens": 1}
    assert http.post("/v1/generate", json=at).status_code == 200  # exactly at the budget
    r = http.post("/v1/generate", json={**at, "num_beams": 2})
    assert _error(r) == (422, "validation_error", "num_beams")  # one beam fits: fewer beams
    assert "limits.max_generation_tokens" in r.json()["error"]["message"]
    r = http.post("/v1/query", json={"question": question, "top_k_retriever": 5, "num_beams": 8})
    assert _error(r) == (422, "validation_error", "num_beams")


def test_max_new_tokens_bound(http: httpx.Client, limits: Limits) -> None:
    assert limits.new_tokens == 128  # the default (the tiny generator's own is 8)
    body = {"question": "How is the bass?", "documents": [DOC], "max_new_tokens": 129}
    assert _error(http.post("/v1/generate", json=body)) == (
        422,
        "validation_error",
        "max_new_tokens",
    )


def test_configured_generation_bounds(small: httpx.Client) -> None:
    question = " ".join(["bass"] * 8)
    docs = [{**DOC, "id": str(i)} for i in range(5)]
    at = {"question": question, "documents": docs, "max_new_tokens": 8}
    assert small.post("/v1/generate", json=at).status_code == 200  # 5 x (64 + 8): the budget
    r = small.post("/v1/generate", json={**at, "max_new_tokens": 9})
    assert _error(r) == (422, "validation_error", "max_new_tokens")
    r = small.post("/v1/generate", json={**at, "documents": [*docs, {**DOC, "id": "f"}]})
    assert _error(r) == (422, "validation_error", "documents")
    query = {"question": question, "top_k_retriever": 6, "max_new_tokens": 1}
    assert _error(small.post("/v1/query", json=query)) == (
        422,
        "validation_error",
        "top_k_retriever",
    )
    extractive = {**query, "mode": "extractive"}  # reads only: no generation budget
    assert small.post("/v1/query", json=extractive).status_code == 200


# --- top-k, reads, ingest -------------------------------------------------------------------


def test_configured_top_k(small: httpx.Client) -> None:
    at = {"query": "bass", "top_k": 10}
    assert small.post("/v1/retrieve", json=at).status_code == 200
    assert _error(small.post("/v1/retrieve", json={**at, "top_k": 11}))[2] == "top_k"
    query = {"question": "bass", "mode": "extractive", "top_k_reader": 11}
    assert _error(small.post("/v1/query", json=query))[2] == "top_k_reader"
    r = small.post("/v1/query", json={**query, "top_k_reader": 10, "top_k_retriever": 11})
    assert _error(r) == (422, "validation_error", "top_k_retriever")
    r = small.post("/v1/query", json={**query, "top_k_reader": 10, "top_k_retriever": 10})
    assert r.status_code == 200


def test_configured_read_size(small: httpx.Client) -> None:
    fifty = "The bass is deep. The treble is clear. It fits well"  # 51 characters
    docs = [{"text": fifty[:50]}, {"text": fifty[:50]}]
    at = {"question": "bass", "documents": docs}
    assert small.post("/v1/read", json=at).status_code == 200  # 100 characters in all
    over = {**at, "documents": [{"text": fifty}, {"text": fifty[:50]}]}
    r = small.post("/v1/read", json=over)
    assert _error(r) == (422, "validation_error", "documents")
    assert "limits.max_read_chars" in r.json()["error"]["message"]
    many = {**at, "documents": [{"text": "bass"}] * 11}  # more than max_top_k
    assert _error(small.post("/v1/read", json=many))[2] == "documents"


def test_configured_ingest_batch(small: httpx.Client) -> None:
    docs = [{"id": f"limit-{i}", "text": "A review of the bass."} for i in range(3)]
    at = {"collection": "limits", "documents": docs[:2]}
    assert small.post("/v1/documents", json=at).status_code == 200
    r = small.post("/v1/documents", json={**at, "documents": docs})
    assert _error(r) == (422, "validation_error", "documents")
    r = small.post("/v1/documents?wait=false", json={**at, "documents": docs})
    assert _error(r) == (422, "validation_error", "documents")  # no way around it
    assert small.get("/v1/documents/limit-2", params={"collection": "limits"}).status_code == 404


# --- the OpenAI route -----------------------------------------------------------------------


def test_openai_route_refuses_with_its_400(http: httpx.Client, small: httpx.Client) -> None:
    chat = {"model": "qaserve", "messages": [{"role": "user", "content": LONG_ENGLISH}]}
    r = http.post("/openai/v1/chat/completions", json=chat)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "invalid_value")
    assert "limits.max_question_tokens" in error["message"]
    short = {**chat, "messages": [{"role": "user", "content": "how is the bass"}]}
    r = small.post("/openai/v1/chat/completions", json={**short, "top_k": 11})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "top_k")
    # max_tokens is an upper bound: capped at the limit, not refused
    docs = {"collection": "limits-chat", "documents": [DOC]}
    assert small.post("/v1/documents", json=docs).status_code == 200
    generative = {**short, "model": "qaserve-generative", "collection": "limits-chat"}
    r = small.post("/openai/v1/chat/completions", json={**generative, "max_tokens": 99})
    assert r.status_code == 200, r.text
    assert 0 < len(r.json()["qaserve"]["generated"]["tokens"]) <= 8  # SMALL.max_new_tokens


# --- the OpenAPI document -------------------------------------------------------------------


def test_the_bounds_are_in_the_openapi_document(small: httpx.Client) -> None:
    doc = small.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert schemas["QueryRequest"]["properties"]["question"]["x-max-tokens"] == 8
    assert schemas["RetrieveRequest"]["properties"]["top_k"]["maximum"] == 10
    assert schemas["IngestRequest"]["properties"]["documents"]["maxItems"] == 2
    assert schemas["QueryRequest"]["x-max-generation-tokens"] == 360
    new_tokens = schemas["GenerateRequest"]["properties"]["max_new_tokens"]["anyOf"]
    assert [n["maximum"] for n in new_tokens if n.get("type") == "integer"] == [8]
    query = doc["paths"]["/v1/query"]["post"]["description"]
    assert "limits.max_generation_tokens" in query and "360" in query
    chat = doc["paths"]["/openai/v1/chat/completions"]["post"]["description"]
    assert "400 naming the field" in chat


# --- derivation and configuration -----------------------------------------------------------


def test_bounds_derive_from_the_stage_settings(tiny_engine_config: EngineConfig) -> None:
    engine = tiny_engine_config.model_copy(
        update={
            "reader": tiny_engine_config.reader.model_copy(update={"max_question_len": 32}),
            "generator": tiny_engine_config.generator.model_copy(
                update={"max_doc_tokens": 100, "num_beams": 2, "max_new_tokens": 200}
            ),
        }
    )
    limits = Limits.build(ServerConfig(), engine)
    assert limits.question_tokens == 32
    assert limits.generation_tokens == 20 * 2 * (100 + 32)
    assert limits.new_tokens == 200  # never below the generator's own default


def test_defaults_that_break_the_bounds_stop_the_start(tiny_engine_config: EngineConfig) -> None:
    with pytest.raises(ConfigError, match=r"limits\.max_new_tokens"):
        Limits.build(
            ServerConfig(limits=LimitsConfig(max_new_tokens=4)),
            tiny_engine_config.model_copy(
                update={"generator": GeneratorConfig(model="x", max_new_tokens=8)}
            ),
        )
    with pytest.raises(ConfigError, match=r"limits\.max_generation_tokens"):
        Limits.build(ServerConfig(limits=LimitsConfig(max_generation_tokens=10)), EngineConfig())
    with pytest.raises(ConfigError, match=r"limits\.max_top_k"):
        Limits.build(ServerConfig(limits=LimitsConfig(max_top_k=4)), EngineConfig())


def test_unknown_words_count_per_character(tiny_engine_config: EngineConfig) -> None:
    count = Limits.build(ServerConfig(), tiny_engine_config).count
    assert count("How is the bass?") == 5
    assert count(LONG_DIGITS) == 2000  # one [UNK] to the reader
    assert count("🎧" * 10) == 10


def test_without_a_tokenizer_file_the_count_is_estimated(tmp_path: Path) -> None:
    engine = EngineConfig(reader=ReaderConfig(model=str(tmp_path)))  # no tokenizer.json
    limits = Limits.build(ServerConfig(), engine)
    assert limits.count("How is the bass?") == estimate_tokens("How is the bass?") == 5
    assert limits.count(LONG_DIGITS) == 500
    assert limits.question_tokens == 64  # reader.max_question_len
