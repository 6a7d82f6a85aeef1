"""Figures from a run's per-request samples: per-step throughput and percentiles, and plots.

Locust's own CSVs cover the whole run; the steps of a profile need figures per user count,
so the locustfile writes every request's timing and this module cuts them by step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.loadtests.constraints import DERIVED
from qaserve.loadtests.profiles import Profile


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def requests_only(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real requests: not the derived first-token events nor the per-stream records."""
    return [s for s in samples if "ms" in s and s["name"] not in DERIVED]


@dataclass
class StepStats:
    step: int
    users: int
    seconds: float
    requests: int
    errors: int
    rps: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def step_stats(
    samples: list[dict[str, Any]], profile: Profile, names: set[str] | None = None
) -> list[StepStats]:
    """One row per profile step (requests of `names`, default all), by completion time."""
    reqs = [s for s in requests_only(samples) if names is None or s["name"] in names]
    out = []
    for i, step in enumerate(profile.steps):
        rows = [s for s in reqs if s["step"] == i]
        ok = [s["ms"] for s in rows if s["ok"]]
        statuses: dict[str, int] = {}
        for s in rows:
            key = str(s.get("status") or "none")
            statuses[key] = statuses.get(key, 0) + 1
        out.append(
            StepStats(
                step=i,
                users=step.users,
                seconds=step.seconds,
                requests=len(rows),
                errors=len(rows) - len(ok),
                rps=len(ok) / step.seconds,
                p50_ms=_pct(ok, 50),
                p95_ms=_pct(ok, 95),
                p99_ms=_pct(ok, 99),
                statuses=statuses,
            )
        )
    return out


def steps_table(rows: list[StepStats]) -> str:
    lines = [
        "| users | requests | errors | ok req/s | p50 ms | p95 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        lines.append(
            f"| {r.users} | {r.requests} | {r.errors} | {r.rps:.2f} | {r.p50_ms:.0f} | "
            f"{r.p95_ms:.0f} | {r.p99_ms:.0f} | {statuses} |"
        )
    return "\n".join(lines)


def save_steps(rows: list[StepStats], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def plot_latency_over_time(
    samples: list[dict[str, Any]], path: Path, title: str, bucket_s: float = 5.0
) -> Path | None:
    """p50/p95/p99 of requests completed in each `bucket_s` window, with the user count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_reqs = requests_only(samples)
    reqs = [s for s in all_reqs if s["ok"]]
    if not reqs:
        return None
    t0 = min(s["t"] for s in all_reqs)
    buckets: dict[int, list[dict[str, Any]]] = {}
    for s in reqs:
        buckets.setdefault(int((s["t"] - t0) // bucket_s), []).append(s)
    keys = sorted(buckets)
    xs = [(k + 0.5) * bucket_s for k in keys]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax.plot(xs, [_pct([s["ms"] for s in buckets[k]], q) for k in keys], style, label=f"p{q}")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.step(xs, [max(s["users"] for s in buckets[k]) for k in keys], "k", alpha=0.3, where="mid")
    ax2.set_ylabel("users", alpha=0.6)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput_vs_users(
    systems: dict[str, list[StepStats]], path: Path, title: str
) -> Path | None:
    """Successful requests/s against users (left) and p95 against users (right), per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not systems:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in systems.items():
        users = [r.users for r in rows]
        ax.plot(users, [r.rps for r in rows], "o-", label=name)
        ax2.plot(users, [r.p95_ms for r in rows], "o-", label=name)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent users (closed loop)")
        a.grid(alpha=0.3)
    ax.set_ylabel("successful requests/s")
    ax2.set_ylabel("p95 latency (ms)")
    ax2.set_yscale("log")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
