"""The gateway: one FastAPI ingress in front of every model deployment, routing on the request's ``model``.

It serves OpenAI's single-URL shape (``POST /v1/images/generations`` with ``model`` in the body) and holds no torch:
the process stays small. Each request costs one more hop than a model's own route (``app.build_model_app``):
Ray's handle call to the model replica. The API itself (routes, validation, errors) is ``frontend.Frontend``.
"""

import asyncio
import logging
import math
import time

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from .config import AppArgs, model_deployment_name
from .errors import APIError
from .frontend import DEADLINE_GRACE_S, DEADLINE_KEY, RETRY_AFTER_UNAVAILABLE_S, Frontend, _unavailable, make_api

log = logging.getLogger("ray.serve")

DESCRIBE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 5.0


class Admission:
    """Requests in flight per model at this gateway replica. Past the cap a request is refused here (429) before
    any Ray call: under a flood, refusing at the edge keeps the refusals fast and leaves the model replicas' CPU
    to the images being generated. A streamed request counts until its first event."""

    def __init__(self, args: AppArgs):
        # What the model's replicas hold at most of guided one-image requests (the common case: half the batch
        # rows running, the queue full), shared between the gateway replicas. At this cap the gateway refuses
        # before the engine has to: the engine's own 429 is the slower path, through a replica busy denoising.
        self.caps = {m.name: max(1, math.ceil(m.autoscaling.max_replicas * min(
            m.ongoing_requests_cap, max(1, m.max_batch_size // 2) + m.max_queue_size) / args.gateway.num_replicas))
            for m in args.models}
        self.in_flight = dict.fromkeys(self.caps, 0)

    def enter(self, model: str) -> None:
        if self.in_flight[model] >= self.caps[model]:
            raise APIError(429, f"model {model!r} is at capacity: {self.in_flight[model]} requests in flight "
                                f"(limit {self.caps[model]}); retry later", code="queue_full", retry_after=1.0)
        self.in_flight[model] += 1

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1


gateway_api = make_api("Class-conditional DiT image generation behind OpenAI's images API (every model).")


# Last in the module: serve.ingress pickles the app when it is decorated, so every helper it uses must exist.
@serve.ingress(gateway_api)
class Gateway(Frontend):
    """Routes requests to the model deployments; one handle per model."""

    def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle] | None = None):
        """``models``: handles bound in the same application (``build_app``); None: models deployed as their
        own applications (``build_gateway_app``), found by name when first asked for, so the gateway starts
        whatever order Ray deploys the applications in."""
        super().__init__([m.name for m in args.models], args.limits, args.auth)
        self.models: dict[str, DeploymentHandle] = dict(models or {})
        self.admission = Admission(args)
        self._cards: dict[str, dict] = {}  # describe() answers of loaded models (they do not change)

    async def _resolve(self, model: str) -> DeploymentHandle:
        """The model's handle; for a model application, looked up by name (the application and its deployment are
        named after the model, ``config.model_deployment_name``) the first time it is needed."""
        handle = self.models.get(model)
        if handle is None:
            name = model_deployment_name(model)
            try:  # asks the controller whether it exists: off the event loop
                handle = await asyncio.to_thread(serve.get_deployment_handle, name, model)
            except Exception as e:
                raise APIError(503, f"model {model!r} is not deployed: no application {model!r} with a deployment "
                                    f"{name!r} ({type(e).__name__}); retry after the Retry-After delay"[:1000],
                               code="model_unavailable", retry_after=RETRY_AFTER_UNAVAILABLE_S) from None
            self.models[model] = handle
        return handle

    async def _admit(self, model: str) -> None:
        await self._resolve(model)
        self.admission.enter(model)

    def _release(self, model: str) -> None:
        self.admission.leave(model)

    async def _call_unary(self, model: str, payload: dict) -> dict:
        """Call the model's ``generate``; a replica that died under the request is retried once on another."""
        # Retrying is safe: nothing reached the client yet, and a seeded request gives the same images again.
        for attempt in (1, 2):
            try:
                remaining = payload[DEADLINE_KEY] - time.time() + DEADLINE_GRACE_S
                return await asyncio.wait_for(self.models[model].generate.remote(payload), remaining)
            except APIError:
                raise
            except RayActorError as e:
                if attempt == 2:
                    raise _unavailable(model, e)
                log.warning("model %r replica died during a request (%s); retrying once", model, e)
            except Exception as e:
                raise await self._call_error(model, e)

    def _open_stream(self, model: str, payload: dict):
        return self.models[model].options(stream=True).generate_stream.remote(payload)

    async def _describe(self, model: str) -> dict:
        if model in self._cards:
            return self._cards[model]
        try:
            handle = await self._resolve(model)
            card = await asyncio.wait_for(handle.describe.remote(), DESCRIBE_TIMEOUT_S)
        except Exception as e:
            return {"id": model, "created": int(time.time()), "status": "unavailable",
                    "detail": f"no replica answered: {e!r}"[:500]}
        if card["status"] == "ready":
            self._cards[model] = card
        return card

    async def _ready(self, model: str) -> dict:
        try:
            handle = await self._resolve(model)
            return await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
        except APIError as e:
            return {"ready": False, "detail": e.message}
        except Exception as e:
            return {"ready": False, "detail": await self._why_unavailable(model, e)}

    async def _why_unavailable(self, model: str, e: Exception) -> str:
        """Ray's own account of a deployment with no running replica (e.g. its health check naming a bad file)."""
        handle = self.models.get(model)
        try:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[handle.app_name].deployments[handle.deployment_name]
            # Ray's message ends with the traceback of the failed constructor or health check: keep its last line.
            lines = [line for line in str(deployment.message).splitlines() if line.strip()]
            state = getattr(deployment.status, "value", deployment.status)
            return f"deployment {handle.deployment_name} is {state}: {lines[-1] if lines else 'no message'}"[:1000]
        except Exception:
            return await super()._why_unavailable(model, e)
