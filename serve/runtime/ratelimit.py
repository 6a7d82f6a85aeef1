"""Per-caller rate limits: a token bucket per API key (or client address) in this process.

Each process keeps its own buckets: an in-process app, or each Ingress replica under Ray
Serve, so behind N ingress replicas a key gets up to N times its rate. Over the limit the
request is refused with 429 and a Retry-After of the seconds until a token is back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

from qaserve.config import RateLimit
from qaserve.errors import RateLimited


class Bucket:
    """`capacity` tokens, refilled at `rate` a second; a request takes one."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.rate = limit.requests_per_s
        self.capacity = float(limit.capacity)
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.capacity


class RateLimiter:
    """The buckets by caller. Beyond `max_callers` (client addresses are unbounded) the full
    buckets are dropped: a full bucket and no bucket admit the same requests."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000
    ) -> None:
        self.clock = clock
        self.max_callers = max_callers
        self.buckets: dict[Hashable, Bucket] = {}

    def check(self, caller: Hashable, limit: RateLimit | None) -> None:
        """Take a token for `caller`, or raise RateLimited (429) with the wait."""
        if limit is None:
            return
        now = self.clock()
        bucket = self.buckets.get(caller)
        if bucket is None:
            if len(self.buckets) >= self.max_callers:
                self._prune(now)
            bucket = self.buckets[caller] = Bucket(limit, now)
        wait = bucket.take(now)
        if wait > 0:
            retry = math.ceil(wait)
            raise RateLimited(
                f"rate limit exceeded ({limit.requests_per_s:g} requests/s, bursts of "
                f"{limit.capacity}); retry in {retry} s",
                retry_after=retry,
            )

    def _prune(self, now: float) -> None:
        for caller in [c for c, b in self.buckets.items() if b.full(now)]:
            del self.buckets[caller]
