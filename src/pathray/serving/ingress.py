"""The ingress deployment: FastAPI over HTTP, chunks to the model deployment through its handle."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from pathray.serving.config import ServeAppConfig


def replica_died(exc: BaseException) -> bool:
    """Errors that mean "the replica went away", so the chunk is worth sending again.

    A slide that cannot be read raises a task error from user code instead, which is final.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        return False
    died = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)
    return isinstance(exc, died + (BackPressureError, DeploymentUnavailableError))


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: checks requests, plans slides, fans chunks out, stitches and stores results.

    Args:
        model: handle of the ``ModelServer`` deployment.
        config: the app config.
        needs_token: a token was configured where the app was built; the replica then refuses to
            start without one of its own (config or ``security.token_env``), never serving open.
    """

    def __init__(self, model: DeploymentHandle, config: ServeAppConfig, needs_token: bool) -> None:
        from pathray.serving.service import AnalysisService
        from pathray.serving.store import ModelStore

        self.model, self.config = model, config
        self.models = ModelStore(config.serve.models, config.storage)
        self.token = config.serve.security.resolved_token()
        if needs_token and self.token is None:
            raise RuntimeError(
                "a bearer token was configured where the app was built, but this replica has none: "
                f"set ${config.serve.security.token_env} in the cluster's environment"
            )
        self.service = AnalysisService(config, self._spec, self._chunk, replica_died, self._embed)

    async def _spec(self, model_id: str) -> Any:
        """The model's spec from its package's YAML: planning a slide loads no weights anywhere."""
        return await asyncio.to_thread(self.models.spec, model_id)

    async def _chunk(self, model_id: str, plan: Any, chunk: Any) -> Any:
        return await self.model.options(multiplexed_model_id=model_id).predict_chunk.remote(plan, chunk)

    async def _embed(
        self, model_id: str, uri: str, slide_mpp: float | None, xs: Any, ys: Any, spec: Any
    ) -> Any:
        handle = self.model.options(multiplexed_model_id=model_id)
        return await handle.embed_tiles.remote(uri, slide_mpp, xs, ys, spec.tile_size, spec.tile_mpp)

    def __serve_build_asgi_app__(self) -> Any:
        from pathray.serving.api import build_api

        return build_api(self.config, self.service, self.token)
