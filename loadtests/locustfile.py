"""Locust users for qaserve: `qaserve loadtest` runs this file headless (see run.py).

Configured by environment (the runner sets it): QASERVE_LOADTEST_WORKLOAD (workload JSON),
QASERVE_LOADTEST_PROFILE (a Profile as JSON), QASERVE_LOADTEST_SAMPLES (where every request's
timing is written at the end, for per-step figures and plots), QASERVE_API_KEY (optional).

Request names (the rows of Locust's statistics and of constraints.yaml): `query:<mode>`,
`retrieve`, `read`, `documents:write`, and for streamed generation `generate:stream` (the
whole stream) and `generate:first-token` (time to the first token event).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import requests
from locust import HttpUser, LoadTestShape, between, constant_pacing, events, task

from qaserve.loadtests.profiles import Profile
from qaserve.loadtests.workload import Workload

PROFILE = Profile.model_validate_json(os.environ.get("QASERVE_LOADTEST_PROFILE", "{}"))
WORKLOAD = Workload.load(os.environ["QASERVE_LOADTEST_WORKLOAD"])
SAMPLES_PATH = os.environ.get("QASERVE_LOADTEST_SAMPLES")
API_KEY = os.environ.get("QASERVE_API_KEY")
HEADERS = {"X-API-Key": API_KEY} if API_KEY else {}

_samples: list[dict[str, Any]] = []
_lock = threading.Lock()
_state = {"step": 0, "users": 0}


def _record(**sample: Any) -> None:
    sample.update(t=time.time(), step=_state["step"], users=_state["users"])
    with _lock:
        _samples.append(sample)


@events.request.add_listener
def _on_request(
    request_type: str,
    name: str,
    response_time: float,
    response_length: int,
    exception: BaseException | None = None,
    response: Any = None,
    **_: Any,
) -> None:
    status = getattr(response, "status_code", None)
    if status is None and request_type == "SSE" and exception is None:
        status = 200  # a stream event we timed ourselves, from a 200 response
    _record(name=name, ms=response_time, ok=exception is None, status=status)


@events.test_stop.add_listener
def _write_samples(**_: Any) -> None:
    if SAMPLES_PATH:
        with _lock:
            Path(SAMPLES_PATH).write_text("\n".join(json.dumps(s) for s in _samples) + "\n")


def _fire(name: str, ms: float, length: int = 0, exc: BaseException | None = None) -> None:
    events.request.fire(
        request_type="SSE",
        name=name,
        response_time=ms,
        response_length=length,
        exception=exc,
        context={},
    )


class QAUser(HttpUser):
    """One person asking questions about a product (filtered to its item) and the stage calls
    an application makes around them; the mix is the profile's task weights."""

    wait_time = between(*PROFILE.wait_s)

    def on_start(self) -> None:
        names = [t for t, w in PROFILE.tasks.items() if w > 0]
        self._tasks = names
        self._weights = [PROFILE.tasks[t] for t in names]
        self._stream = requests.Session()

    @task
    def next_request(self) -> None:
        q = random.choice(WORKLOAD.questions)
        getattr(self, random.choices(self._tasks, self._weights)[0])(q)

    def _post(self, path: str, body: dict[str, Any], name: str) -> None:
        with self.client.post(
            path,
            json=body,
            headers=HEADERS,
            name=name,
            timeout=PROFILE.request_timeout_s,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    def _query(self, q: Any, mode: str) -> None:
        body = {
            "question": q.question,
            "filters": {"item_id": q.item_id},
            "mode": mode,
            "top_k_retriever": PROFILE.top_k_retriever,
            "max_new_tokens": PROFILE.max_new_tokens,
        }
        self._post("/v1/query", body, f"query:{mode}")

    def query_extractive(self, q: Any) -> None:
        self._query(q, "extractive")

    def query_ensemble(self, q: Any) -> None:
        self._query(q, "ensemble")

    def query_generative(self, q: Any) -> None:
        self._query(q, "generative")

    def retrieve(self, q: Any) -> None:
        body = {"query": q.question, "filters": {"item_id": q.item_id}, "top_k": 5}
        self._post("/v1/retrieve", body, "retrieve")

    def read(self, q: Any) -> None:
        body = {"question": q.question, "documents": [{"id": "r", "text": q.context}]}
        self._post("/v1/read", body, "read")

    def generate_stream(self, q: Any) -> None:
        """Time to the first `token` event and tokens/s, from the SSE stream itself."""
        body = {
            "question": q.question,
            "documents": [{"id": "r", "text": q.context}],
            "max_new_tokens": PROFILE.max_new_tokens,
            "stream": True,
        }
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        error: BaseException | None = None
        try:
            with self._stream.post(
                cast(str, self.host).rstrip("/") + "/v1/generate",  # Locust sets it
                json=body,
                headers=HEADERS,
                stream=True,
                timeout=PROFILE.request_timeout_s,
            ) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
                event = None
                # decode_unicode: str lines (the stub says bytes whatever the flag)
                lines = cast(Iterator[str], resp.iter_lines(decode_unicode=True))
                for line in lines:
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "token":
                        last = time.perf_counter()
                        if first is None:
                            first = last
                            _fire("generate:first-token", (first - t0) * 1000)
                        tokens += 1
                    elif line.startswith("data:") and event == "error":
                        raise RuntimeError(f"error event: {line[5:].strip()[:200]}")
                if first is None:
                    raise RuntimeError("the stream ended without a token")
        except Exception as exc:
            error = exc
        total = (time.perf_counter() - t0) * 1000
        _fire("generate:stream", total, tokens, error)
        if error is None and first is not None and last is not None:
            _record(
                name="stream",
                ttft_ms=(first - t0) * 1000,
                tokens=tokens,
                decode_s=last - first,
                ok=True,
            )


class WriterUser(HttpUser):
    """The trickle of writes a live deployment sees: a review re-ingested under a fresh id
    and a meta item of its own, so the questions' filtered answers do not change."""

    fixed_count = 1
    wait_time = constant_pacing(60.0 / PROFILE.writes_per_min if PROFILE.writes_per_min else 60)

    @task
    def write(self) -> None:
        doc = dict(random.choice(WORKLOAD.documents))
        doc["id"] = f"loadtest-{uuid.uuid4().hex[:12]}"
        doc["meta"] = {"item_id": "loadtest-writes"}
        with self.client.post(
            "/v1/documents",
            json={"documents": [doc]},
            headers=HEADERS,
            name="documents:write",
            timeout=PROFILE.request_timeout_s,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")


class Steps(LoadTestShape):
    """The profile's steps: reach each step's users at spawn_rate, hold, then stop."""

    def tick(self) -> tuple[int, float, list[type]] | None:
        elapsed = self.get_run_time()
        start = 0.0
        for i, step in enumerate(PROFILE.steps):
            if elapsed < start + step.seconds:
                _state["step"], _state["users"] = i, step.users
                classes: list[type] = [QAUser]
                users = step.users
                if PROFILE.writes_per_min > 0:
                    classes.append(WriterUser)
                    users += 1
                return users, PROFILE.spawn_rate, classes
            start += step.seconds
        return None
