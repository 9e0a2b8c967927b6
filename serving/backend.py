"""What the API asks of a model, and the model behind a Ray deployment handle.

``ModelBackend`` is the small protocol the API (``frontend.Frontend``) depends on: a model's ``ModelSpec``, a
``GenerationRequest`` in and ``EncodedImages`` out (or ``Progress`` per step, for a stream), its readiness. A model
served in the API's own process implements it directly (``model_server.LocalModel``); a model in other processes is
reached through ``RemoteModel``. Both raise ``APIError`` for every failure, so the API has one error path.

Between processes the answers travel as these typed values, never as pickled exceptions: a model server returns an
``APIError`` instead of raising it, and ``RemoteModel`` raises it here. No torch in this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Protocol

from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from dit_runtime.request import GenerationRequest, ModelSpec

from .config import model_deployment_name
from .errors import APIError

log = logging.getLogger("ray.serve")

RETRY_AFTER_UNAVAILABLE_S = 2.0
SPEC_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 5.0
# While requests wait for a model, how often the gateway asks Serve whether any replica of it still runs. Ray's
# router holds a request until some replica takes it, however long that is (e.g. while the model's node is lost and
# no other node has room); without a replica, a waiting request is answered 503 with Retry-After instead.
# Each check is a serve.status() of every application, in the gateway's process, and under overload requests always
# wait; every 5 s keeps that work small and still answers a lost node's requests within a small share of their
# deadline. How fast an overloaded model's requests are refused is Ray's proxy's doing, not this period's
# (docs/reliability.md, "Overload at 3x capacity").
REPLICA_CHECK_PERIOD_S = 5.0
# Replica states that can still answer a request already sent to them (STOPPING: drains its requests).
ANSWERING_STATES = ("RUNNING", "STOPPING")


@dataclass(frozen=True)
class EncodedImages:
    """A finished request as the API sends it: base64 image files, the seed used and the engine's timings."""

    b64_images: tuple[bytes, ...]  # files of the request's output_format, base64 (ASCII)
    output_format: str
    seed: int
    queue_seconds: float  # submit -> admission into the batch
    denoise_seconds: float  # admission -> last step
    engine_seconds: float  # submit -> images ready
    spec_fingerprint: str = ""  # of the spec the answering replica serves (RemoteModel notices a redeploy by it)


@dataclass(frozen=True)
class Progress:
    """A streamed request's images finished ``step`` of ``num_steps`` denoising steps."""

    step: int
    num_steps: int


@dataclass(frozen=True)
class StartupTimes:
    """Where a model replica's start went, in seconds: what to shorten for a faster scale-out."""

    # From the replica's process start to its ModelServer's __init__ (Linux; None elsewhere): Ray starting the
    # worker, unpickling the deployment and importing torch and this package, and any time the worker sat idle in
    # Ray's pool before the replica was placed on it.
    before_init: float | None
    verify: float  # hashing the checkpoint against its manifest
    load: float  # reading the weights onto the device and the rest of the engine's start (warm-up aside)
    compile: float  # the warm-up's first call of each compiled part per bucket (a compile, or a compile-cache load)
    capture: float  # CUDA graph captures
    decoder: float  # the VAE of a latent model
    total: float  # __init__, every phase above but the first

    def phases(self) -> dict[str, float]:
        """The phases that were measured, by name (as the gauge's ``phase`` label and /readyz write them)."""
        return {f.name: round(getattr(self, f.name), 3) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ReplicaLoad:
    """The load of the replica that answered a readiness check, as /readyz reports it."""

    running_requests: int
    running_images: int
    waiting_requests: int
    waiting_images: int
    steps_done: int
    estimated_wait_s: float  # a one-image request at the defaults, queued now, until admission


@dataclass(frozen=True)
class Readiness:
    """A model's readiness (loaded, its engine loop healthy) and its load when ready."""

    ready: bool
    detail: str | None = None
    load: ReplicaLoad | None = None  # None when not ready
    startup: StartupTimes | None = None  # of the replica that answered


class ModelBackend(Protocol):
    """A model as the API sees it; every method raises ``APIError`` (or returns, for ``ready``)."""

    async def spec(self) -> ModelSpec: ...

    async def generate(self, request: GenerationRequest) -> EncodedImages: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Progress | EncodedImages]: ...

    async def ready(self) -> Readiness: ...


