"""Bound every runtime's threads to the CPUs a process (or Ray replica) was given.

On a 2-core machine, two replicas that each start a torch pool, an ONNX Runtime pool and a
tokenizers pool of nproc threads fight for the cores; one number set early avoids that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from qaserve.cancel import CancelToken

T = TypeVar("T")


def cpu_budget(requested: float | int | None = None) -> int:
    """Whole threads for a (possibly fractional) CPU grant; 0/None means all cores."""
    if requested:
        return max(1, round(float(requested)))
    env = os.environ.get("QASERVE_THREADS")
    if env and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def bound_threads(requested: float | int | None = None) -> int:
    """Set torch, OpenMP/BLAS and tokenizers to `n` threads; returns n for ORT sessions."""
    n = cpu_budget(requested)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    # Idle OpenMP workers sleep instead of spinning: on a shared 2-core box spinning threads
    # steal the core their partner waits for (a training step went from 17.4 s to 9.5 s).
    # Takes effect only if set before torch loads; Ray replicas get it in their runtime_env.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Tokenizers' own pool would add nproc more threads per replica.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(n)
        if torch.get_num_interop_threads() != 1:
            # Only settable before the first parallel op; harmless afterwards.
            with contextlib.suppress(RuntimeError):
                torch.set_num_interop_threads(1)
    except ImportError:
        pass
    return n


_DONE = object()


async def iterate_blocking(
    make: Callable[[], Iterator[T]],
    executor: Executor | None = None,
    cancel: CancelToken | None = None,
) -> AsyncGenerator[T, None]:
    """A blocking iterator (a token stream) as an async one, one `next` per executor task.

    When the consumer stops early (a client went away, a timeout), `cancel` (the token the
    iterator checks, qaserve.cancel) is set, so a step in flight stops at its next check (a
    beam search is one long step), and the iterator is closed in the executor once that
    step ends: the work stops instead of running on for nobody. The in-process transport
    and the generator's Ray replica both stream this way.
    """
    loop = asyncio.get_running_loop()
    state: dict[str, Iterator[T]] = {}

    def step() -> Any:
        if "it" not in state:
            state["it"] = make()
        return next(state["it"], _DONE)

    def close() -> None:
        close_it = getattr(state.get("it"), "close", None)
        if close_it is not None:
            close_it()

    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = loop.run_in_executor(executor, step)
            item = await asyncio.shield(pending)
            if item is _DONE:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            if cancel is not None:
                cancel.cancel()
            # Wait for the step in flight (it stops at its next check), then close.
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved: the step's error (Cancelled) reaches nobody
        with contextlib.suppress(RuntimeError):  # an executor shut down has nothing to stop
            await loop.run_in_executor(executor, close)
