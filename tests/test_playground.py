"""The playground page at `/`, in a real headless Chromium driven by Selenium.

The page is served by the app itself over the tiny engine (tests/conftest.py), and talks to
the v1 API like any client: these tests ask through it, read what it shows, and check the
messages it gives for refused, failed, overloaded and dropped requests. They need Debian's
`chromium` and `chromium-driver` (.ci/run installs them); without a chromium binary they
are skipped. Selenium is pointed at the system chromedriver, so it never downloads one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from tiny_models import FaultyBackend

from qaserve.config import ApiKey, RateLimit, ServerConfig
from qaserve.errors import Overloaded
from qaserve.runtime.api import build_app
from qaserve.runtime.playground import HEADERS
from qaserve_client import sse

pytestmark = pytest.mark.slow  # a browser, and the real packaged MiniLM behind the retriever

QUESTION = "How long does the battery last?"
REVIEWS: list[dict[str, Any]] = [
    {
        "id": "battery",
        "text": "The battery lasts about ten hours on a single charge.",
        "meta": {"item_id": "laptop"},
    },
    {
        "id": "screen",
        "text": "The screen is bright and sharp, even outdoors.",
        "meta": {"item_id": "laptop"},
    },
    {
        "id": "hotel",
        "text": "The hotel room was clean and the staff were friendly.",
        "meta": {"item_id": "hotel"},
    },
]
TERMINAL = ("done", "error", "dropped", "stopped")
WAIT_S = 60


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMEDRIVER = _find("chromedriver", "chromium-driver")


# --- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium chromium-driver)")
    if CHROMEDRIVER is None:
        pytest.fail(f"{CHROMIUM} is here but chromedriver is not: apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_script_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()


class Page:
    """The playground in the browser, by the ids its HTML gives its parts."""

    def __init__(self, driver: Any, url: str) -> None:
        self.d = driver
        self.url = url

    def open(self, key: str | None = None, keep_storage: bool = False) -> Page:
        self.d.set_window_size(1280, 900)
        self.d.get(self.url + "/")
        if not keep_storage:
            self.d.execute_script("sessionStorage.clear()")
            self.d.get(self.url + "/")
        self.wait(lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        if key is not None:
            self.type("api-key", key)
        return self

    def wait(self, condition: Callable[[Any], Any], timeout: float = WAIT_S) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(condition)

    def el(self, id_: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.ID, id_)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, css))

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def type(self, id_: str, text: str) -> None:
        field = self.el(id_)
        field.clear()
        if text:
            field.send_keys(text)

    def choose(self, id_: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.el(id_)).select_by_value(value)

    def state(self) -> str:
        return str(self.el("answer").get_attribute("data-state"))

    def ask(
        self,
        question: str = QUESTION,
        *,
        collection: str = "",
        mode: str = "ensemble",
        retrieval: str = "dense",
        top_k: str = "3",
        filters: str = "",
        wait: bool = True,
    ) -> str:
        self.type("collection", collection)
        self.choose("mode", mode)
        self.choose("retrieval", retrieval)
        self.type("top-k", top_k)
        self.type("filters", filters)
        self.type("question", question)
        self.js("document.getElementById('answer').dataset.state = 'idle'")
        self.el("ask").click()
        if not wait:
            return self.state()
        self.wait(lambda _: self.state() in TERMINAL)
        return self.state()

    def add(self, *, paste: str = "", file: Path | None = None, collection: str = "") -> None:
        self.type("collection", collection)
        if file is not None:
            self.el("file").send_keys(str(file))
        else:
            self.js("arguments[0].value = arguments[1]", self.el("paste"), paste)
        self.js(
            "document.getElementById('add-status').textContent = '';"
            "document.getElementById('add-error').hidden = true"
        )
        self.el("add").click()
        self.wait(
            lambda _: (
                self.el("add-status").text.startswith("Added")
                or self.el("add-error").is_displayed()
            )
        )

    def documents(self) -> list[dict[str, Any]]:
        """What the page shows of each retrieved document, with its marks."""
        return cast(
            list[dict[str, Any]],
            self.js(
                """return [...document.querySelectorAll('#documents > li')].map(li => ({
                    id: li.dataset.docId,
                    index: Number(li.dataset.docIndex),
                    text: li.querySelector('.doc-text').textContent,
                    shownId: li.querySelector('.doc-id').textContent,
                    className: li.className,
                    elements: [...li.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                    marks: [...li.querySelectorAll('mark')].map(m => ({
                        start: Number(m.dataset.start), end: Number(m.dataset.end),
                        text: m.textContent, final: m.classList.contains('final')})),
                }))"""
            ),
        )

    def error(self, box: str = "error") -> dict[str, str]:
        element = self.el(box)
        assert element.is_displayed(), f"#{box} shows no message"
        return {
            "text": element.text,
            "status": element.get_attribute("data-status") or "",
            "type": element.get_attribute("data-type") or "",
        }

    def console_errors(self) -> list[str]:
        """Script errors and CSP violations logged since the last call."""
        entries = self.d.get_log("browser")
        return [
            e["message"]
            for e in entries
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
        ]


@pytest.fixture(scope="module")
def http(api_server: Any) -> Iterator[httpx.Client]:
    headers = {"X-API-Key": api_server.read_key}  # reads need a key too
    with httpx.Client(base_url=api_server.url, timeout=60, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def writer(api_server: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_server.write_key}"}


@pytest.fixture(scope="module")
def reviews(http: httpx.Client, writer: dict[str, str]) -> str:
    body = {"collection": "playground", "documents": REVIEWS}
    assert http.post("/v1/documents", json=body, headers=writer).status_code == 200
    return "playground"


@pytest.fixture
def page(driver: Any, api_server: Any) -> Page:
    """The page on the tiny engine's server, the read key typed in (every API call needs a
    key; writes a write key)."""
    return Page(driver, api_server.url).open(key=api_server.read_key)


@pytest.fixture(scope="module")
def faulty(api_server: Any, serve_app: Any) -> tuple[FaultyBackend, str]:
    backend = FaultyBackend(api_server.backend)
    cfg = ServerConfig(api_keys=[], retry_after_s=3)
    return backend, serve_app(build_app(cast(Any, backend), cfg))  # a duck-typed Pipeline


@pytest.fixture
def faults(faulty: tuple[FaultyBackend, str]) -> Iterator[tuple[FaultyBackend, str]]:
    yield faulty
    faulty[0].faults.clear()  # what a test injected and did not use


def code_points(text: str, start: int, end: int) -> str:
    return text[start:end]  # Python slices code points, as the server's offsets count


# --- the page ------------------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == HEADERS["Content-Security-Policy"]
    for asset in ("/playground/playground.js", "/playground/playground.css"):
        response = http.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "://" not in response.text, asset  # no CDN, no external fonts
    assert "://" not in page.text
    assert http.get("/playground/missing.js").status_code == 404
    assert "/" not in http.get("/openapi.json").json()["paths"]


def test_controls_are_labelled_and_in_order(page: Page) -> None:
    page.open()  # no key typed in: the keyboard starts from the top of the page
    unlabelled = page.js(
        """return [...document.querySelectorAll('input, select, textarea')]
            .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"""
    )
    assert unlabelled == []
    assert page.el("answer-live").get_attribute("aria-live") == "polite"
    assert page.el("error").get_attribute("role") == "alert"
    assert page.js("return document.documentElement.lang") == "en"
    # keyboard: the skip link, then the question and its settings, then Ask
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.js("document.activeElement.blur(); window.scrollTo(0, 0)")
    order = []
    for _ in range(7):
        ActionChains(page.d).send_keys(Keys.TAB).perform()
        order.append(
            page.js("return document.activeElement.id || document.activeElement.className")
        )
    assert order == ["skip", "question", "mode", "retrieval", "top-k", "filters", "ask"]
    assert page.wait(lambda _: page.el("ready").get_attribute("data-state") == "ready")
    assert page.console_errors() == []  # no script error, no CSP violation


def test_ask_streams_the_answer_with_spans_tokens_and_timings(
    page: Page, http: httpx.Client, reviews: str
) -> None:
    assert page.ask(collection=reviews, top_k="3") == "done", page.el("error").text
    expected = http.post(
        "/v1/query", json={"question": QUESTION, "collection": reviews, "top_k_retriever": 3}
    ).json()  # what the stream answers too (tests/test_api.py checks that)

    answer = expected["answer"]
    shown = page.el("answer-text").text
    assert shown == answer["text"] if answer["text"] else shown.startswith("No answer")
    assert page.el("answer-source").text == answer["source"]
    assert page.el("answer-score").text == f"{answer['score']:.3f}"
    assert page.el("answer-live").get_attribute("aria-busy") == "false"

    docs = page.documents()
    assert [d["id"] for d in docs] == [d["id"] for d in expected["documents"]]
    assert [d["text"] for d in docs] == [d["text"] for d in expected["documents"]]

    # the reader's best span is marked in its document, at its offsets
    assert expected["answers"], "the tiny reader found no span"
    best = expected["answers"][0]
    where = next(
        d
        for d in docs
        if d["id"] == best["document_id"]
        and code_points(d["text"], best["start"], best["end"]) == best["answer"]
    )
    assert {"start": best["start"], "end": best["end"], "text": best["answer"]} in [
        {k: m[k] for k in ("start", "end", "text")} for m in where["marks"]
    ]
    for doc in docs:
        for mark in doc["marks"]:
            assert mark["text"] == code_points(doc["text"], mark["start"], mark["end"])
    if answer["source"] in ("reader", "both"):
        assert any(
            m["final"] and (m["start"], m["end"]) == (answer["start"], answer["end"])
            for m in where["marks"]
        )

    # each generated token, coloured by the document it leaned on
    tokens = page.js(
        """return [...document.querySelectorAll('#generated .tok')].map(t => ({
            text: t.textContent, index: t.dataset.docIndex, cls: t.className}))"""
    )
    generated = expected["generated"]["tokens"]
    assert [t["text"] for t in tokens] == [t["text"] for t in generated]
    for shown_token, token in zip(tokens, generated, strict=True):
        assert int(shown_token["index"]) == token["document_index"]
        assert f"c{token['document_index'] % 8}" in shown_token["cls"].split()
        assert docs[token["document_index"]]["id"] == token["document_id"]

    stages = [row.get_attribute("data-stage") for row in page.all("#timings tbody tr")]
    assert stages == ["retriever", "reader", "generator", "ensemble", "total"]
    assert all(float(c.text) >= 0 for c in page.all("#timings td.num"))
    assert page.console_errors() == []


def test_tokens_and_documents_pair_up_on_hover_and_focus(page: Page, reviews: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    assert page.ask(collection=reviews, mode="generative") == "done"
    token = page.all("#generated .tok[data-doc-index]")[0]
    index = token.get_attribute("data-doc-index")
    ActionChains(page.d).move_to_element(token).perform()
    doc = page.all(f'#documents > li[data-doc-index="{index}"]')[0]
    page.wait(lambda _: "paired" in doc.get_attribute("class").split())
    ActionChains(page.d).move_to_element(page.el("ask")).perform()
    page.wait(lambda _: "paired" not in doc.get_attribute("class").split())
    page.js("arguments[0].focus()", doc)  # as Tab would
    paired = page.all(f'#generated .tok.paired[data-doc-index="{index}"]')
    assert paired and len(paired) == len(page.all(f'#generated .tok[data-doc-index="{index}"]'))
    assert page.all("#generated .tok.paired:not([data-doc-index='" + str(index) + "'])") == []
    assert "leaned on it" in doc.text


def test_the_answer_arrives_while_it_is_decided(
    driver: Any, faults: tuple[FaultyBackend, str], reviews: str
) -> None:
    backend, url = faults
    backend.inject("query_events.next", *[0.25] * 12)  # a slow generator: a pause per event
    page = Page(driver, url).open()
    page.ask(collection=reviews, mode="generative", wait=False)
    seen: list[tuple[str, int, str]] = []

    def progress(_: Any) -> bool:
        count = len(page.all("#generated .tok"))
        busy = page.el("answer-live").get_attribute("aria-busy")
        seen.append((page.state(), count, busy))
        return page.state() in TERMINAL

    page.wait(progress)
    assert page.state() == "done"
    final = len(page.all("#generated .tok"))
    partial = [(n, busy) for state, n, busy in seen if state == "streaming" and 0 < n < final]
    assert partial, f"no partial answer was ever shown: {seen[-5:]}"
    assert all(busy == "true" for _, busy in partial)
    assert page.el("answer-live").get_attribute("aria-busy") == "false"


# --- documents -----------------------------------------------------------------------------------


def test_paste_and_upload_documents_then_find_them(
    page: Page, api_server: Any, tmp_path: Path
) -> None:
    page.type("api-key", api_server.write_key)
    lines = [
        {"id": "kettle", "text": "The kettle boils a litre of water in ninety seconds."},
        {"id": "toaster", "text": "The toaster browns bread evenly.", "item_id": "t1"},  # -> meta
    ]
    page.add(paste="\n".join(json.dumps(x) for x in lines), collection="pasted")
    assert page.el("add-status").text.startswith("Added 2 documents (2 passages)")
    assert "kettle" in page.el("add-status").text
    assert page.ask("How fast does the kettle boil water?", collection="pasted", top_k="1") == (
        "done"
    )
    assert [d["id"] for d in page.documents()] == ["kettle"]
    page.ask("What does the toaster do?", collection="pasted", filters="item_id=t1", top_k="5")
    assert [d["id"] for d in page.documents()] == ["toaster"]

    upload = tmp_path / "lamp.txt"
    upload.write_text("The desk lamp has three brightness levels and a USB port.\n")
    page.add(file=upload, collection="uploaded")
    status = page.el("add-status").text
    assert status.startswith("Added 1 document (1 passage) to collection uploaded"), status
    page.ask("How many brightness levels does the lamp have?", collection="uploaded")
    docs = page.documents()
    assert len(docs) == 1 and docs[0]["text"].startswith("The desk lamp has three")

    # the key stays for this tab (session storage), and is sent on reload
    page.open(keep_storage=True)
    assert page.el("api-key").get_attribute("value") == api_server.write_key
    assert page.js("return sessionStorage.length") == 1
    page.el("forget-key").click()
    assert page.js("return sessionStorage.length") == 0


# --- refused, failed, overloaded and dropped requests -------------------------------------------


def test_a_missing_or_wrong_key_is_explained(
    page: Page, api_server: Any, serve_app: Any, reviews: str
) -> None:
    doc = json.dumps({"id": "k1", "text": "Keyed."})
    page.type("api-key", "")
    page.add(paste=doc, collection="keys")
    error = page.error("add-error")
    assert error["status"] == "401"
    assert "Not authorised: an API key is required" in error["text"]
    assert "Enter an API key" in error["text"]

    page.type("api-key", "not-a-key-at-all")
    page.add(paste=doc, collection="keys")
    assert "unknown API key" in page.error("add-error")["text"]

    page.type("api-key", api_server.read_key)
    page.add(paste=doc, collection="keys")
    error = page.error("add-error")
    assert error["status"] == "403" and "read-write key" in error["text"]

    # reads need a key too: the page itself is public, its questions are not
    cfg = ServerConfig(api_keys=[ApiKey(key=api_server.read_key)])
    closed = Page(page.d, serve_app(build_app(api_server.backend, cfg))).open()
    assert closed.ask(collection=reviews) == "error"
    error = closed.error()
    assert error["status"] == "401" and "API key" in error["text"]
    closed.type("api-key", api_server.read_key)
    assert closed.ask(collection=reviews) == "done"
    assert not closed.el("error").is_displayed()


def test_a_rate_limited_key_is_told_when_to_retry(
    driver: Any, api_server: Any, serve_app: Any, reviews: str
) -> None:
    limit = RateLimit(requests_per_s=0.05, burst=1)  # one question, then 20 s to wait
    cfg = ServerConfig(api_keys=[ApiKey(key=api_server.read_key)], rate_limit=limit)
    page = Page(driver, serve_app(build_app(api_server.backend, cfg))).open(api_server.read_key)
    assert page.ask(collection=reviews) == "done"
    assert page.ask(collection=reviews) == "error"
    error = page.error()
    assert error["status"] == "429" and error["type"] == "rate_limited"
    assert "Too many requests for this key: rate limit exceeded" in error["text"]
    wait = re.search(r"Please retry in (\d+) seconds?\.", error["text"])
    assert wait and 1 <= int(wait[1]) <= 20, error["text"]


def test_invalid_input_names_its_field(page: Page, api_server: Any, reviews: str) -> None:
    assert page.ask(collection=reviews, top_k="0") == "error"
    error = page.error()
    assert error["status"] == "422"
    assert "top_k_retriever: Input should be greater than or equal to 1" in error["text"]
    assert "Field: top_k_retriever (the top-k box)" in error["text"]
    assert page.el("top-k").get_attribute("aria-invalid") == "true"

    assert page.ask(collection=reviews, filters="item_id") == "error"  # caught before sending
    assert "expected key=value" in page.error()["text"]
    assert page.js("return document.activeElement.id") == "filters"

    page.type("api-key", api_server.write_key)
    page.add(paste="A fine document.", collection="no spaces")
    error = page.error("add-error")
    assert error["status"] == "422" and "Field: collection" in error["text"]
    assert page.el("collection").get_attribute("aria-invalid") == "true"

    body = [{"text": "Fine."}, {"text": "   ", "note": "blank"}]
    page.add(paste="\n\n".join(json.dumps(x) for x in body), collection="fields")
    error = page.error("add-error")
    assert "documents.1.text: must not be empty" in error["text"]
    assert "line 3 of the input" in error["text"]


def test_overloaded_says_when_to_retry(
    driver: Any, faults: tuple[FaultyBackend, str], reviews: str
) -> None:
    backend, url = faults
    backend.inject("query_events", Overloaded("the reader's queue is full"))
    page = Page(driver, url).open()
    assert page.ask(collection=reviews) == "error"
    error = page.error()
    assert error["status"] == "503"
    assert "busy or starting: the reader's queue is full" in error["text"]
    assert "retry in 3 seconds" in error["text"]
    assert not page.el("answer-meta").is_displayed()  # no empty source and score
    assert page.ask(collection=reviews) == "done"  # and the next try works
    assert not page.el("error").is_displayed()


def test_an_error_mid_stream_is_shown_with_what_arrived(
    driver: Any, faults: tuple[FaultyBackend, str], reviews: str
) -> None:
    backend, url = faults
    backend.inject("query_events.next", None, RuntimeError("reader exploded"))
    page = Page(driver, url).open()
    assert page.ask(collection=reviews) == "error"
    error = page.error()
    assert "The server failed while answering: internal server error" in error["text"]
    assert "exploded" not in error["text"]
    assert len(page.documents()) == 3  # the documents came before the failure


class DroppingStreams:
    """ASGI: the app, except that a query's stream stops after its `documents` event, either
    ended early (a clean end without `done`) or cut (uvicorn drops the connection when the
    app raises after the response started)."""

    def __init__(self, app: Any, how: str) -> None:
        self.app, self.how = app, how

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/query":
            await self.app(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        documents = [{**d, "score": 1.0 - i / 10} for i, d in enumerate(REVIEWS)]
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        event = sse.encode("documents", json.dumps({"documents": documents}))
        await send({"type": "http.response.body", "body": event, "more_body": True})
        # A moment for the page to read the event: a browser discards what it had not read
        # when the connection fails.
        await asyncio.sleep(0.5)
        if self.how == "cut":
            raise ConnectionResetError("the stream is cut here (test)")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.parametrize("how", ["ended", "cut"])
def test_a_dropped_stream_is_reported(
    driver: Any, api_server: Any, serve_app: Any, reviews: str, how: str
) -> None:
    app = DroppingStreams(build_app(api_server.backend, ServerConfig(api_keys=[])), how)
    page = Page(driver, serve_app(app)).open()
    assert page.ask(collection=reviews) == "dropped"
    error = page.error()
    assert "The connection dropped before the answer was complete" in error["text"]
    assert error["type"] == "dropped"
    if how == "ended":
        assert "(the stream ended early)" in error["text"]
    else:  # the browser saw the connection fail
        assert "(the browser says: " in error["text"], error["text"]
    assert page.el("answer-status").text.startswith("Incomplete")
    assert len(page.documents()) == 3  # the event that arrived is kept


# --- escaping ----------------------------------------------------------------------------------


def test_documents_are_shown_as_text_never_run(
    page: Page, http: httpx.Client, writer: dict[str, str]
) -> None:
    attack = {
        "id": "<b>bold</b><img src=x onerror=window.__pwned=1>",
        "text": (
            '<script>window.__pwned = 2</script><img src=x onerror="window.__pwned = 3;'
            "alert('xss')\"> The battery lasts <i>forever</i> & more."
        ),
        "meta": {"item_id": "<svg onload=window.__pwned=4>"},
    }
    body = {"collection": "xss", "documents": [attack]}
    assert http.post("/v1/documents", json=body, headers=writer).status_code == 200
    assert page.ask(collection="xss", top_k="1") == "done"

    assert page.js("return window.__pwned === undefined")
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        page.d.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    [doc] = page.documents()
    assert doc["text"] == attack["text"]
    assert doc["shownId"] == attack["id"]
    assert not set(doc["elements"]) & {"script", "img", "b", "i", "svg"}
    meta = page.all("#documents .meta li")[0].text
    assert meta == "item_id <svg onload=window.__pwned=4>"
    answer = page.el("answer-text")
    assert answer.find_elements("css selector", "*") == []
    assert page.console_errors() == []  # nothing was even attempted (no CSP report)


# --- a phone -------------------------------------------------------------------------------------


def test_readable_on_a_phone(page: Page, reviews: str) -> None:
    page.d.set_window_size(390, 844)
    try:
        page.ask(collection=reviews)
        layout = page.js(
            """const box = (s) => document.querySelector(s).getBoundingClientRect();
               const [ask, results, add] = [box('.ask-card'), box('.results'), box('.add-card')];
               return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                       oneColumn: ask.left === results.left && results.left === add.left,
                       answerUnderQuestion: ask.bottom <= results.top && results.bottom <= add.top,
                       width: window.innerWidth, font: getComputedStyle(document.body).fontSize}"""
        )
        assert layout["width"] <= 400
        assert layout["overflow"] <= 0, layout  # nothing wider than the screen
        assert layout["oneColumn"] and layout["answerUnderQuestion"], layout
        assert layout["font"] == "16px"
    finally:
        page.d.set_window_size(1280, 900)
