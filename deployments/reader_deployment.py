"""The reader's thin Ray Serve deployment (the work is `qaserve.deployments.reader.Reader`).

A request Ray Serve cancels (the caller's timeout, an HTTP client gone) cancels the task
awaiting the read; its token (qaserve.cancel) then stops the reader's thread between runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from qaserve.cancel import AllCancelled, CancelToken, run_cancellable
from qaserve.deployments.replica import batch_histogram, build_replica_stage, configure_batch
from qaserve_client.schema import ModelInfo, ReadRequest, ReadResponse


@serve.deployment(name="Reader")
class ReaderDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, Any]
    ) -> None:
        self.reader = build_replica_stage(engine, "reader", replica)
        self.batch_sizes = batch_histogram("reader")
        self.batched = configure_batch(self._read_batch, replica)

    async def read(self, request: ReadRequest) -> ReadResponse:
        if not self.batched:
            return await run_cancellable(
                lambda cancel: self.reader.read_batch([request], cancel)[0]
            )
        cancel = CancelToken()
        try:
            return await self._read_batch((request, cancel))
        except asyncio.CancelledError:
            cancel.cancel()
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _read_batch(self, calls: list[tuple[ReadRequest, CancelToken]]) -> list[ReadResponse]:
        """The windows of concurrent requests go through one ONNX Runtime run, which stops
        once none of its callers waits any more."""
        self.batch_sizes.observe(len(calls))
        requests = [request for request, _ in calls]
        cancel = AllCancelled([token for _, token in calls])
        return await asyncio.to_thread(self.reader.read_batch, requests, cancel)

    def info(self) -> ModelInfo:
        return self.reader.info()

    def ready(self) -> bool:
        return True
