"""Cancellation drill (issue 14, finding 5): how long the generator keeps a core busy after
`/v1/generate` answers 504 (or after its client disconnects), on the packaged models.

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/drill_cancel.py [--runs 3]
        [--timeout 10] [--documents 20] [--new-tokens 128] [--disconnect] [--before]

The app runs in this process (in-process transport, the real engine config) under uvicorn;
each run posts one generation over the longest reviews of the sample corpus and, from the
504 (or the client's disconnect) on, samples this process's CPU time every 0.25 s until it
has been idle for 3 s. "busy after" is the time from the 504 to the last quarter second in
which the process used more than 20 % of a core; "CPU after" the CPU seconds it used. The
client and the idle server use next to nothing, so both measure the generation left running.
`--before` disables the cancellation token (the behaviour before the fix: a timeout stopped
the wait, not the work). Medians at the end. Run it under the measure lock on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

QUESTION = "How long does the battery last?"
SAMPLE = Path(__file__).resolve().parents[1] / "serve" / "assets" / "sample" / "reviews.jsonl"
SAMPLE_S, BUSY_CPU_S, IDLE_S = 0.25, 0.05, 3.0


def documents(n: int) -> list[dict[str, Any]]:
    """The n longest sample reviews (the generator keeps max_doc_tokens of each)."""
    reviews = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    reviews.sort(key=lambda r: -len(r["text"]))
    return [{"id": r["id"], "text": r["text"], "score": 1.0} for r in reviews[:n]]


def start_server(timeout_s: float) -> tuple[str, Any]:
    import uvicorn

    from qaserve.config import EngineConfig, ServerConfig
    from qaserve.runtime.api import build_app
    from qaserve.runtime.local import local_pipeline

    data_dir = Path(tempfile.mkdtemp(prefix="drill-cancel-"))  # the store is not used
    backend = local_pipeline(
        EngineConfig.load().model_copy(update={"data_dir": data_dir}), workers=2, preload=False
    )
    backend.calls.stage("generator")  # loaded before the first request, not inside it
    app = build_app(backend, ServerConfig(api_keys=[], timeouts_s={"generate": timeout_s}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", backend


def busy_after(since: float) -> tuple[float, float]:
    """(seconds from `since` to the last busy sample, CPU seconds used since `since`)."""
    cpu0 = last_cpu = time.process_time()
    last_busy = since
    while time.monotonic() - last_busy < IDLE_S:
        time.sleep(SAMPLE_S)
        cpu = time.process_time()
        if cpu - last_cpu > BUSY_CPU_S:
            last_busy = time.monotonic()
        last_cpu = cpu
    return max(0.0, last_busy - since), last_cpu - cpu0


def run_once(url: str, body: dict[str, Any], timeout: float, disconnect: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        client_timeout = timeout if disconnect else None
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=client_timeout)
        status: int | str = response.status_code
    except httpx.ReadTimeout:
        status = "disconnected"
    ended = time.monotonic()
    busy, cpu = busy_after(ended)
    return {
        "status": status,
        "answered_s": round(ended - t0, 2),
        "busy_after_s": round(busy, 2),
        "cpu_after_s": round(cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (server or client)")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--disconnect", action="store_true", help="the client leaves instead")
    parser.add_argument("--before", action="store_true", help="no cancellation token")
    args = parser.parse_args()

    if args.before:
        from qaserve.cancel import CancelToken

        CancelToken.cancel = lambda self: None  # type: ignore[method-assign]
    server_timeout = 600.0 if args.disconnect else args.timeout
    url, backend = start_server(server_timeout)
    body = {
        "question": QUESTION,
        "documents": documents(args.documents),
        "max_new_tokens": args.new_tokens,
    }
    busy_after(time.monotonic())  # the start-up's own work first
    rows = []
    for i in range(args.runs):
        row = run_once(url, body, args.timeout, args.disconnect)
        print(json.dumps({"run": i + 1, **row}), flush=True)
        rows.append(row)
    summary = {
        "variant": "before" if args.before else "after",
        "ends_by": "disconnect" if args.disconnect else "504",
        "documents": args.documents,
        "new_tokens": args.new_tokens,
        "timeout_s": args.timeout,
        "median_busy_after_s": statistics.median(r["busy_after_s"] for r in rows),
        "median_cpu_after_s": statistics.median(r["cpu_after_s"] for r in rows),
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(summary), flush=True)
    backend.close()


if __name__ == "__main__":
    main()
