// qaserve playground: the v1 HTTP API from a browser, with no build step and no dependencies.
//
// Everything the server sends (documents are user input) reaches the page as text nodes:
// the DOM is built with createElement/textContent/append, never innerHTML with data.
// Offsets from the server (answer start/end) count Unicode code points, as Python does, so
// texts are sliced as arrays of code points, not as JavaScript's UTF-16 strings.
"use strict";

(() => {
  const KEY_STORAGE = "qaserve.playground.apiKey";
  const COLOURS = 8; // CSS classes c0..c7
  const INGEST_BATCH = 64; // documents per POST /v1/documents
  const $ = (id) => document.getElementById(id);

  // --- DOM helpers ------------------------------------------------------------------------

  const ATTRS = new Set(["id", "title", "tabindex", "role", "hidden", "scope", "type"]);

  /** An element; strings among the children become text nodes (Node.append). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key.startsWith("aria-") || ATTRS.has(key)) {
        node.setAttribute(key, value === true ? "" : String(value));
      } else throw new Error(`el: unsupported property ${key}`);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const codePoints = (text) => Array.from(text);
  const fmt = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–");
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;

  // --- the API key and the collection ---------------------------------------------------------

  const storage = (() => {
    try {
      return window.sessionStorage;
    } catch {
      return null; // storage disabled: the key lives as long as the page
    }
  })();

  function apiKey() {
    return $("api-key").value.trim();
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function collection() {
    return $("collection").value.trim() || null;
  }

  // --- errors --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, type, message, field, retryAfter) {
      super(message);
      this.status = status;
      this.type = type;
      this.field = field || null;
      this.retryAfter = retryAfter;
    }
  }

  /** The error of a non-2xx response: `{"error": {"type", "message", "field"?}}` if it is one. */
  async function errorOf(response) {
    let detail = {};
    try {
      const body = await response.json();
      if (body && typeof body.error === "object" && body.error) detail = body.error;
    } catch {
      // not JSON (a proxy's page, say): the status says enough
    }
    const message =
      typeof detail.message === "string" && detail.message
        ? detail.message
        : response.statusText || `HTTP ${response.status}`;
    return new ApiError(
      response.status,
      detail.type || "http_error",
      message,
      typeof detail.field === "string" ? detail.field : null,
      response.headers.get("Retry-After"),
    );
  }

  /** [headline, advice] for an error, in words a person can act on. */
  function explain(err) {
    if (err.type === "network") {
      return ["Could not reach the server.", "Check that it is running, then try again."];
    }
    if (err.type === "dropped") {
      return [
        "The connection dropped before the answer was complete.",
        "What arrived is shown below; ask again for the whole answer.",
      ];
    }
    if (err.type === "stream_error") {
      return [`The server failed while answering: ${err.message}`, "Ask again in a moment."];
    }
    const s = err.status;
    if (s === 401) {
      return [`Not authorised: ${err.message}`, "Enter an API key under Connection."];
    }
    if (s === 403) {
      return [`Forbidden: ${err.message}`, "Adding documents needs a read-write key."];
    }
    if (s === 413) {
      return [`Too large: ${err.message}`, "Split the documents into smaller files."];
    }
    if (s === 503 || s === 429) {
      const wait = Number.parseInt(err.retryAfter || "", 10);
      const when = Number.isFinite(wait) && wait > 0 ? `in ${plural(wait, "second")}` : "shortly";
      const what = s === 429 ? "Too many requests for this key" : "The server is busy or starting";
      return [`${what}: ${err.message}`, `Please retry ${when}.`];
    }
    if (s === 504) {
      return [`Timed out: ${err.message}`, "Try again, perhaps with fewer documents (top-k)."];
    }
    if (s >= 500) return [`Server error (${s}): ${err.message}`, "Try again later."];
    if (s === 422 || s === 400) return [`The request was refused: ${err.message}`, null];
    return [`Error ${s || ""}: ${err.message}`.replace("  ", " "), null];
  }

  const LABELS = {
    question: "question",
    filters: "filters",
    "top-k": "top-k",
    collection: "collection",
    mode: "mode",
    retrieval: "retrieval",
    paste: "paste",
  };

  /** The input a server field names (`top_k_retriever`, `documents.3.text`...). */
  function inputFor(field) {
    if (!field) return null;
    const head = field.split(".")[0];
    const id = {
      question: "question",
      filters: "filters",
      top_k_retriever: "top-k",
      top_k_reader: "top-k",
      mode: "mode",
      retrieval: "retrieval",
      collection: "collection",
      documents: "paste",
    }[head];
    return id ? $(id) : null;
  }

  function clearInvalid() {
    for (const id of Object.keys(LABELS)) $(id).removeAttribute("aria-invalid");
  }

  /** Show `err` in the alert box `box`; mark the field's input invalid. */
  function showError(box, err, extra) {
    const [headline, advice] = explain(err);
    box.replaceChildren(el("p", { class: "headline" }, headline));
    const field = err.field;
    if (field) {
      const input = inputFor(field);
      const name = input ? ` (the ${LABELS[input.id]} box)` : "";
      box.append(el("p", { class: "field" }, "Field: ", el("code", {}, field), name));
      if (input) input.setAttribute("aria-invalid", "true");
    }
    if (extra) box.append(el("p", {}, extra));
    if (advice) box.append(el("p", {}, advice));
    if ((err.type === "dropped" || err.type === "network") && err.message) {
      box.append(el("p", { class: "detail" }, `(${err.message})`));
    }
    if (err.status === 401 || err.status === 403) {
      const go = el("button", { type: "button", class: "link" }, "Go to the API key");
      go.addEventListener("click", () => $("api-key").focus());
      box.append(el("p", {}, go));
    }
    box.dataset.status = String(err.status || "");
    box.dataset.type = err.type || "";
    box.hidden = false;
  }

  function hideError(box) {
    box.hidden = true;
    box.replaceChildren();
    delete box.dataset.status;
    delete box.dataset.type;
  }

  // --- server-sent events ------------------------------------------------------------------

  /** The event-stream format's `event:`/`data:` lines; feed text, get completed events. */
  function sseDecoder() {
    let pending = "";
    let name = "";
    let data = [];
    return (text) => {
      let hold = "";
      text = pending + text;
      if (text.endsWith("\r")) {
        text = text.slice(0, -1); // maybe half of a CRLF
        hold = "\r";
      }
      const lines = text.split(/\r\n|\r|\n/);
      pending = lines.pop() + hold;
      const events = [];
      for (const line of lines) {
        if (line === "") {
          if (data.length) events.push({ event: name || "message", data: data.join("\n") });
          name = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") name = value;
          else if (field === "data") data.push(value);
        }
      }
      return events;
    };
  }

  // --- rendering the results ------------------------------------------------------------

  let run = null; // the query on screen: {docs, mode, counts, controller, finished}

  function setState(state) {
    $("answer").dataset.state = state;
    const busy = state === "streaming";
    $("answer-live").setAttribute("aria-busy", String(busy));
    $("stop").disabled = !busy;
  }

  function status(text) {
    $("answer-status").textContent = text;
  }

  function resetResults() {
    hideError($("error"));
    clearInvalid();
    status("Retrieving documents…");
    for (const id of ["answer-text", "answer-meta", "generated-box", "spans-box", "timings-box"]) {
      $(id).hidden = true;
    }
    $("answer-text").replaceChildren();
    $("answer-text").className = "answer-text";
    $("generated").replaceChildren();
    $("spans").replaceChildren();
    $("timings").tBodies[0].replaceChildren();
    $("documents").replaceChildren();
    $("docs-count").textContent = "";
    $("docs-empty").hidden = false;
  }

  function docLabel(i) {
    const doc = run.docs[i];
    return `document ${i + 1} (${doc.id})`;
  }

  function renderDocuments(documents) {
    run.docs = documents.map((d) => ({ ...d, cps: codePoints(String(d.text)) }));
    run.counts = run.docs.map(() => 0);
    const list = $("documents");
    list.replaceChildren();
    $("docs-count").textContent = `(${run.docs.length})`;
    $("docs-empty").hidden = run.docs.length > 0;
    if (!run.docs.length) {
      $("docs-empty").textContent =
        "No documents were found: check the collection and the metadata filter.";
    }
    run.docs.forEach((doc, i) => {
      const meta = Object.entries(doc.meta || {}).map(([k, v]) =>
        el("li", {}, el("span", { class: "k" }, k), " ", typeof v === "string" ? v : JSON.stringify(v)),
      );
      const head = el(
        "p",
        { class: "doc-head" },
        el("span", { class: "swatch", "aria-hidden": "true" }),
        el("span", { class: "rank" }, `#${i + 1}`),
        " ",
        el("span", { class: "doc-id" }, String(doc.id)),
        " ",
        el("span", { class: "score" }, `score ${fmt(doc.score)}`),
        doc.passage ? el("span", { class: "passage" }, ` · passage ${doc.passage + 1}`) : null,
        el("span", { class: "lean", hidden: true }),
      );
      const item = el(
        "li",
        {
          class: `doc c${i % COLOURS}`,
          tabindex: "0",
          "data-doc-index": i,
          "data-doc-id": doc.id,
          "aria-label": `Document ${i + 1}: ${doc.id}`,
        },
        head,
        el("p", { class: "doc-text" }, doc.text),
        meta.length ? el("ul", { class: "meta", "aria-label": "metadata" }, ...meta) : null,
      );
      list.append(item);
    });
  }

  /** The retrieved passage an answer's offsets point into: the same id, and the answer's
   * text at those offsets (passages of one document share its id); -1 if none. */
  function locate(documentId, start, end, text) {
    if (documentId == null || !Number.isInteger(start) || !Number.isInteger(end)) return -1;
    return run.docs.findIndex(
      (doc) =>
        doc.id === documentId &&
        start >= 0 &&
        start < end &&
        end <= doc.cps.length &&
        doc.cps.slice(start, end).join("") === text,
    );
  }

  /** Mark the answer spans in their documents: best first, overlapping ones left out. */
  function markSpans(answers, final) {
    const spans = run.docs.map(() => []);
    const want = [];
    if (final && final.text && final.document_id != null && final.start != null) {
      want.push({ ...final, answer: final.text, final: true, rank: null });
    }
    answers.forEach((a, rank) => want.push({ ...a, final: false, rank }));
    for (const a of want) {
      const i = locate(a.document_id, a.start, a.end, a.answer);
      if (i < 0) continue;
      const same = spans[i].find((s) => s.start === a.start && s.end === a.end);
      if (same) {
        if (same.rank === null) same.rank = a.rank;
        continue;
      }
      if (spans[i].some((s) => s.start < a.end && a.start < s.end)) continue;
      spans[i].push({ start: a.start, end: a.end, score: a.score, final: a.final, rank: a.rank });
    }
    run.docs.forEach((doc, i) => {
      const target = $("documents").children[i].querySelector(".doc-text");
      const parts = [];
      let pos = 0;
      for (const s of spans[i].sort((a, b) => a.start - b.start)) {
        parts.push(doc.cps.slice(pos, s.start).join(""));
        const what = s.final ? "the answer" : `reader span ${s.rank + 1}`;
        const title = s.rank !== null && s.final ? `the answer (reader span ${s.rank + 1})` : what;
        parts.push(
          el(
            "mark",
            {
              class: s.final ? "final" : null,
              "data-start": s.start,
              "data-end": s.end,
              "data-rank": s.rank === null ? null : s.rank + 1,
              title: `${title}, score ${fmt(s.score)}`,
            },
            doc.cps.slice(s.start, s.end).join(""),
          ),
        );
        pos = s.end;
      }
      parts.push(doc.cps.slice(pos).join(""));
      target.replaceChildren(...parts);
    });
  }

  function renderSpans(answers) {
    const list = $("spans");
    list.replaceChildren();
    for (const a of answers) {
      const i = locate(a.document_id, a.start, a.end, a.answer);
      list.append(
        el(
          "li",
          {},
          el("q", {}, a.answer),
          " ",
          el("span", { class: "opt" }, `score ${fmt(a.score)}`),
          i >= 0 ? el("span", { class: `chip c${i % COLOURS}` }, `#${i + 1}`) : null,
        ),
      );
    }
    $("spans-box").hidden = answers.length === 0;
  }

  function tokenDocument(token) {
    const i = token.document_index;
    if (Number.isInteger(i) && i >= 0 && i < run.docs.length) return i;
    if (token.document_id != null) return run.docs.findIndex((d) => d.id === token.document_id);
    return -1;
  }

  function addToken(token) {
    const i = tokenDocument(token);
    const span = el(
      "span",
      {
        class: i >= 0 ? `tok c${i % COLOURS}` : "tok",
        "data-doc-index": i >= 0 ? i : null,
        title: i >= 0 ? `leaned on ${docLabel(i)}` : null,
      },
      String(token.text),
    );
    $("generated").append(span);
    $("generated-box").hidden = false;
    if (i >= 0) {
      run.counts[i] += 1;
      const lean = $("documents").children[i]?.querySelector(".lean");
      if (lean) {
        lean.hidden = false;
        lean.textContent = ` · ${plural(run.counts[i], "generated token")} leaned on it`;
      }
    }
  }

  const SOURCES = {
    reader: "the reader's span",
    generator: "the generated text",
    both: "the reader's span, and the generator agrees",
    none: "no answer",
  };

  function renderAnswer(response) {
    const answer = response.answer;
    const text = $("answer-text");
    if (answer.text) {
      text.textContent = answer.text;
      text.className = "answer-text";
    } else {
      text.textContent = response.documents.length
        ? "No answer: the documents do not seem to say."
        : "No answer: no documents were found.";
      text.className = "answer-text none";
    }
    text.hidden = false;
    const source = $("answer-source");
    source.textContent = answer.source;
    source.className = `badge ${answer.source}`;
    source.title = SOURCES[answer.source] || "";
    $("answer-score").textContent = fmt(answer.score);
    const where = $("answer-where");
    where.replaceChildren();
    const i = answer.text ? locate(answer.document_id, answer.start, answer.end, answer.text) : -1;
    if (i >= 0) {
      const show = el("button", { type: "button", class: "link" }, `in document #${i + 1}`);
      show.addEventListener("click", () => {
        const item = $("documents").children[i];
        item.scrollIntoView({ block: "nearest" });
        item.focus();
      });
      where.append(show);
    }
    $("answer-meta").hidden = false;
    renderSpans(response.answers || []);
    markSpans(response.answers || [], answer);
    renderTimings(response.timings_ms || {});
  }

  function renderTimings(timings) {
    const order = ["retriever", "reader", "generator", "ensemble", "total"];
    const names = Object.keys(timings).sort(
      (a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99),
    );
    const total = timings.total || Math.max(0, ...Object.values(timings)) || 1;
    const body = $("timings").tBodies[0];
    body.replaceChildren();
    for (const name of names) {
      const ms = timings[name];
      const bar = el("span", { class: "bar-fill" });
      bar.style.width = `${Math.min(100, Math.max(0, (100 * ms) / total)).toFixed(1)}%`;
      body.append(
        el(
          "tr",
          { "data-stage": name },
          el("th", { scope: "row" }, name),
          el("td", { class: "num" }, fmt(ms, 1)),
          el("td", { class: "bar", "aria-hidden": "true" }, bar),
        ),
      );
    }
    $("timings-box").hidden = names.length === 0;
  }

  // --- pairing tokens and documents on hover/focus ---------------------------------------------

  function pair(i, on) {
    if (!Number.isInteger(i) || i < 0) return;
    $("documents").children[i]?.classList.toggle("paired", on);
    for (const tok of $("generated").querySelectorAll(`.tok[data-doc-index="${i}"]`)) {
      tok.classList.toggle("paired", on);
    }
  }

  function indexOf(target, selector) {
    const node = target instanceof Element ? target.closest(selector) : null;
    return node ? Number(node.dataset.docIndex) : -1;
  }

  function wirePairing() {
    const tokens = $("generated");
    const docs = $("documents");
    tokens.addEventListener("mouseover", (e) => pair(indexOf(e.target, ".tok"), true));
    tokens.addEventListener("mouseout", (e) => pair(indexOf(e.target, ".tok"), false));
    docs.addEventListener("mouseover", (e) => pair(indexOf(e.target, ".doc"), true));
    docs.addEventListener("mouseout", (e) => pair(indexOf(e.target, ".doc"), false));
    docs.addEventListener("focusin", (e) => pair(indexOf(e.target, ".doc"), true));
    docs.addEventListener("focusout", (e) => pair(indexOf(e.target, ".doc"), false));
  }

  // --- asking ----------------------------------------------------------------------------------

  /** `key=value` (a string) or `key:=JSON` per line; a repeated key means any of its values. */
  function parseFilters(text) {
    const filters = {};
    const lines = text.split(/\r\n|\r|\n/).map((l) => l.trim());
    lines.forEach((line, n) => {
      if (!line) return;
      const eq = line.indexOf("=");
      if (eq < 0) {
        throw new ApiError(0, "client", `line ${n + 1}: expected key=value, got "${line}"`, "filters");
      }
      let key = line.slice(0, eq).trim();
      let value = line.slice(eq + 1).trim();
      if (key.endsWith(":")) {
        key = key.slice(0, -1).trim();
        try {
          value = JSON.parse(value);
        } catch {
          throw new ApiError(0, "client", `line ${n + 1}: ${value} is not a JSON value`, "filters");
        }
      }
      if (key in filters) {
        filters[key] = [].concat(filters[key], value);
      } else {
        filters[key] = value;
      }
    });
    return Object.keys(filters).length ? filters : null;
  }

  function queryBody() {
    const question = $("question").value.trim();
    if (!question) throw new ApiError(0, "client", "Enter a question.", "question");
    const topK = $("top-k").value.trim();
    if (!topK) throw new ApiError(0, "client", "Enter how many documents to retrieve.", "top_k_retriever");
    const body = {
      question,
      mode: $("mode").value,
      retrieval: $("retrieval").value,
      top_k_retriever: Number(topK),
      stream: true,
    };
    const filters = parseFilters($("filters").value);
    if (filters) body.filters = filters;
    const name = collection();
    if (name) body.collection = name;
    return body;
  }

  function handle(event, payload) {
    switch (event) {
      case "documents":
        renderDocuments(payload.documents || []);
        if (run.mode === "extractive") status("Reading the documents…");
        else if (run.mode === "generative") status("Generating…");
        else status("Reading and generating…");
        break;
      case "answers": {
        const spans = (payload.answers || []).filter((a) => a.answer);
        renderSpans(spans);
        markSpans(spans, null);
        if (run.mode !== "extractive") {
          status(spans.length ? `Reader's best span: “${spans[0].answer}”; generating…` : "Generating…");
        }
        break;
      }
      case "token":
        addToken(payload);
        status(`Generating… ${plural($("generated").childElementCount, "token")}`);
        break;
      case "answer":
        renderAnswer(payload);
        status("Answered.");
        run.answered = true;
        break;
      case "done":
        run.finished = true;
        status(`Answered in ${fmt((run.timings && run.timings.total) || 0, 0)} ms.`);
        break;
      case "error": {
        run.finished = true;
        const e = payload.error || {};
        throw new ApiError(0, "stream_error", e.message || "unknown error", e.field);
      }
      default:
        break; // events this page does not know: later versions of the API may add some
    }
  }

  async function ask(e) {
    e.preventDefault();
    if (run && run.controller) run.controller.abort(); // a new question replaces the last
    run = null;
    hideError($("error"));
    clearInvalid();
    let body;
    try {
      body = queryBody();
    } catch (err) {
      failed(err);
      return;
    }
    const controller = new AbortController();
    run = { docs: [], counts: [], mode: body.mode, controller, finished: false };
    const mine = run;
    resetResults();
    setState("streaming");
    try {
      const response = await fetch("/v1/query", {
        method: "POST",
        headers: { ...headers(true), Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      if (!response.body) throw new ApiError(0, "network", "this browser cannot read a stream");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const decode = sseDecoder();
      const consume = (text) => {
        for (const { event, data } of decode(text)) {
          if (run !== mine) return;
          let payload;
          try {
            payload = JSON.parse(data);
          } catch {
            throw new ApiError(0, "dropped", "garbled event");
          }
          if (event === "answer") mine.timings = payload.timings_ms;
          handle(event, payload);
        }
      };
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (controller.signal.aborted) throw err;
          throw new ApiError(0, "dropped", `the browser says: ${err && err.message}`);
        }
        if (chunk.done) break;
        consume(decoder.decode(chunk.value, { stream: true }));
      }
      consume(decoder.decode());
      // Only `done` is lost when a stream drops right after `answer`: the answer is whole.
      if (!mine.finished && !mine.answered) {
        throw new ApiError(0, "dropped", "the stream ended early");
      }
      if (run === mine) setState("done");
    } catch (err) {
      if (run !== mine) return; // a newer question replaced this one
      if (controller.signal.aborted) {
        status("Stopped; what arrived so far is shown.");
        setState("stopped");
        return;
      }
      failed(err instanceof ApiError ? err : new ApiError(0, "network", String(err)));
    }
  }

  function failed(err) {
    const box = $("error");
    showError(box, err);
    const state = err.type === "dropped" ? "dropped" : "error";
    setState(state);
    if (state === "dropped") status("Incomplete: the connection dropped.");
    else if (err.type === "stream_error") status("Failed while answering.");
    else if (err.type === "client") status("Not sent: see the message above.");
    else status("No answer: see the message above.");
    const input = inputFor(err.field);
    if (err.type === "client" && input) input.focus();
  }

  function stop() {
    if (run && run.controller) run.controller.abort();
  }

  // --- adding documents ---------------------------------------------------------------------------

  /** The API's {id?, text, meta?} from a JSON line: a numeric id becomes a string, and other
   * fields join the metadata (as in `qaserve ingest`), so exported rows load as they are. */
  function asDocument(row) {
    const { id, text, meta, ...rest } = row;
    const doc = { text };
    if (id !== undefined && id !== null) doc.id = typeof id === "number" ? String(id) : id;
    const given = meta === undefined || meta === null ? {} : meta;
    if (typeof given !== "object" || Array.isArray(given)) {
      doc.meta = given; // not an object: the server says what is wrong with it
    } else if (Object.keys(rest).length || Object.keys(given).length) {
      doc.meta = { ...rest, ...given };
    }
    return doc;
  }

  /** [documents, line numbers]: JSON lines (objects with a "text") or one plain-text document. */
  function parseDocuments(text, format, filename) {
    const lines = text.split(/\r\n|\r|\n/);
    const jsonl = () => {
      const docs = [];
      const numbers = [];
      lines.forEach((line, n) => {
        if (!line.trim()) return;
        let doc;
        try {
          doc = JSON.parse(line);
        } catch {
          throw new ApiError(0, "client", `line ${n + 1} is not valid JSON`, "documents");
        }
        if (!doc || typeof doc !== "object" || Array.isArray(doc) || typeof doc.text !== "string") {
          throw new ApiError(0, "client", `line ${n + 1}: expected an object with a "text" string`, "documents");
        }
        docs.push(asDocument(doc));
        numbers.push(n + 1);
      });
      return [docs, numbers];
    };
    const plain = () => [[{ text }], [1]];
    if (format === "jsonl") return jsonl();
    if (format === "text") return plain();
    if (/\.(jsonl|ndjson)$/i.test(filename || "")) return jsonl();
    const first = lines.find((l) => l.trim());
    if (first === undefined || !first.trim().startsWith("{")) return plain();
    try {
      JSON.parse(first);
    } catch {
      return plain(); // prose that happens to open with a brace
    }
    return jsonl();
  }

  async function add(e) {
    e.preventDefault();
    const box = $("add-error");
    const note = $("add-status");
    hideError(box);
    clearInvalid();
    note.textContent = "";
    const file = $("file").files[0] || null;
    let text;
    try {
      text = file ? await file.text() : $("paste").value;
    } catch (err) {
      showError(box, new ApiError(0, "client", `could not read the file: ${err}`, null));
      return;
    }
    if (!text.trim()) {
      showError(box, new ApiError(0, "client", "Paste some text or choose a file first.", "documents"));
      return;
    }
    let docs;
    let numbers;
    try {
      [docs, numbers] = parseDocuments(text, $("format").value, file && file.name);
    } catch (err) {
      showError(box, err);
      return;
    }
    const name = collection();
    const button = $("add");
    button.disabled = true;
    const ids = [];
    let passages = 0;
    let offset = 0;
    try {
      for (; offset < docs.length; offset += INGEST_BATCH) {
        const batch = docs.slice(offset, offset + INGEST_BATCH);
        if (docs.length > INGEST_BATCH) note.textContent = `Adding… ${offset} of ${docs.length}`;
        const body = { documents: batch };
        if (name) body.collection = name;
        let response;
        try {
          response = await fetch("/v1/documents", {
            method: "POST",
            headers: headers(true),
            body: JSON.stringify(body),
          });
        } catch (err) {
          throw new ApiError(0, "network", String(err));
        }
        if (!response.ok) throw await errorOf(response);
        const result = await response.json();
        ids.push(...result.ids);
        passages += result.passages;
      }
      const shown = ids.slice(0, 5).join(", ") + (ids.length > 5 ? `, and ${ids.length - 5} more` : "");
      note.textContent =
        `Added ${plural(ids.length, "document")} (${plural(passages, "passage")}) to ` +
        `${name ? `collection ${name}` : "the default collection"}: ${shown}.`;
      if (file) $("file").value = "";
      else $("paste").value = "";
    } catch (err) {
      let extra = null;
      const m = /^documents\.(\d+)/.exec(err.field || "");
      if (m && numbers[offset + Number(m[1])] !== undefined && docs.length > 1) {
        extra = `That is line ${numbers[offset + Number(m[1])]} of the input.`;
      }
      if (ids.length) extra = `${extra ? extra + " " : ""}${plural(ids.length, "document")} before it were added.`;
      showError(box, err, extra);
    } finally {
      button.disabled = false;
    }
  }

  // --- readiness ---------------------------------------------------------------------------------

  async function checkReady() {
    const line = $("ready");
    let again = true;
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      const body = await response.json().catch(() => ({}));
      if (response.ok && body.ready) {
        line.textContent = "Server ready";
        line.dataset.state = "ready";
        again = false;
      } else {
        const down = Object.entries(body.stages || {})
          .filter(([, up]) => !up)
          .map(([stage]) => stage);
        line.textContent = down.length ? `Starting: ${down.join(", ")} not ready yet` : "Starting…";
        line.dataset.state = "starting";
      }
    } catch {
      line.textContent = "Server unreachable";
      line.dataset.state = "down";
    }
    if (again) setTimeout(checkReady, 5000);
  }

  // --- wiring ------------------------------------------------------------------------------------

  function init() {
    const key = $("api-key");
    if (storage) key.value = storage.getItem(KEY_STORAGE) || "";
    key.addEventListener("input", () => {
      if (!storage) return;
      if (key.value) storage.setItem(KEY_STORAGE, key.value);
      else storage.removeItem(KEY_STORAGE);
    });
    $("forget-key").addEventListener("click", () => {
      key.value = "";
      if (storage) storage.removeItem(KEY_STORAGE);
      key.focus();
    });
    $("ask-form").addEventListener("submit", ask);
    $("stop").addEventListener("click", stop);
    $("add-form").addEventListener("submit", add);
    $("question").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    for (const id of Object.keys(LABELS)) {
      $(id).addEventListener("input", () => $(id).removeAttribute("aria-invalid"));
    }
    wirePairing();
    checkReady();
    document.documentElement.dataset.ready = "true";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
