"""`qaserve bench ingest`: a domain's reviews ingested through the HTTP server, one server per
embedder runtime (default torch and onnx-int8), in one process on one machine.

Each runtime gets the real app (`build_app` over the in-process pipeline, under uvicorn on
127.0.0.1, Qdrant Edge in a temp dir); the SDK sends the reviews in requests of
`--batch-size` documents, as `qaserve ingest --url` does, and each request is timed from
send to stored (the answer comes after the commit). The runtimes take turns request by
request (A B, then B A), so load from the rest of the machine falls on both alike.

Inside each request the server's own stage calls are timed (a clock around the real methods
of its objects): splitting into passages, the encoder, the store write with its BM25 vectors.
So the report says how much of an ingest is the encoder alone, on exactly the texts the
server embedded, and where the rest goes (`other_s`: HTTP, JSON, validation, the hops to the
stage pool). At the end every document is fetched back through the API and compared.

    flock /tmp/qaserve-measure.lock qaserve bench ingest --data SubjQA/electronics
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qaserve.offline.command import Command

if TYPE_CHECKING:
    from qaserve.runtime.local import LocalStages

RUNTIMES = ("torch", "onnx-fp32", "onnx-int8")
DEFAULT_RUNTIMES = ("torch", "onnx-int8")
BASELINE = "torch"
TARGET_RATIO = 2.0  # issue 13: ingest through the server at least 2x torch's
PARTS = ("split_s", "embed_s", "write_s")


@dataclass
class _Served:
    """One runtime's server: its URL, write key and the stage objects behind it."""

    runtime: str
    url: str
    key: str
    stages: LocalStages
    load_s: float
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("ingest_s", *PARTS), 0.0)
    )
    requests: list[float] = field(default_factory=list)
    passages: int = 0


@contextmanager
def _serve(
    runtime: str, root: Path, cache_dir: Path | None, threads: int | None, config: Path | None
) -> Iterator[_Served]:
    """The app `qaserve` serves in-process, with this runtime's embedder, on a free port."""
    import uvicorn

    from qaserve.config import ApiKey, EngineConfig, ServerConfig
    from qaserve.pipeline import Pipeline
    from qaserve.runtime.api import build_app
    from qaserve.runtime.local import LocalStages

    overrides = {"data_dir": root / runtime / "data", "embedder.runtime": runtime}
    cfg = EngineConfig.load(config, **overrides, cache_dir=cache_dir, threads=threads)
    # Qdrant Edge under the temp data_dir, never a store the config names.
    cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"url": None})})
    stages = LocalStages(cfg, preload=False)  # what local_pipeline serves, held typed here
    backend = Pipeline(stages, stages.cfg.ensemble)
    try:
        t0 = time.perf_counter()
        retriever = stages.stage("retriever")  # and its embedder: loaded before the clock
        load_s = time.perf_counter() - t0
        if retriever.embedder is not stages.stage("embedder"):  # what writes embed with
            raise RuntimeError("the retriever does not embed with the configured embedder")
        key = secrets.token_hex(16)
        # Ingest bounded by the client's patience, not the 60 s default: a slow request on
        # a loaded machine is a figure, not a failure.
        server_cfg = ServerConfig(
            api_keys=[ApiKey(key=key, write=True)], timeouts_s={"ingest": 3600}
        )
        app = build_app(backend, server_cfg)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, name=f"uvicorn-{runtime}", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the {runtime} server did not start")
                time.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
            yield _Served(runtime, f"http://127.0.0.1:{port}", key, stages, load_s)
        finally:
            server.should_exit = True
            thread.join(30)
    finally:
        backend.close()


def _ingest_request(served: _Served, client: Any, docs: list[Any]) -> None:
    t0 = time.perf_counter()
    result = client.ingest(docs)
    elapsed = time.perf_counter() - t0
    if len(result.ids) != len(docs):
        raise RuntimeError(f"{served.runtime}: {len(result.ids)} of {len(docs)} documents stored")
    served.timings["ingest_s"] += elapsed
    served.requests.append(elapsed)
    served.passages += result.passages


