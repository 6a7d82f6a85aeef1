"""Restart drill: how long `qaserve serve` takes to be ready again after a kill -9, against a
clean start on the same data dir, and what the killed instance leaves behind.

    .venv/bin/python scripts/drill_restart.py [--runs 3] [--kill group driver]

First a start on an empty data dir (the sample corpus is ingested: the documents must be there
at the first /readyz 200). Then, per run and per kill variant: a clean start (the previous
instance stopped with SIGTERM) is timed, the server is killed with SIGKILL (`group`: its whole
process group, as an OOM kill of a supervisor's unit or `kill -9 -PGID`; `driver`: only the
`qaserve serve` process), and restarted at once on the same port and data dir, as a
supervisor would; then stopped with SIGTERM. For each start: seconds to /readyz 200, seconds
to the first answered query, documents the query found, and for a restart the processes of
the killed instance still alive when it began and how long they lived. Medians at the end.
Run it under `flock /tmp/qaserve-measure.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

QUESTION = "How is the sound quality?"
TIMEOUT_S = 600.0


def session_pids(sid: int) -> list[int]:
    """Processes of the session `sid` (the server runs with setsid: Ray's workers keep the
    session though each sits in its own process group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def _session(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[3])


def listener_sessions(port: int) -> set[int]:
    """Sessions of the processes listening on `port` (who answers there)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{f[9]}]")
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                for fd in (proc / "fd").iterdir():
                    if os.readlink(fd) in inodes:
                        found.add(_session(int(proc.name)))
                        break
    return found


def names(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-40:])
    return out


class Server:
    """`qaserve serve` in a new session; times its start from the outside."""

    def __init__(self, data_dir: Path, port: int, log: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "qaserve.cli", "serve", "--port", str(port)]
        cmd += ["--data-dir", str(data_dir), "--num-cpus", "2", *extra]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in wait_gone()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")

    def measure(self, old_sid: int | None = None) -> dict[str, Any]:
        """Seconds to /readyz 200, then to the first answered query, and what it found.
        A 200 while a process of the killed instance `old_sid` listens on the port (its
        orphaned proxy) may be that process's: counted, not taken as ready."""
        deadline = self.t0 + TIMEOUT_S
        port = int(self.url.rsplit(":", 1)[1])
        stale, errors = 0, 0
        while True:
            self._check()
            with contextlib.suppress(httpx.HTTPError):
                before = listener_sessions(port) if old_sid else set()
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    if old_sid is None or before == {self.proc.pid}:
                        break
                    stale += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready in {TIMEOUT_S} s: {self.log}")
            time.sleep(0.25)
        ready = time.monotonic() - self.t0
        while True:
            self._check()
            try:
                r = httpx.post(
                    self.url + "/v1/query", json={"question": QUESTION}, timeout=TIMEOUT_S
                )
                if r.status_code == 200:
                    break
                errors += 1
            except httpx.HTTPError:
                errors += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer in {TIMEOUT_S} s: {self.log}")
            time.sleep(0.25)
        found = {
            "ready_s": round(ready, 1),
            "query_s": round(time.monotonic() - self.t0, 1),
            "documents": len(r.json()["documents"]),
        }
        if stale or errors:
            found |= {"stale_ready_answers": stale, "failed_queries": errors}
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait_gone()

    def kill(self, variant: str) -> None:
        if variant == "group":
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def wait_gone(self, timeout_s: float = 120) -> float:
        """Seconds until no process of this server's session is left (SIGKILL after
        `timeout_s`, and said so)."""
        t0 = time.monotonic()
        while session_pids(self.proc.pid):
            if time.monotonic() - t0 > timeout_s:
                left = session_pids(self.proc.pid)
                print(f"  leftovers after {timeout_s:.0f} s, killed: {names(left)}", flush=True)
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.25)
        self._out.close()
        return time.monotonic() - t0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crash_run(data_dir: Path, port: int, logs: Path, variant: str, i: int) -> dict[str, Any]:
    """Clean start (timed), kill -9, restart at once (timed), clean stop."""
    first = Server(data_dir, port, logs / f"{variant}-{i}-clean.log", [])
    try:
        clean = first.measure()
    except BaseException:
        first.stop()
        raise
    first.kill(variant)
    orphans = session_pids(first.proc.pid)
    orphan_names = sorted(set(names(orphans)))
    # How long the killed instance's processes live on, watched while the restart runs.
    lived: dict[str, float] = {}
    watcher = threading.Thread(target=lambda: lived.update(s=first.wait_gone(300)), daemon=True)
    watcher.start()
    second = Server(data_dir, port, logs / f"{variant}-{i}-restart.log", [])
    try:
        restart = second.measure(old_sid=first.proc.pid)
    finally:
        second.stop()
        watcher.join()
    restart |= {"orphans": len(orphans), "orphans_lived_s": round(lived.get("s", -1), 1)}
    if orphans:
        restart["orphan_names"] = orphan_names
    return {"clean": clean, "restart": restart}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kill", nargs="+", choices=["group", "driver"], default=["group", "driver"])
    p.add_argument("--data-dir", type=Path, default=None, help="default: a new temporary dir")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="qadrill-restart-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        first = Server(data_dir, port, logs / "first.log", [])
        try:
            figures: dict[str, Any] = {"first_start": first.measure()}
        finally:
            first.stop()
        print(f"first start (sample ingest): {figures['first_start']}", flush=True)
        for variant in args.kill:
            runs = []
            for i in range(args.runs):
                run = crash_run(data_dir, port, logs, variant, i)
                print(f"kill -9 {variant} run {i}: {run}", flush=True)
                runs.append(run)
            figures[variant] = runs
            for phase in ("clean", "restart"):
                for key in ("ready_s", "query_s"):
                    med = statistics.median(r[phase][key] for r in runs)
                    figures[f"{variant}_{phase}_{key}_median"] = round(med, 1)
        summary = {k: v for k, v in figures.items() if k.endswith("_median")}
        print(json.dumps(summary, indent=2), flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
