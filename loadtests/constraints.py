"""Latency constraints (constraints.yaml) checked against a Locust run's statistics.

Every limit that a run breaks is named; a constrained route with no requests is a broken
constraint too (a run that never exercised a route proves nothing about it).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONSTRAINTS_FILE = Path(__file__).resolve().parent / "constraints.yaml"
# Events derived from another request (not requests themselves): left out of the totals.
DERIVED = frozenset({"generate:first-token"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteLimits(_Strict):
    p50_ms: float | None = Field(None, gt=0)
    p95_ms: float | None = Field(None, gt=0)
    p99_ms: float | None = Field(None, gt=0)
    max_error_ratio: float | None = Field(None, ge=0, le=1)
    min_rps: float | None = Field(None, ge=0)
    min_requests: int = Field(1, ge=0)


class OverallLimits(_Strict):
    max_error_ratio: float | None = Field(None, ge=0, le=1)
    min_rps: float | None = Field(None, ge=0)
    min_requests: int = Field(1, ge=0)


class StreamLimits(_Strict):
    min_tokens_per_s: float | None = Field(None, gt=0)  # median over the run's streams
    min_streams: int = Field(1, ge=0)


class Constraints(_Strict):
    description: str = ""
    routes: dict[str, RouteLimits] = Field(default_factory=dict)
    overall: OverallLimits = Field(default_factory=OverallLimits)
    stream: StreamLimits | None = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> Constraints:
        with open(path or CONSTRAINTS_FILE) as f:
            return cls.model_validate(yaml.safe_load(f) or {})


@dataclass(frozen=True)
class RouteStats:
    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Violation:
    route: str
    metric: str
    limit: float
    measured: float | None

    def __str__(self) -> str:
        if self.measured is None:
            return f"{self.route}: {self.metric}: no data (limit {self.limit:g})"
        return f"{self.route}: {self.metric} = {self.measured:.4g}, limit {self.limit:g}"


def read_locust_stats(path: str | Path) -> dict[str, RouteStats]:
    """Locust's `<prefix>_stats.csv`: one row per request name, plus "Aggregated"."""

    def num(row: dict[str, str], key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else 0.0

    out: dict[str, RouteStats] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name = row["Name"]
            out[name] = RouteStats(
                name=name,
                requests=int(num(row, "Request Count")),
                failures=int(num(row, "Failure Count")),
                p50_ms=num(row, "50%"),
                p95_ms=num(row, "95%"),
                p99_ms=num(row, "99%"),
                rps=num(row, "Requests/s"),
            )
    return out


def overall(stats: dict[str, RouteStats]) -> RouteStats:
    """Totals over real requests (not Locust's "Aggregated", which counts derived events)."""
    rows = [s for n, s in stats.items() if n != "Aggregated" and n not in DERIVED]
    agg = stats.get("Aggregated")
    return RouteStats(
        name="overall",
        requests=sum(s.requests for s in rows),
        failures=sum(s.failures for s in rows),
        p50_ms=agg.p50_ms if agg else 0.0,
        p95_ms=agg.p95_ms if agg else 0.0,
        p99_ms=agg.p99_ms if agg else 0.0,
        rps=sum(s.rps for s in rows),
    )


def tokens_per_s(samples: list[dict[str, Any]]) -> list[float]:
    """Decode speed of each stream: tokens after the first over the time they took."""
    return [
        (s["tokens"] - 1) / s["decode_s"]
        for s in samples
        if s.get("name") == "stream" and s.get("tokens", 0) > 1 and s.get("decode_s", 0) > 0
    ]


def check(
    constraints: Constraints,
    stats: dict[str, RouteStats],
    samples: list[dict[str, Any]] | None = None,
) -> list[Violation]:
    out: list[Violation] = []

    def over(route: str, metric: str, limit: float | None, value: float) -> None:
        if limit is not None and value > limit:
            out.append(Violation(route, metric, limit, value))

    def under(route: str, metric: str, limit: float | None, value: float) -> None:
        if limit is not None and value < limit:
            out.append(Violation(route, metric, limit, value))

    for route, lim in constraints.routes.items():
        s = stats.get(route)
        if s is None or s.requests == 0:
            out.append(Violation(route, "requests", max(lim.min_requests, 1), None))
            continue
        if s.requests < lim.min_requests:
            out.append(Violation(route, "requests", lim.min_requests, s.requests))
            continue
        over(route, "p50_ms", lim.p50_ms, s.p50_ms)
        over(route, "p95_ms", lim.p95_ms, s.p95_ms)
        over(route, "p99_ms", lim.p99_ms, s.p99_ms)
        over(route, "error_ratio", lim.max_error_ratio, s.error_ratio)
        under(route, "rps", lim.min_rps, s.rps)

    tot = overall(stats)
    olim = constraints.overall
    if tot.requests < max(olim.min_requests, 1):
        out.append(Violation("overall", "requests", olim.min_requests, tot.requests or None))
    else:
        over("overall", "error_ratio", olim.max_error_ratio, tot.error_ratio)
        under("overall", "rps", olim.min_rps, tot.rps)

    if constraints.stream is not None:
        speeds = tokens_per_s(samples or [])
        sl = constraints.stream
        if len(speeds) < max(sl.min_streams, 1):
            out.append(Violation("stream", "streams", sl.min_streams, len(speeds) or None))
        else:
            under("stream", "tokens_per_s", sl.min_tokens_per_s, statistics.median(speeds))
    return out


def summary_table(
    stats: dict[str, RouteStats],
    constraints: Constraints,
    violations: list[Violation],
    samples: list[dict[str, Any]] | None = None,
) -> str:
    """A Markdown table: each route's figures, its limits and whether it held."""
    broken = {v.route for v in violations}
    lines = [
        "| route | requests | errors | req/s | p50 ms | p95 ms | p99 ms "
        "| limits (p50/p95/p99 ms) | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = sorted(n for n in stats if n != "Aggregated") + [
        n for n in constraints.routes if n not in stats
    ]
    for name in names:
        s = stats.get(name)
        lim = constraints.routes.get(name)
        limits = (
            "/".join("-" if v is None else f"{v:g}" for v in (lim.p50_ms, lim.p95_ms, lim.p99_ms))
            if lim
            else ""
        )
        ok = "" if lim is None else ("FAIL" if name in broken else "ok")
        if s is None:
            lines.append(f"| {name} | 0 | - | - | - | - | - | {limits} | {ok} |")
            continue
        lines.append(
            f"| {name} | {s.requests} | {s.failures} | {s.rps:.2f} | {s.p50_ms:.0f} | "
            f"{s.p95_ms:.0f} | {s.p99_ms:.0f} | {limits} | {ok} |"
        )
    tot = overall(stats)
    olim = constraints.overall
    parts = []
    if olim.max_error_ratio is not None:
        parts.append(f"errors <= {olim.max_error_ratio:g}")
    if olim.min_rps is not None:
        parts.append(f"req/s >= {olim.min_rps:g}")
    limits = ", ".join(parts)
    ok = ("FAIL" if "overall" in broken else "ok") if limits else ""
    lines.append(
        f"| **overall** | {tot.requests} | {tot.failures} | {tot.rps:.2f} | | | | {limits} | {ok} |"
    )
    speeds = tokens_per_s(samples or [])
    if speeds:
        ok = "FAIL" if "stream" in broken else "ok"
        lines.append(
            f"| stream tokens/s (median of {len(speeds)}) | | | {statistics.median(speeds):.1f} "
            f"| | | | >= {constraints.stream.min_tokens_per_s if constraints.stream else '-'} "
            f"| {ok} |"
        )
    return "\n".join(lines)