def _instrument(served: _Served) -> None:
    """Time the server's own stage calls inside its requests: splitting into passages, the
    encoder, the store write (with its BM25 vectors). The real methods run; only a clock is
    added around them, on these instances."""
    retriever = served.stages.retriever
    for obj, method, part in (
        (retriever, "prepare", "split_s"),
        (retriever.embedder, "embed", "embed_s"),
        (retriever, "write", "write_s"),
    ):
        setattr(obj, method, _timed(getattr(obj, method), served.timings, part))


def _timed(fn: Callable[..., Any], timings: dict[str, float], part: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[part] += time.perf_counter() - t0

    return timed


def _stored(client: Any, docs: list[Any]) -> int:
    """Documents the API gives back with their text: every one, or the ingest lost some."""
    from qaserve_client.errors import NotFound

    found = 0
    for d in docs:
        with suppress(NotFound):
            found += client.get_document(str(d.id)).text == d.text
    return found


def _row(served: _Served, documents: int, stored: int) -> dict[str, Any]:
    t = served.timings
    ingest = t["ingest_s"]
    rest = ingest - sum(t[p] for p in PARTS)
    info = served.stages.stage("embedder").info()
    return {
        "format": info.format,
        "threads": served.stages.threads,
        "load_s": round(served.load_s, 1),
        "documents": documents,
        "stored": stored,
        "passages": served.passages,
        "requests": len(served.requests),
        "ingest_s": round(ingest, 2),
        "reviews_per_s": round(documents / ingest, 2),
        "passages_per_s": round(served.passages / ingest, 2),
        "request_s_max": round(max(served.requests), 2),
        **{name: round(t[name], 2) for name in PARTS},
        "encoder_share": round(t["embed_s"] / ingest, 3),
        "encoder_passages_per_s": round(served.passages / t["embed_s"], 2),
        # the requests' time outside the three stage calls: HTTP, JSON, validation, pool hops
        "other_s": round(rest, 2),
    }


def corpus(data: Path) -> list[Any]:
    """Every unique review of the domain (all its splits: the book protocol's corpus), or of
    one CSV."""
    from qaserve.offline.protocol import load_domain
    from qaserve.subjqa import SPLITS

    split = None
    if data.is_dir():
        folders = (data, data / "splits")
        split = next((s for s in SPLITS for f in folders if (f / f"{s}.csv").is_file()), None)
        if split is None:
            raise FileNotFoundError(f"no SubjQA split ({', '.join(SPLITS)}) CSV in {data}")
    return list(load_domain(data, split).reviews)


def bench_ingest(
    docs: list[Any],
    data: Path,
    runtimes: list[str],
    batch_size: int,
    threads: int | None = None,
    cache_dir: Path | None = None,
    config: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """`docs` (read from `data`) through one server per runtime, the runtimes taking turns."""
    from contextlib import ExitStack

    from qaserve.offline.bench import machine_info
    from qaserve_client.client import Client

    blocks = [docs[i : i + batch_size] for i in range(0, len(docs), batch_size)]
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-")))
        served = [
            stack.enter_context(_serve(r, root, cache_dir, threads, config)) for r in runtimes
        ]
        clients = {
            s.runtime: stack.enter_context(Client(s.url, api_key=s.key, timeout=3600.0))
            for s in served
        }
        for s in served:  # untimed: the first encoder call, the connection
            s.stages.stage("embedder").embed([d.text for d in docs[:4]])
            clients[s.runtime].health()
            fmt = s.stages.stage("embedder").info().format
            log(f"{s.runtime}: {fmt}, loaded in {s.load_s:.1f} s")
            _instrument(s)
        for i, block in enumerate(blocks):
            order = served if i % 2 == 0 else served[::-1]
            for s in order:
                _ingest_request(s, clients[s.runtime], block)
            done = sum(len(b) for b in blocks[: i + 1])
            log(
                f"{done}/{len(docs)} "
                + " ".join(f"{s.runtime} {s.timings['ingest_s']:.1f}s" for s in served)
            )
        rows = {s.runtime: _row(s, len(docs), _stored(clients[s.runtime], docs)) for s in served}
    report: dict[str, Any] = {
        "machine": machine_info(next(iter(rows.values()))["threads"] if rows else 0),
        "data": str(data),
        "documents": len(docs),
        "batch_size": batch_size,
        "runtimes": rows,
    }
    base = rows.get(BASELINE)
    if base:
        for row in rows.values():
            row["speedup"] = round(row["reviews_per_s"] / base["reviews_per_s"], 2)
            row["encoder_speedup"] = round(base["embed_s"] / row["embed_s"], 2)
        report["targets"] = [
            {
                "target": f"{name} ingest through the server >= {TARGET_RATIO}x {BASELINE}'s",
                "value": row["speedup"],
                "pass": row["speedup"] >= TARGET_RATIO,
            }
            for name, row in rows.items()
            if name != BASELINE
        ]
    return report


def format_table(report: dict[str, Any]) -> str:
    cols = ["reviews_per_s", "speedup", "ingest_s", "stored", "embed_s", "encoder_share",
            "encoder_speedup", "split_s", "write_s", "other_s"]  # fmt: skip
    lines = [f"{'runtime':<10} " + " ".join(f"{c:>15}" for c in cols)]
    for name, row in report["runtimes"].items():
        lines.append(f"{name:<10} " + " ".join(f"{row.get(c, '')!s:>15}" for c in cols))
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown or not runtimes or len(set(runtimes)) != len(runtimes):
        print(
            f"--runtimes {args.runtimes!r}: expected distinct names of {RUNTIMES}", file=sys.stderr
        )
        return 2
    for name in ("batch_size", "limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"--{name.replace('_', '-')} must be at least 1 (got {value})", file=sys.stderr)
            return 2
    try:  # no such data, nothing SubjQA in it
        docs = corpus(args.data)[: args.limit]
    except (FileNotFoundError, ValueError) as exc:
        print(f"bench ingest: {exc}", file=sys.stderr)
        return 2
    if not docs:
        print(f"bench ingest: no reviews in {args.data}", file=sys.stderr)
        return 2
    report = bench_ingest(
        docs,
        args.data,
        runtimes,
        args.batch_size,
        args.threads,
        args.cache_dir,
        args.config,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(format_table(report))
    failed = False
    for name, row in report["runtimes"].items():
        if row["stored"] != row["documents"]:
            failed = True
            print(f"FAIL  {name}: {row['stored']} of {row['documents']} documents stored")
    for t in report.get("targets", []):
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']} (got {t['value']})")
        failed |= args.check and not t["pass"]
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "ingest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if failed else 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="SubjQA domain folder or a CSV")
    p.add_argument(
        "--runtimes",
        default=",".join(DEFAULT_RUNTIMES),
        help="comma-separated, of " + ", ".join(RUNTIMES),
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="documents per request (as qaserve ingest --url)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the engine's threads (default: the server's, QASERVE_THREADS or every core)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N reviews only")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="engine YAML (default: QASERVE_CONFIG or the defaults)",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="ONNX export cache (default: the engine's)"
    )
    p.add_argument("--output", type=Path, default=Path("runs/bench"), help="folder for ingest.json")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a runtime is under {TARGET_RATIO}x {BASELINE}",
    )


COMMAND = Command(
    name="ingest",
    help="a domain's reviews ingested through the HTTP server, per embedder runtime",
    add_args=_add_args,
    run=_cmd,
    module="qaserve.offline.bench_ingest",
    doc=__doc__,
    doc_in_cli=True,
)
register = COMMAND.register
main = COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
