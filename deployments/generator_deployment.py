"""The generator's thin Ray Serve deployment (the work is `RagTokenGenerator`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from qaserve.deployments.replica import build_replica_stage
from qaserve.threads import iterate_blocking
from qaserve_client.schema import GeneratedToken, GenerateRequest, GenerateResponse, ModelInfo


@serve.deployment(name="Generator")
class GeneratorDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, Any]
    ) -> None:
        self.generator = build_replica_stage(engine, "generator", replica)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await asyncio.to_thread(
            self.generator.generate,
            request.question,
            request.documents,
            request.max_new_tokens,
            request.num_beams,
        )

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        """Tokens as they are decided; a cancelled call stops the decoding."""
        tokens = iterate_blocking(
            lambda: self.generator.stream(
                request.question, request.documents, request.max_new_tokens, request.num_beams
            )
        )
        try:
            async for token in tokens:
                yield token
        finally:
            await tokens.aclose()

    def info(self) -> ModelInfo:
        return self.generator.info()

    def ready(self) -> bool:
        return True
