"""The generator's thin Ray Serve deployment (the work is `RagTokenGenerator`).

A request Ray Serve cancels (the caller's timeout, an HTTP client gone) cancels the task
awaiting the generation; its token (qaserve.cancel) then stops the decoding at the next pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from qaserve.cancel import CancelToken, run_cancellable
from qaserve.deployments.replica import build_replica_stage
from qaserve.deployments.span_scores import ScoreRequest, ScoreResponse
from qaserve.threads import iterate_blocking
from qaserve_client.schema import GeneratedToken, GenerateRequest, GenerateResponse, ModelInfo


@serve.deployment(name="Generator")
class GeneratorDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, Any]
    ) -> None:
        self.generator = build_replica_stage(engine, "generator", replica)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await run_cancellable(
            lambda cancel: self.generator.generate_request(request, cancel)
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """The reader's spans scored (generative scoring); cancellable like `generate`."""
        return await run_cancellable(lambda cancel: self.generator.score_request(request, cancel))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        """Tokens as they are decided; a cancelled call stops the decoding."""
        cancel = CancelToken()
        tokens = iterate_blocking(
            lambda: self.generator.stream_request(request, cancel),
            None,
            cancel,
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
