"""Stopping a stage's work when its caller stops waiting (a timeout, a client gone).

A blocking stage call (a generation, a read) runs in a thread, and a thread cannot be
interrupted: cancelling the asyncio task that awaits it stops the wait, not the work. So the
waiting side holds a `CancelToken` and sets it when it is cancelled; the working side checks
the token between its steps (decoding steps, batches of windows) and stops there with
`Cancelled`. A stage called without a token (None) is never cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised by `CancelToken.check` in the working thread: nobody waits for the result."""


class CancelToken:
    """Set by the waiting side, checked by the working side between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("the caller stopped waiting")


class AllCancelled(CancelToken):
    """Cancelled once every one of `tokens` is: a batch serving several callers stops only
    when none of them waits any more."""

    def __init__(self, tokens: Sequence[CancelToken]) -> None:
        super().__init__()
        self.tokens = list(tokens)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (bool(self.tokens) and all(t.cancelled for t in self.tokens))


def check(token: CancelToken | None) -> None:
    """`token.check()`, for the stages' optional tokens (None: never cancelled)."""
    if token is not None:
        token.check()


async def run_cancellable(
    fn: Callable[[CancelToken], T],
    executor: Executor | None = None,
    token: CancelToken | None = None,
) -> T:
    """`fn(token)` in a thread of `executor`; when the awaiting task is cancelled (a timeout,
    a client that went away, Ray Serve cancelling the request), the token is set, so the
    thread stops at its next check instead of computing for nobody.

    The cancellation does not wait for the thread: the next check comes within one step.
    """
    token = token or CancelToken()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, fn, token)
    try:
        return await future
    except asyncio.CancelledError:
        token.cancel()
        raise
