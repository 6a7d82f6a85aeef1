"""Where the cores went during a run: CPU seconds per process (Ray replicas by stage, Ray's own
daemons, the load generator, anything else on the machine), and py-spy stacks of a replica.

This is the answer to "what limited throughput": on a 2-core machine the cores are the budget,
so the share each process took of 2 x wall seconds says which stage saturates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

_REPLICA = re.compile(r"ray::ServeReplica:[^:]+:([A-Za-z]+)")


def label(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "other (exited)"
    head = " ".join(cmd[:4]) if cmd else name
    m = _REPLICA.search(head)
    if m:
        return f"replica:{m.group(1)}"
    if "ProxyActor" in head:
        return "ray:proxy"
    if "ServeController" in head:
        return "ray:serve-controller"
    if head.startswith("ray::"):
        return "ray:other-actor"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in head:
            return "ray:daemons"
    if "locust" in head:
        return "locust (load generator)"
    if "qaserve.loadtests.baseline" in head:
        return "baseline server"
    if "qaserve" in head and " serve" in head:
        return "qaserve serve (driver)"
    if "pytest" in head:
        return "other: pytest"
    return "other"


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuAccount:
    """CPU seconds per label between start() and stop(), over every process on the machine."""

    def start(self) -> CpuAccount:
        self.t0 = time.monotonic()
        self.before = {p.pid: _cpu(p) for p in psutil.process_iter()}
        self.children0 = _children_cpu()
        return self

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self.t0
        used: defaultdict[str, float] = defaultdict(float)
        for p in psutil.process_iter():
            used[label(p)] += max(0.0, _cpu(p) - self.before.get(p.pid, 0.0))
        # Locust has exited by now: its CPU is in this process's reaped-children usage.
        used["locust (load generator)"] += _children_cpu() - self.children0
        self.used = dict(sorted(used.items(), key=lambda kv: kv[1], reverse=True))
        return self.used

    def table(self) -> str:
        cores = psutil.cpu_count() or 1
        budget = cores * self.wall
        lines = [
            f"CPU seconds per process over {self.wall:.0f} s wall ({cores} cores = "
            f"{budget:.0f} CPU-s):",
            "",
            "| process | CPU s | share of all cores |",
            "|---|---|---|",
        ]
        for name, s in self.used.items():
            if s >= 0.05:
                lines.append(f"| {name} | {s:.1f} | {s / budget:.0%} |")
        idle = budget - sum(self.used.values())
        lines.append(f"| (idle) | {max(idle, 0):.1f} | {max(idle, 0) / budget:.0%} |")
        return "\n".join(lines)


def replica_pids(stage: str) -> list[int]:
    return [p.pid for p in psutil.process_iter() if label(p) == f"replica:{stage}"]


class PySpy:
    """`py-spy record` of one stage's replicas for the length of a run (raw collapsed stacks)."""

    def __init__(self, stage: str, out: Path, seconds: float, rate: int = 50) -> None:
        self.stage, self.out = stage, out
        self.procs: list[tuple[Path, subprocess.Popen[bytes]]] = []
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for pid in replica_pids(stage):
            path = out / f"py-spy-{stage}-{pid}.txt"
            cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds))]
            cmd += ["--rate", str(rate), "--format", "raw", "--output", str(path), "--nonblocking"]
            self.procs.append(
                (path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            )

    def summary(self, top: int = 15) -> str:
        leaf: Counter[str] = Counter()
        total = 0
        for path, proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                n = int(count)
                total += n
                leaf[_short(stack.split(";")[-1])] += n
        if not total:
            return f"py-spy: no samples from {self.stage} (pids {[p.pid for _, p in self.procs]})"
        lines = [
            f"py-spy, {self.stage} replicas: {total} samples of running threads; "
            "top functions by own time:",
            "",
            "| function | share |",
            "|---|---|",
        ]
        lines += [f"| `{f}` | {n / total:.0%} |" for f, n in leaf.most_common(top)]
        return "\n".join(lines)


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


@contextmanager
def where_cpu_went(out: Path, seconds: float, stages: list[str]) -> Iterator[list[str]]:
    """Account CPU per process (and py-spy `stages`' replicas) for the body; the tables are
    appended to the yielded list and written to `out/cpu.md`."""
    texts: list[str] = []
    account = CpuAccount().start()
    spies = [PySpy(stage, out, seconds) for stage in stages]
    try:
        yield texts
    finally:
        account.stop()
        texts.append(account.table())
        texts += [spy.summary() for spy in spies]
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu.md").write_text("\n\n".join(texts) + "\n")