def unavailable(model: str, why: str) -> APIError:
    message = f"model {model!r} has no replica able to take the request right now ({why}); retry after the " \
              "Retry-After delay"
    return APIError(503, message[:1000], code="model_unavailable", retry_after=RETRY_AFTER_UNAVAILABLE_S)


def raise_if_error(value):
    """A model server's answer: the value, or its ``APIError`` raised here."""
    if isinstance(value, APIError):
        raise value
    return value


class RemoteModel:
    """A model deployment reached through a Ray deployment handle (the gateway's way to every model).

    Its spec is fetched once and kept; every answer names the fingerprint of the spec its replica serves, and when
    that differs (the model was redeployed with other defaults or classes) the kept spec is dropped, so requests
    built after that answer follow the new one. At most ``cap`` requests are in flight here: past it the gateway
    refuses at once (429) rather than queueing in Ray, which keeps refusals fast and the replicas' CPU for images.
    """

    def __init__(self, name: str, cap: int, handle: DeploymentHandle | None = None):
        """``handle``: bound in the same application; None: the model is an application of its own, looked up by
        name when first needed (so the gateway starts whatever order Ray deploys the applications in)."""
        self.name, self.cap = name, cap
        self._handle = handle
        self._spec: ModelSpec | None = None
        self.in_flight = 0
        self._waiting: set = set()  # responses not yet answered, watched by _watch_replicas
        self._released: set = set()  # of those, the ones cancelled because no replica ran
        self._watcher: asyncio.Task | None = None

    async def _resolve(self) -> DeploymentHandle:
        if self._handle is None:
            deployment = model_deployment_name(self.name)
            try:  # asks the controller whether it exists: off the event loop
                self._handle = await asyncio.to_thread(serve.get_deployment_handle, deployment, self.name)
            except Exception as e:
                raise APIError(503, f"model {self.name!r} is not deployed: no application {self.name!r} with a "
                                    f"deployment {deployment!r} ({type(e).__name__}); retry after the Retry-After "
                                    "delay"[:1000], code="model_unavailable",
                               retry_after=RETRY_AFTER_UNAVAILABLE_S) from None
        return self._handle

    async def spec(self) -> ModelSpec:
        if self._spec is None:
            handle = await self._resolve()
            try:
                spec = await asyncio.wait_for(handle.spec.remote(), SPEC_TIMEOUT_S)
            except Exception as e:
                raise await self._error(e) from None
            self._spec = raise_if_error(spec)
        return self._spec

    def _seen(self, answer: EncodedImages) -> EncodedImages:
        if self._spec is not None and answer.spec_fingerprint != self._spec.fingerprint:
            self._spec = None  # redeployed: fetch the spec again for the next request
        return answer

    def _enter(self) -> None:
        if self.in_flight >= self.cap:
            raise APIError(429, f"model {self.name!r} is at capacity: {self.in_flight} requests in flight (limit "
                                f"{self.cap}); retry later", code="queue_full", retry_after=1.0)
        self.in_flight += 1

    async def generate(self, request: GenerationRequest) -> EncodedImages:
        """The model's answer; a replica that died under the request is retried once on another (safe: nothing
        reached the client yet, and a request gives the same images again; one without a seed, other images)."""
        handle = await self._resolve()
        self._enter()
        try:
            for attempt in (1, 2):
                try:
                    return self._seen(raise_if_error(await self._answer(handle.generate.remote(request))))
                except RayActorError as e:
                    if attempt == 2:
                        raise unavailable(self.name, type(e).__name__) from None
                    log.warning("model %r replica died during a request (%s); retrying once", self.name, e)
                except APIError:
                    raise
                except Exception as e:
                    raise await self._error(e) from None
        finally:
            self.in_flight -= 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Progress | EncodedImages]:
        handle = await self._resolve()
        self._enter()
        counted, finished = True, False
        gen = handle.options(stream=True).generate_stream.remote(request)
        try:
            first = await self._answer(gen.__anext__(), gen)  # until a replica answers, it may have none
            async for item in _prepend(first, gen):
                if counted:  # a stream counts against the cap until its first event
                    self.in_flight -= 1
                    counted = False
                item = raise_if_error(item)
                if isinstance(item, EncodedImages):  # the last item
                    finished = True
                    yield self._seen(item)
                    return
                yield item
            finished = True
        except APIError:
            finished = True  # the model's own last word
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except StopAsyncIteration:
            raise unavailable(self.name, "the model's stream ended without an answer") from None
        except Exception as e:
            raise await self._error(e) from None
        finally:
            if counted:
                self.in_flight -= 1
            if not finished:  # the client went away: stop the model's work
                gen.cancel()

    async def _answer(self, awaitable, response=None):
        """``await awaitable`` (the call's ``response`` or its first item), raising the 503 of ``unavailable`` if
        the model has no replica left to answer it while it waits."""
        response = awaitable if response is None else response
        self._waiting.add(response)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_replicas())
        try:
            return await awaitable
        except (asyncio.CancelledError, TaskCancelledError):  # before or after Ray assigned it to a replica
            task = asyncio.current_task()
            if response in self._released and (task is None or not task.cancelling()):  # not the client's going
                raise unavailable(self.name, "no replica of its deployment is running") from None
            raise
        finally:
            self._waiting.discard(response)
            self._released.discard(response)

    async def _watch_replicas(self) -> None:
        """While requests wait, ask Serve every ``REPLICA_CHECK_PERIOD_S`` whether a replica of the model runs; when
        none does, cancel the waiting calls (``_answer`` turns them into 503s). Ray's router would hold them until
        a replica starts, which after a lost node may be never, or past every deadline."""
        while self._waiting:
            await asyncio.sleep(REPLICA_CHECK_PERIOD_S)
            if not self._waiting or self._handle is None:
                continue
            try:
                deployment = await self._deployment_status()
            except Exception:
                continue  # Serve could not say: leave the requests to their deadline
            states = deployment.replica_states
            if not any(states.get(s, 0) for s in ANSWERING_STATES):
                log.warning("model %r has no running replica (%s); answering %d waiting request(s) with 503",
                            self.name, dict(states), len(self._waiting))
                for response in list(self._waiting):
                    self._released.add(response)
                    response.cancel()

    async def _deployment_status(self):
        """Serve's status of the model's deployment (asks the controller, off the event loop)."""
        handle = self._handle
        status = await asyncio.to_thread(serve.status)
        return status.applications[handle.app_name].deployments[handle.deployment_name]

    async def ready(self) -> Readiness:
        try:
            handle = await self._resolve()
            return await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
        except APIError as e:
            return Readiness(False, e.message)
        except Exception as e:
            return Readiness(False, await self._why_unavailable(e))

    async def _error(self, e: Exception) -> APIError:
        """Ray's errors of a call to the model, as the API answers them."""
        if isinstance(e, BackPressureError):
            return APIError(503, f"model {self.name!r} is overloaded: its replicas' request queues are full; retry "
                                 "after the Retry-After delay", code="overloaded", retry_after=1.0)
        if isinstance(e, (RayActorError, DeploymentUnavailableError, asyncio.TimeoutError)):
            return unavailable(self.name, await self._why_unavailable(e))
        log.exception("request to model %r failed", self.name)
        return APIError(500, f"model {self.name!r} failed: {type(e).__name__}: {e}"[:1000], code="internal_error")

    async def _why_unavailable(self, e: Exception) -> str:
        """Ray's account of a deployment with no running replica (e.g. its health check naming a bad file)."""
        handle = self._handle
        try:
            deployment = await self._deployment_status()
            # Ray's message ends with the traceback of the failed constructor or health check: keep its last line.
            lines = [line for line in str(deployment.message).splitlines() if line.strip()]
            state = getattr(deployment.status, "value", deployment.status)
            return f"deployment {handle.deployment_name} is {state}: {lines[-1] if lines else 'no message'}"[:1000]
        except Exception:
            return f"no replica of model {self.name!r} answered: {e!r}"[:500]


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def deadline_left(request: GenerationRequest, grace_s: float) -> float:
    """Seconds until ``request``'s deadline plus ``grace_s``: how long the API waits for a model at most."""
    return request.deadline - time.time() + grace_s
