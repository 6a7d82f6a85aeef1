"""Write drills against a running server, with figures: concurrent writers, kill -9 under
writers, and a mixed read/write soak with the server's memory sampled.

    qaserve drill writers [--url URL]     8 writers x 20-document batches: latency, every id back
    qaserve drill kill9                   writers, kill -9 the server's process group, restart,
                                          every acknowledged id present once; restart vs clean
    qaserve drill soak --duration 600     queries and writes mixed; RSS per server process

Without `--url` each drill starts `qaserve serve` itself (its own process group, a free
loopback port, a temporary data dir) and stops it after. Documents are SubjQA-like reviews:
the shipped sample corpus, or `--data` (any file `qaserve ingest` reads), cycled under new ids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from qaserve.offline.command import Command

SERVE_TIMEOUT_S = 600.0


# --- documents ------------------------------------------------------------------------------


def review_texts(data: str | Path | None = None) -> list[str]:
    """Review texts to write: `data` (a file `qaserve ingest` reads) or the shipped sample."""
    from qaserve.loaders import load_documents, sample_documents

    docs = load_documents(Path(data)) if data else sample_documents()
    texts = [d.text for d in docs if d.text.strip()]
    if not texts:
        raise ValueError(f"no review texts in {data or 'the sample corpus'}")
    return texts


def batch_docs(texts: list[str], prefix: str, start: int, size: int) -> list[dict[str, Any]]:
    """`size` documents with ids `{prefix}-{n}` (n from `start`), texts cycled."""
    return [
        {
            "id": f"{prefix}-{n}",
            "text": texts[n % len(texts)],
            "meta": {"drill": prefix.split("-")[0]},
        }
        for n in range(start, start + size)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_figures(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 2) if values else float("nan"),
        "p95_s": round(percentile(values, 0.95), 2),
        "max_s": round(max(values), 2) if values else float("nan"),
    }


# --- a server of our own --------------------------------------------------------------------


@dataclass
class Served:
    """`qaserve serve` in its own process group (kill -9 takes Ray down with it)."""

    data_dir: Path
    config: str | None = None
    sample: bool = False
    port: int = 0
    log: Path | None = None
    server: Any = None
    ready_s: float = 0.0

    def start(self, timeout_s: float = SERVE_TIMEOUT_S) -> Served:
        from qaserve.loadtests.run import ServerProcess
        from qaserve.runtime.server import free_port

        self.port = self.port or free_port()
        self.log = self.log or self.data_dir / f"serve-{int(time.time())}.log"
        cmd = [sys.executable, "-m", "qaserve.cli", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir)]
        if self.config:
            cmd += ["--config", self.config]
        if not self.sample:
            cmd.append("--no-sample")
        t0 = time.monotonic()
        self.server = ServerProcess.start(cmd, self.port, self.log, timeout_s)
        self.ready_s = round(time.monotonic() - t0, 1)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.server.proc.pid)

    def kill9(self) -> None:
        """SIGKILL the server and every process under it at once (Ray's GCS, raylet and
        workers leave its process group; Serve's detached actors would outlive the driver
        alone and go on answering), as a crash of the machine's server would."""
        procs = server_processes(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
        self.server.proc.wait(30)
        self.server._log.close()
        _kill_leftovers(self.pid)

    def stop(self) -> None:
        if self.server is not None and self.server.proc.poll() is None:
            self.server.stop()
        if self.server is not None:
            _kill_leftovers(self.pid)


def _kill_leftovers(pgid: int) -> None:
    """Ray processes that left the server's session (raylet children) but still hold ports."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                os.kill(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def server_for(
    url: str | None, data_dir: Path | None, config: str | None, sample: bool = False
) -> Iterator[tuple[str, Served | None]]:
    """The server at `url`, or one started here (stopped after)."""
    if url:
        yield url.rstrip("/"), None
        return
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qadrill-")))
        served = Served(data_dir, config, sample).start()
        stack.callback(served.stop)
        print(f"drill: started qaserve serve on {served.url} in {served.ready_s} s", flush=True)
        yield served.url, served


def _headers(key: str | None) -> dict[str, str]:
    key = key or os.environ.get("QASERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- writers --------------------------------------------------------------------------------


@dataclass
class Writers:
    """`n` threads posting `size`-document batches until `batches` each, or until stopped.
    A batch counts as acknowledged only on a 200; every outcome is kept with its latency."""

    url: str
    texts: list[str]
    n: int = 8
    size: int = 20
    batches: int | None = 5
    run: str = "w"
    key: str | None = None
    timeout_s: float = SERVE_TIMEOUT_S
    acked: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._writer, args=(w,), daemon=True) for w in range(self.n)
        ]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout_s)

    def _writer(self, w: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            b = 0
            while not self._stop.is_set() and (self.batches is None or b < self.batches):
                docs = batch_docs(self.texts, f"{self.run}-{w}", b * self.size, self.size)
                with self._lock:
                    self.sent.extend(d["id"] for d in docs)
                t0 = time.monotonic()
                try:
                    r = http.post(
                        "/v1/documents", json={"documents": docs}, headers=_headers(self.key)
                    )
                    outcome = str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                elapsed = time.monotonic() - t0
                with self._lock:
                    if outcome == "200":
                        self.acked.extend(d["id"] for d in docs)
                        self.latencies.append(elapsed)
                    else:
                        self.errors[outcome] = self.errors.get(outcome, 0) + 1
                if outcome != "200" and outcome != "503":
                    return  # a broken server: this writer stops
                b += 1


def present(url: str, ids: list[str], key: str | None = None, workers: int = 8) -> set[str]:
    """The ids among `ids` that GET /v1/documents/{id} finds."""
    from concurrent.futures import ThreadPoolExecutor

    found: set[str] = set()
    lock = threading.Lock()

    def one(http: httpx.Client, doc_id: str) -> None:
        for attempt in range(5):  # a connection dropped is no answer: ask again
            try:
                r = http.get(f"/v1/documents/{doc_id}", headers=_headers(key))
                break
            except httpx.TransportError:
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
        if r.status_code == 200:
            with lock:
                found.add(doc_id)

    with (
        httpx.Client(base_url=url, timeout=120) as http,
        ThreadPoolExecutor(workers) as pool,
    ):
        list(pool.map(lambda i: one(http, i), ids))
    return found


def drill_writers(
    url: str, texts: list[str], n: int = 8, size: int = 20, batches: int = 5, key: str | None = None
) -> dict[str, Any]:
    run = f"w{int(time.time())}"
    t0 = time.monotonic()
    writers = Writers(url, texts, n=n, size=size, batches=batches, run=run, key=key).start()
    writers.join()
    wall = time.monotonic() - t0
    back = present(url, writers.acked, key)
    return {
        "drill": "writers",
        "writers": n,
        "batch_docs": size,
        "batches": n * batches,
        "latency": latency_figures(writers.latencies),
        "docs_per_s": round(len(writers.acked) / wall, 1) if wall else None,
        "wall_s": round(wall, 1),
        "errors": writers.errors,
        "acked": len(writers.acked),
        "acked_present": len(back),
    }


# --- kill -9 --------------------------------------------------------------------------------


def store_counts(data_dir: Path, ids: list[str], collection: str | None = None) -> dict[str, int]:
    """Open the store the server left (it must be stopped): documents in it, and for each of
    `ids` how many passage-0 points carry it (1 when stored exactly once)."""
    from qaserve.config import EngineConfig
    from qaserve.deployments.store import make_store

    cfg = EngineConfig.load(data_dir=data_dir)
    # The store's own filter primitives (both backends have them), for a count per id.
    store: Any = make_store(cfg, collection or cfg.store.collection, 384)
    try:
        per_id: dict[str, int] = {}
        m = store._m  # the backend's models: the same filter the store's count uses
        for doc_id in ids:
            flt = m.Filter(must=[store._match("doc_id", doc_id), store._match("passage", 0)])
            per_id[doc_id] = store._count(flt) if store._open(create=False) else 0
        return {"documents": store.count(), **{f"id:{k}": v for k, v in per_id.items()}}
    finally:
        store.close()


def drill_kill9(
    texts: list[str],
    data_dir: Path,
    config: str | None = None,
    n: int = 4,
    size: int = 20,
    write_s: float = 20.0,
    sample: bool = False,
) -> dict[str, Any]:
    """Clean start; writers for `write_s`; kill -9; restart; every acknowledged id present.
    Then a clean stop and the store opened here: each written id exactly once."""
    served = Served(data_dir, config, sample).start()
    clean_s = served.ready_s
    run = f"k{int(time.time())}"
    writers = Writers(served.url, texts, n=n, size=size, batches=None, run=run).start()
    try:
        deadline = time.monotonic() + write_s
        while time.monotonic() < deadline and not writers.errors:
            time.sleep(0.5)
        acked_before_kill = len(writers.acked)
        served.kill9()
        writers.stop()
        writers.join(60)
    except BaseException:
        served.stop()
        raise
    acked = list(writers.acked)
    restarted = Served(data_dir, config, sample, port=served.port).start()
    try:
        back = present(restarted.url, acked)
        maybe = [i for i in writers.sent if i not in set(acked)]  # in flight at the kill
        landed = present(restarted.url, maybe)
    finally:
        restarted.stop()
    counts = store_counts(data_dir, acked + sorted(landed))
    once = sum(1 for k, v in counts.items() if k.startswith("id:") and v == 1)
    return {
        "drill": "kill9",
        "writers": n,
        "batch_docs": size,
        "acked": len(acked),
        "acked_at_kill": acked_before_kill,
        "acked_present": len(back),
        "in_flight_landed": len(landed),
        "in_flight": len(maybe),
        "store_documents": counts["documents"],
        "ids_exactly_once": once,
        "ids_checked": len(acked) + len(landed),
        "clean_start_ready_s": clean_s,
        "restart_ready_s": restarted.ready_s,
        "ok": len(back) == len(acked)
        and once == len(acked) + len(landed)
        and counts["documents"] == len(acked) + len(landed) + (_sample_size() if sample else 0),
    }


def _sample_size() -> int:
    from qaserve.loaders import sample_documents

    return len(sample_documents())


# --- soak -----------------------------------------------------------------------------------


def server_processes(pid: int) -> list[Any]:
    """The server and every process it started (Ray's raylet, GCS, workers, replicas)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    return procs


def _label(proc: Any) -> str:
    with contextlib.suppress(Exception):
        title = " ".join(proc.cmdline())[:80]
        if "ServeReplica" in title or "ray::" in title:
            return title.split()[0] + f"[{proc.pid}]"
        return f"{proc.name()}[{proc.pid}]"
    return f"?[{proc.pid}]"


def sample_rss(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for proc in server_processes(pid):
        with contextlib.suppress(Exception):
            out[_label(proc)] = proc.memory_info().rss / 2**20
    return out


def drill_soak(
    url: str,
    texts: list[str],
    pid: int | None,
    duration_s: float = 60.0,
    readers: int = 4,
    writers: int = 2,
    size: int = 5,
    every_s: float = 5.0,
    warmup_s: float = 10.0,
    bound_mb: float = 150.0,
    key: str | None = None,
    collection: str | None = None,
) -> dict[str, Any]:
    """Queries from `readers` threads and small batches from `writers` (each written batch
    later deleted in part) for `duration_s`; the server's processes' RSS sampled every
    `every_s`. Growth is measured from the first sample after `warmup_s` to the last."""
    stop = threading.Event()
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def count(kind: str) -> None:
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1

    def reader(r: int) -> None:
        questions = ["How is the sound?", "Is the battery good?", "Does it fit well?"]
        with httpx.Client(base_url=url, timeout=120, headers=_headers(key)) as http:
            i = 0
            while not stop.is_set():
                q = {"question": questions[(i + r) % 3], "mode": "extractive"}
                if collection:
                    q["collection"] = collection
                try:
                    count(f"query {http.post('/v1/query', json=q).status_code}")
                except httpx.HTTPError as exc:
                    count(f"query {type(exc).__name__}")
                i += 1

    def writer(w: int) -> None:
        with httpx.Client(base_url=url, timeout=300, headers=_headers(key)) as http:
            b = 0
            while not stop.is_set():
                docs = batch_docs(texts, f"s{w}", (b % 50) * size, size)
                try:
                    body = {"documents": docs, "collection": collection}
                    code = http.post("/v1/documents", json=_body(body)).status_code
                    count(f"ingest {code}")
                    if code == 200 and b % 2:
                        where = _body({"collection": collection})
                        deleted = http.delete("/v1/documents/" + docs[0]["id"], params=where)
                        count(f"delete {deleted.status_code}")
                except httpx.HTTPError as exc:
                    count(f"write {type(exc).__name__}")
                b += 1

    threads = [threading.Thread(target=reader, args=(r,), daemon=True) for r in range(readers)]
    threads += [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    samples: list[tuple[float, dict[str, float]]] = []
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < duration_s:
            if pid is not None:
                samples.append((time.monotonic() - t0, sample_rss(pid)))
            time.sleep(every_s)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    base = next((s for t, s in samples if t >= warmup_s), samples[0][1] if samples else {})
    last = samples[-1][1] if samples else {}
    growth = {k: round(last[k] - base[k], 1) for k in last if k in base}
    peak = {k: round(max(s.get(k, 0.0) for _, s in samples), 1) for k in last}
    worst = max(growth.values(), default=0.0)
    return {
        "drill": "soak",
        "duration_s": round(time.monotonic() - t0, 1),
        "requests": outcomes,
        "rss_mb_last": {k: round(v, 1) for k, v in last.items()},
        "rss_mb_peak": peak,
        "rss_growth_mb": growth,
        "worst_growth_mb": worst,
        "bound_mb": bound_mb,
        "ok": worst <= bound_mb
        and all(k.split()[1] in ("200", "204") for k in outcomes if len(k.split()) == 2),
    }


# --- the command ----------------------------------------------------------------------------


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["writers", "kill9", "soak"])
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--config", default=None, help="graph YAML for the server started here")
    p.add_argument("--data-dir", type=Path, default=None, help="its data dir (default: temp)")
    p.add_argument("--data", default=None, help="reviews to write (default: the sample corpus)")
    p.add_argument("--writers", type=int, default=None)
    p.add_argument("--batch", type=int, default=20, help="documents per batch")
    p.add_argument("--batches", type=int, default=5, help="batches per writer (writers)")
    p.add_argument("--write-s", type=float, default=20.0, help="writing before the kill (kill9)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (soak)")
    p.add_argument("--bound-mb", type=float, default=150.0, help="RSS growth allowed (soak)")
    p.add_argument("--api-key", default=None)


def _cmd_drill(args: Any) -> int:
    texts = review_texts(args.data)
    if args.which == "kill9":
        with contextlib.ExitStack() as stack:
            data_dir = args.data_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="qadrill-"))
            )
            result = drill_kill9(
                texts, data_dir, args.config, args.writers or 4, args.batch, args.write_s
            )
    else:
        with server_for(args.url, args.data_dir, args.config) as (url, served):
            if args.which == "writers":
                result = drill_writers(
                    url, texts, args.writers or 8, args.batch, args.batches, args.api_key
                )
            else:
                pid = served.pid if served else None
                result = drill_soak(
                    url,
                    texts,
                    pid,
                    args.duration,
                    writers=args.writers or 2,
                    bound_mb=args.bound_mb,
                    key=args.api_key,
                )
    print(json.dumps(result, indent=1))
    return 0 if result.get("ok", True) else 1


COMMAND = Command(
    "drill",
    "write drills: writers, kill -9, soak (figures printed)",
    _add_args,
    _cmd_drill,
    module="qaserve.offline.drills",
    doc=__doc__,
)
register = COMMAND.register


def main(argv: list[str] | None = None) -> int:
    """`qaserve drill ...` without the rest of the CLI (the command's name stays in argv)."""
    parser = argparse.ArgumentParser(prog="qaserve")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
