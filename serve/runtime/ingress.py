"""The Ray transport: `RayStages` makes the pipeline's stage calls through deployment handles,
and the `Ingress` deployment serves the HTTP app over `Pipeline(RayStages)`.

Ray's failures become the API's errors here; a stage's own exception crosses the hop as
itself, so `qaserve.errors.as_api_error` maps it exactly as it does in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from qaserve.config import EngineConfig, ServerConfig
from qaserve.deployments.span_scores import ScoreRequest, ScoreResponse
from qaserve.errors import Overloaded
from qaserve.pipeline import Pipeline
from qaserve.stages import model_infos
from qaserve_client.schema import (
    DocumentOut,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    ModelInfo,
    Operation,
    ReadRequest,
    ReadResponse,
    RetrievedDocument,
    RetrieveRequest,
)

T = TypeVar("T")


async def call(response: Awaitable[T]) -> T:
    """Await a handle call, as the stage's own exception or the API's error for Ray's."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    try:
        return await response
    except sex.BackPressureError as exc:
        raise Overloaded(f"a stage is at capacity: {exc}") from None
    except sex.DeploymentUnavailableError as exc:
        raise Overloaded(f"a stage is unavailable: {exc}") from None
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except (rex.ActorDiedError, rex.ActorUnavailableError) as exc:
        raise Overloaded(
            f"a replica was lost and is being replaced ({type(exc).__name__})"
        ) from None


async def cancelling(response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any]) -> Any:
    """`call`, and a caller that stops waiting (the app's timeout, Serve cancelling this
    Ingress request when its HTTP client goes away) cancels the stage's request too: in Ray
    2.60 a cancelled `await response` stops the wait only (serve/handle.py). The replica's
    task is then cancelled and its token stops the stage's thread (qaserve.cancel)."""
    try:
        return await call(cast("DeploymentResponse[Any]", response))  # a unary call
    except asyncio.CancelledError:
        response.cancel()
        raise


class RayStages:
    """`StageCalls` over the stage deployments' handles, by stage name."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def startup(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]:
        return await call(self.handles["retriever"].retrieve.remote(request))

    async def read(self, request: ReadRequest) -> ReadResponse:
        return await cancelling(self.handles["reader"].read.remote(request))

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await cancelling(self.handles["generator"].generate.remote(request))

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        return await cancelling(self.handles["generator"].score.remote(request))

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        handle = self.handles["generator"].options(stream=True)
        response = cast(
            "DeploymentResponseGenerator[GeneratedToken]", handle.stream.remote(request)
        )
        it = response.__aiter__()
        try:
            while True:
                try:
                    token = await call(it.__anext__())
                except StopAsyncIteration:
                    return
                yield token
        finally:
            response.cancel()  # a consumer that stops early stops the decoding

    async def start_ingest(self, request: IngestRequest) -> Operation:
        return await call(self.handles["retriever"].start_ingest.remote(request))

    async def operation(self, op_id: str) -> Operation:
        return await call(self.handles["retriever"].operation.remote(op_id))

    async def wait_operation(self, op_id: str, timeout: float | None) -> Operation:
        return await call(self.handles["retriever"].wait_operation.remote(op_id, timeout))

    async def cancel_operation(self, op_id: str, why: str) -> Operation:
        return await call(self.handles["retriever"].cancel_operation.remote(op_id, why))

    async def get_document(self, doc_id: str, collection: str | None) -> DocumentOut:
        return await call(self.handles["retriever"].get.remote(doc_id, collection))

    async def delete_document(self, doc_id: str, collection: str | None) -> None:
        await call(self.handles["retriever"].delete.remote(doc_id, collection))

    async def info(self, stage: str) -> list[ModelInfo]:
        return model_infos(await call(self.handles[stage].info.remote()))

    async def ready(self, stage: str) -> bool:
        return bool(await call(self.handles[stage].ready.remote()))


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(
        self,
        server: dict[str, Any],
        engine: dict[str, Any],
        stages: dict[str, DeploymentHandle],
    ) -> None:
        self.server_cfg = ServerConfig.model_validate(server)
        # The stages' settings: the ensemble policy, and what the cost bounds derive from.
        self.engine_cfg = EngineConfig.model_validate(engine)
        self.pipeline = Pipeline(RayStages(stages), self.engine_cfg.ensemble)

    def __serve_build_asgi_app__(self) -> Any:
        from qaserve.runtime.api import build_app

        return build_app(self.pipeline, self.server_cfg, self.engine_cfg)
