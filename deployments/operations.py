"""Write operations: an ingest as a unit that is polled, waited on, or stopped before it commits.

A write embeds first (the long part, cancellable between batches), then commits under the
store's write lock (short, never interrupted). `WriteOp`'s gate decides, under one lock,
which comes first: a cancel (then the commit never starts: nothing is written) or the commit
(then the cancel is refused and the write completes). So a timed-out or abandoned write
leaves nothing behind, or else the caller learns it landed.

The store owner keeps them (the Retriever deployment under Ray, `LocalStages` in-process):
running ones up to a bound (past it, 503), finished ones in a bounded history for polling,
in the spirit of Qdrant's `wait=false`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from qaserve.errors import Overloaded, QAServeError, StageTimeout, as_api_error
from qaserve_client.schema import (
    ErrorDetail,
    IngestRequest,
    IngestResponse,
    Operation,
    OperationProgress,
    OperationStatus,
)

HISTORY = 256  # finished operations kept for polling
MAX_UNFINISHED = 64  # writes embedding or committing at once; more: 503


class OperationNotFound(QAServeError):
    type = "not_found"


class Cancelled(Exception):
    """The write was stopped before its commit: nothing was written."""


class WriteOp:
    """One write's state; `check`/`advance` run between embedding batches (any thread)."""

    def __init__(self, op_id: str | None = None) -> None:
        self.id = op_id or uuid.uuid4().hex
        self.total = 0  # passages, known once the documents are split
        self.embedded = 0
        self.status: OperationStatus = "queued"
        self.result: IngestResponse | None = None
        self.error: QAServeError | None = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.committing = False
        self._cancel: QAServeError | None = None
        self._gate = threading.Lock()
        self.task: asyncio.Task[Any] | None = None
        self.done = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if a cancel came: called before each embedding batch."""
        if self._cancel is not None:
            raise Cancelled(self._cancel.message)

    def advance(self, passages: int) -> None:
        self.embedded += passages
        self.check()

    def begin_commit(self) -> None:
        """Called holding the store's write lock, right before the commit: from here on the
        write completes; if a cancel came first, raise `Cancelled` and commit nothing."""
        with self._gate:
            self.check()
            self.committing = True

    def request_cancel(self, why: QAServeError) -> bool:
        """True if the write will now stop before committing; False if it is committing or
        finished already (it then completes as it would have)."""
        with self._gate:
            if self.committing or self.finished:
                return False
            self._cancel = why
            return True

    def snapshot(self) -> Operation:
        error = None
        if self.error is not None:
            err = self.error
            error = ErrorDetail(type=err.type, message=err.message, field=err.field)
        return Operation(
            id=self.id,
            status=self.status,
            progress=OperationProgress(
                embedded=min(self.embedded, self.total), passages=self.total
            ),
            result=self.result,
            error=error,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )


Work = Callable[[WriteOp], Awaitable[IngestResponse]]


class Operations:
    """The store owner's writes, by id. Runs each as a task on the owner's event loop."""

    def __init__(self, history: int = HISTORY, max_unfinished: int = MAX_UNFINISHED) -> None:
        self.history = history
        self.max_unfinished = max_unfinished
        self._ops: OrderedDict[str, WriteOp] = OrderedDict()

    def start(self, work: Work) -> WriteOp:
        """Accept a write and start it now; 503 when too many are unfinished."""
        unfinished = sum(not op.finished for op in self._ops.values())
        if unfinished >= self.max_unfinished:
            raise Overloaded(f"{unfinished} writes are in progress; retry later")
        op = WriteOp()
        self._ops[op.id] = op
        op.task = asyncio.get_running_loop().create_task(self._run(op, work))
        op.task.add_done_callback(lambda _: self._settle(op))
        self._prune()
        return op

    async def _run(self, op: WriteOp, work: Work) -> None:
        op.status = "running"
        try:
            op.result = await work(op)
            op.status = "done"
        except Cancelled as exc:
            op.status, op.error = "cancelled", StageTimeout(str(exc))
        except asyncio.CancelledError:
            pass  # only `cancel` cancels the task, and only before the commit began: _settle
        except Exception as exc:  # mapped (and logged) once, as a synchronous write's would be
            op.status, op.error = "failed", as_api_error(exc, "ingest")
        finally:
            self._settle(op)

    @staticmethod
    def _settle(op: WriteOp) -> None:
        """The task ended (or was cancelled before it ran): the operation is finished."""
        if op.done.is_set():
            return
        if op.status in ("queued", "running"):
            op.status = "cancelled"
            op.error = op._cancel or StageTimeout("the write was stopped; nothing was written")
        op.finished_at = time.time()
        op.done.set()

    def get(self, op_id: str) -> WriteOp:
        op = self._ops.get(op_id)
        if op is None:
            raise OperationNotFound(f"no operation with id {op_id!r}", field="id")
        return op

    async def wait(self, op_id: str, timeout: float | None = None) -> WriteOp:
        """The operation once finished, or as it is at `timeout` (it goes on running)."""
        op = self.get(op_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(op.done.wait(), timeout)
        return op

    async def cancel(self, op_id: str, why: QAServeError) -> WriteOp:
        """Stop the write if its commit has not begun; either way, return it finished."""
        op = self.get(op_id)
        if op.request_cancel(why) and op.task is not None:
            op.task.cancel()  # stops awaiting the embedder now; a running batch sees the flag
        await op.done.wait()
        return op

    def _prune(self) -> None:
        finished = [k for k, op in self._ops.items() if op.finished]
        for key in finished[: max(0, len(finished) - self.history)]:
            del self._ops[key]


def outcome(op: WriteOp) -> Operation:
    """The finished operation's snapshot; a failed write raises its own error (so a caller
    sees the same error whether it waited or not), a cancelled one its timeout."""
    if op.status == "failed" and op.error is not None:
        raise op.error
    return op.snapshot()


class WriteOwner:
    """The write calls of the store's owner (the Retriever replica, `LocalStages`): start a
    write, look it up, wait for it, cancel it. The owner supplies `operations` and `_ingest`."""

    operations: Operations

    async def _ingest(self, op: WriteOp, request: IngestRequest) -> IngestResponse:
        raise NotImplementedError

    async def start_ingest(self, request: IngestRequest) -> Operation:
        return self.operations.start(lambda op: self._ingest(op, request)).snapshot()

    async def operation(self, op_id: str) -> Operation:
        return self.operations.get(op_id).snapshot()

    async def wait_operation(self, op_id: str, timeout: float | None) -> Operation:
        return outcome(await self.operations.wait(op_id, timeout))

    async def cancel_operation(self, op_id: str, why: str) -> Operation:
        return outcome(await self.operations.cancel(op_id, StageTimeout(why)))
