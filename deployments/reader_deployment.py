"""The reader's thin Ray Serve deployment (the work is `qaserve.deployments.reader.Reader`)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

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
        if self.batched:
            return await self._read_batch(request)
        return (await asyncio.to_thread(self.reader.read_batch, [request]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _read_batch(self, requests: list[ReadRequest]) -> list[ReadResponse]:
        """The windows of concurrent requests go through one ONNX Runtime run."""
        self.batch_sizes.observe(len(requests))
        return await asyncio.to_thread(self.reader.read_batch, requests)

    def info(self) -> ModelInfo:
        return self.reader.info()

    def ready(self) -> bool:
        return True
