"""One `qaserve serve` per data dir, and the leftovers of one that was killed.

After a kill -9 of `qaserve serve`, Ray's head processes die with the driver (they are started
with PR_SET_PDEATHSIG), but its workers, each in a process group of its own, and the dashboard
and runtime-env agents live on for seconds to a minute: an orphaned proxy still answers on the
port (/readyz 200 from the dead instance), replicas keep their CPU, the agents keep Ray's fixed
agent port (52365), and the Retriever the Qdrant Edge shard's WAL lock. So the server holds an
exclusive lock on `<data_dir>/serve.lock` for its life (the kernel drops it with the process,
kill -9 included) and writes its instance id there; every process it starts inherits that id
in its environment. A start that takes the lock kills the live processes carrying the id of
the instance before it, and says so. A second server on a data dir in use stops at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "QASERVE_INSTANCE"
LOCK = "serve.lock"


class DataDirBusy(RuntimeError):
    pass


@dataclass
class Instance:
    """This server's claim on its data dir; `reaped`: what the killed one before it left."""

    id: str
    fd: int
    previous_pid: int | None = None
    reaped: list[str] = field(default_factory=list)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)  # drops the lock


def claim(data_dir: Path) -> Instance:
    """Lock `data_dir` for this process, reap the leftovers of the instance that held it
    before, and mark this process's environment (inherited by Ray's processes) with a new id."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd).get("pid", "unknown")
        os.close(fd)
        raise DataDirBusy(
            f"{data_dir} is in use by another qaserve serve (pid {holder}): stop it, or "
            "give this one another --data-dir"
        ) from None
    previous = _read(fd)
    reaped = reap(str(previous["instance"])) if previous.get("instance") else []
    instance = Instance(uuid.uuid4().hex, fd, previous.get("pid"), reaped)
    record = {"instance": instance.id, "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.environ[ENV] = instance.id
    return instance


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def leftovers(instance_id: str) -> dict[int, str]:
    """Live processes started by the instance `instance_id` (pid -> name), found by the id in
    their environment: pid reuse cannot mislead it, and replicas started late are included."""
    mark = f"{ENV}={instance_id}".encode()
    found: dict[int, str] = {}
    if not Path("/proc").is_dir():  # not Linux: nothing to find this way
        return found
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
    return found


def reap(instance_id: str, timeout_s: float = 10.0) -> list[str]:
    """SIGKILL the leftovers of `instance_id`; their names, once they are gone (or after
    `timeout_s`)."""
    found = leftovers(instance_id)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while found and time.monotonic() < deadline and any(_alive(p) for p in found):
        time.sleep(0.05)
    return sorted(found.values())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
