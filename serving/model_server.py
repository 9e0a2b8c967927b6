"""The per-model Ray Serve deployment: owns one Engine, turns API payloads into engine requests, encodes PNGs.

``ModelServer`` is called by the gateway through a deployment handle. ``ModelIngress`` is the same replica serving
the HTTP API itself, for its one model (``app.build_model_app``): no gateway, no handle hop. Either way the API in
front (``frontend.Frontend``) has validated the payload and set its deadline.

Batching happens inside the engine (step-level, across every admitted request), so this class takes requests one by
one (no ``@serve.batch``) and Ray's ``max_ongoing_requests`` is set high enough not to cap the engine's batch.
Errors come back as ``{"error": APIError.to_dict()}`` values rather than raised exceptions, so the gateway gets the
exact status, field and message.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import numpy as np

from dit_runtime.engine import (DeadlineExceededError, Engine, EngineError, EngineStoppedError, GenerationRequest,
                                GenerationResult, InvalidRequestError, QueueFullError, RequestCancelledError,
                                StepEvent)
from dit_runtime.engine.engine import settle_threadsafe

from dit_runtime.images import encode_png
from dit_runtime.vae import LatentDecoder

from ray import serve

from .config import AuthArgs, Limits, ModelArgs
from .errors import APIError, invalid
from .frontend import DEADLINE_GRACE_S, Frontend, make_api
from .manifest import verify_checkpoint
from .metrics import EngineMetrics
from .protocol import DEADLINE_KEY, upscale_factor

log = logging.getLogger("ray.serve")

LOAD_REFRESH_S = 1.0  # how often the running/waiting gauges are refreshed while the engine is idle
# Threads that turn finished requests into answers (VAE decode, PNG, base64) off the event loop; zlib, numpy and
# torch release the GIL for most of it, so a few run in parallel when many requests finish in one step.
ENCODE_THREADS = 4
# Answers of at most this many pixels (all images of a request, no VAE) are encoded on the event loop instead: a
# 64x64 PNG takes about 0.1 ms to write, less than the wake-ups of a hand-off to a thread and back.
INLINE_ENCODE_MAX_PIXELS = 64 * 64


class ModelServer:
    """One model size behind one Ray Serve deployment (wrapped with ``serve.deployment`` in ``app.build_app``)."""

    def __init__(self, args: ModelArgs, limits: Limits):
        self.name = args.name
        self.args = args
        self.limits = limits
        self.engine: Engine | None = None
        self.decoder: LatentDecoder | None = None
        self.load_error: str | None = None
        self._stopped = threading.Event()
        self._encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="dit-encode")
        self.metrics = EngineMetrics(args.name, args.max_batch_size)
        source = args.checkpoint or f"random weights of preset {args.preset!r}"
        started = time.perf_counter()
        try:
            config = args.engine_config(limits)
            if args.checkpoint is not None:
                if args.verify_manifest:
                    verify_checkpoint(args.checkpoint)  # before a byte of it is parsed
                self.engine = Engine.from_checkpoint(args.checkpoint, config, on_step=self.metrics.on_step)
            else:
                self.engine = Engine.random_weights(args.preset, config, on_step=self.metrics.on_step)
            self.decoder = self._decoder(args, self.engine.info)
            self.engine.start()
        except Exception as e:  # reported by check_health and by every request, naming the file
            self.load_error = f"model {self.name!r} failed to load from {source}: {e}"
            log.error(self.load_error)
            return
        log.info("model %r loaded from %s in %.1f s", self.name, source, time.perf_counter() - started)
        threading.Thread(target=self._refresh_load, name="dit-load-gauges", daemon=True).start()

    @staticmethod
    def _decoder(args: ModelArgs, info) -> LatentDecoder | None:
        """The VAE of a latent-space checkpoint; random-weight benchmarks may go without (a view of the latents)."""
        if info.space != "latent":
            return None
        if args.vae is None:
            if args.checkpoint is None:
                return None
            raise ValueError(f"{args.checkpoint} is a latent-space model: set `vae:` to a local diffusers "
                             "AutoencoderKL folder (the VAE it was trained with) so its samples decode into images")
        return LatentDecoder.load(args.vae, info.latent_scale, device=args.device)

    # ---- Ray Serve hooks ----------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Fail (Ray then replaces the replica) when the model did not load or the engine loop died or is stuck."""
        if self.load_error is not None:
            raise RuntimeError(self.load_error)
        self.engine.health()

    def __del__(self):
        self._stopped.set()
        self._encoder.shutdown(wait=False)
        if self.engine is not None:
            self.engine.stop()

    # ---- called by the API in front (the gateway through a handle, or ModelIngress in this process) --------------
    async def describe(self) -> dict:
        """This model's entry of GET /v1/models (a ModelCard as a dict)."""
        created = int(time.time())
        if self.engine is None:
            return {"id": self.name, "created": created, "status": "unavailable", "detail": self.load_error}
        info, cfg = self.engine.info, self.engine.info.config
        side = cfg.input_size
        return {"id": self.name, "created": created, "status": "ready", "resolution": [side, side],
                "channels": cfg.in_channels, "space": info.space, "num_classes": cfg.num_classes,
                "class_names": list(info.class_names), "supports_guidance": cfg.supports_guidance,
                "parameters": sum(p.numel() for p in self.engine.runner.model.parameters()),
                "max_batch_size": self.args.max_batch_size}

    async def ready(self) -> dict:
        """Readiness (loaded and the loop healthy) and this replica's load; never raises."""
        try:
            self.check_health()
        except Exception as e:
            return {"ready": False, "detail": str(e)}
        return {"ready": True, "detail": None, "load": self.load()}

    def load(self) -> dict:
        """The engine's load on this replica (requests and images running and waiting, steps done)."""
        stats = self.engine.stats()
        return {"running_requests": stats.running_requests, "running_images": stats.running_images,
                "waiting_requests": stats.waiting_requests, "waiting_images": stats.waiting_images,
                "steps_done": stats.steps_done}

    def replica_pid(self) -> int:
        """This replica's process id (not routed over HTTP; fault-injection tests kill it)."""
        return os.getpid()

    async def generate(self, payload: dict) -> dict:
        """Unary generation: ``{"result": ImagesResponse dict}`` or ``{"error": APIError dict}``.

        Small answers are encoded on the event loop once the engine wakes it, since a round trip through a thread
        costs more than the encoding (``_encodes_inline``). Others, and every VAE decode, go from the engine straight
        to an encoder thread, which wakes this coroutine once with the answer: one cross-thread hand-off instead of
        two (engine -> loop -> encoder -> loop)."""
        try:
            handle, scale = self._submit(payload, progress=False)
            inline = self._encodes_inline(payload.get("n", 1), scale)
            if inline:
                answer = handle.result_async()
            else:
                loop = asyncio.get_running_loop()
                answer = loop.create_future()
                handle.on_finish(lambda outcome: self._encoder.submit(self._answer, outcome, scale, loop, answer))
            try:
                done = await answer
            except asyncio.CancelledError:  # the client went away: free its batch rows at the next step
                handle.cancel()
                raise
            if inline:
                response = self._images_response(done, scale)
                asyncio.get_running_loop().call_soon(self.metrics.on_result, done)  # after the answer is sent
                return {"result": response}
            return {"result": done}
        except APIError as e:
            return {"error": e.to_dict()}
        except EngineError as e:
            return {"error": self._engine_error(e).to_dict()}

    async def generate_stream(self, payload: dict) -> AsyncIterator[dict]:
        """Streaming generation: ``{"progress": {...}}`` per step, then ``{"result": ...}``, or ``{"error": ...}``."""
        try:
            handle, scale = self._submit(payload)
        except APIError as e:
            yield {"error": e.to_dict()}
            return
        except EngineError as e:
            yield {"error": self._engine_error(e).to_dict()}
            return
        finished = False
        try:
            async for event in handle:
                if isinstance(event, StepEvent):
                    yield {"progress": {"step": event.step, "num_steps": event.num_steps}}
                elif isinstance(event, GenerationResult):
                    yield {"result": await self._response(event, scale)}
            finished = True
        except EngineError as e:
            finished = True
            yield {"error": self._engine_error(e).to_dict()}
        finally:  # cancelled, or closed by a reader that went away: free the request's batch rows
            if not finished:
                handle.cancel()

    # ---- internals ----------------------------------------------------------------------------------------------
    def _submit(self, payload: dict, progress: bool = True):
        """Map a validated API payload to an engine request and submit it; raises APIError / EngineError."""
        if self.engine is None:
            raise APIError(503, self.load_error, code="model_unavailable", retry_after=30)
        info, cfg = self.engine.info, self.engine.info.config
        if payload.get("class_label") is not None:
            raw = payload["class_label"]
            labels = raw if isinstance(raw, list) else [raw]
            param = "class_label"
        else:
            labels, param = [payload["prompt"]], "prompt"
            digits = payload["prompt"].strip()
            if digits.isdigit() and not digits.isascii():  # int() would read '٣' as 3 and fail on '³'
                raise invalid("prompt", f"prompt {payload['prompt']!r}: write class ids with the digits 0-9, or "
                                        f"give a class name")
        try:
            class_ids = [info.class_id(label) for label in labels]
        except ValueError as e:
            raise invalid(param, f"{param}: {e}") from None
        scale = upscale_factor(payload.get("size"), cfg.input_size, cfg.input_size, self.limits.max_image_side)
        defaults = info.default_sampling  # what dit-eval measured for this checkpoint
        guidance = payload.get("guidance_scale")
        if guidance is None:
            guidance = defaults["guidance_scale"]
        n = payload.get("n", 1)
        rows = n * (2 if guidance != 1.0 else 1)  # a guided image runs a conditional and a null row
        if rows > self.args.max_batch_size:
            raise invalid("n", f"n={n} with guidance needs {rows} batch rows but model {self.name!r} runs at most "
                               f"{self.args.max_batch_size}: ask for n <= {self.args.max_batch_size // (rows // n)}")
        request = GenerationRequest(
            class_labels=class_ids, num_images=n, seed=payload.get("seed"),
            num_inference_steps=(payload.get("num_inference_steps") or self.limits.default_inference_steps
                                 or defaults["num_inference_steps"]),
            sampler=payload.get("sampler") or defaults["sampler"], guidance_scale=float(guidance),
            deadline=time.monotonic() + self._remaining(payload))
        return self.engine.submit(request, progress=progress), scale

    def _remaining(self, payload: dict) -> float:
        """Seconds left of the request's deadline, which runs from its arrival at the API (wall clock, so it holds
        across processes); never more than the configured timeout, whatever the clocks say."""
        timeout = self.limits.request_timeout_s
        deadline = payload.get(DEADLINE_KEY)
        return timeout if deadline is None else min(timeout, float(deadline) - time.time())

    def _encodes_inline(self, n: int, scale: int) -> bool:
        """Whether a request's answer is encoded on the event loop: no VAE to run and at most
        ``INLINE_ENCODE_MAX_PIXELS`` pixels in all its images (docs/benchmarks.md, "Session 5")."""
        side = self.engine.info.config.input_size * scale
        return self.decoder is None and n * side * side <= INLINE_ENCODE_MAX_PIXELS

    async def _response(self, result: GenerationResult, scale: int) -> dict:
        """The answer of a streamed request's result (on the loop if small, else in an encoder thread)."""
        n = len(result.images if result.images is not None else result.latents)
        if self._encodes_inline(n, scale):
            response = self._images_response(result, scale)
        else:
            response = await asyncio.get_running_loop().run_in_executor(self._encoder, self._images_response,
                                                                         result, scale)
        self.metrics.on_result(result)
        return response

    def _answer(self, outcome, scale: int, loop: asyncio.AbstractEventLoop, answer: asyncio.Future) -> None:
        """(encoder thread) Settle ``answer`` with the ImagesResponse dict of a finished request, or its error."""
        try:
            response = self._images_response(outcome, scale) if not isinstance(outcome, BaseException) else outcome
        except Exception as e:  # the request fails with it (500), like any other error of the route
            response = e
        settle_threadsafe(loop, answer, response)
        if not isinstance(outcome, BaseException):
            self.metrics.on_result(outcome)  # after the hand-off: off the answer's path

    def _images_response(self, result: GenerationResult, scale: int) -> dict:
        """The ImagesResponse dict of a finished request (in an encoder thread, or on the loop when small)."""
        encoded = self._pngs(result, scale)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in encoded], "seed": result.seed,
                "timings": {"queue_seconds": result.queue_seconds, "denoise_seconds": result.denoise_seconds,
                            "engine_seconds": result.total_seconds}}

    def _pngs(self, result: GenerationResult, scale: int) -> list[str]:
        """The result's images as base64 PNGs: decoded by the VAE first for a latent model that has one."""
        if result.images is not None:
            images = result.images
        elif self.decoder is not None:
            images = self.decoder(result.latents)
        else:
            images = latents_to_uint8(result.latents)
        return encode_pngs(images, scale)

    def _engine_error(self, exc: EngineError) -> APIError:
        """Map the engine's errors: bad field 400, queue full 429, deadline 504, cancelled 499, stopped 503."""
        if isinstance(exc, InvalidRequestError):
            return invalid(exc.field, str(exc))
        if isinstance(exc, QueueFullError):
            return APIError(429, f"model {self.name!r} is at capacity: {exc}", code="queue_full",
                            retry_after=exc.retry_after)
        if isinstance(exc, DeadlineExceededError):
            return APIError(504, f"the request did not finish within {self.limits.request_timeout_s:g} s on model "
                                 f"{self.name!r}: {exc}", code="deadline_exceeded")
        if isinstance(exc, RequestCancelledError):
            return APIError(499, f"the request was cancelled: {exc}", code="cancelled")
        if isinstance(exc, EngineStoppedError):
            return APIError(503, f"model {self.name!r} is not serving: {exc}", code="model_unavailable",
                            retry_after=5)
        return APIError(500, f"model {self.name!r} failed to generate: {exc}", code="engine_error")

    def _refresh_load(self) -> None:
        """Keep the running/waiting gauges true while no steps run (the per-step observer only fires when busy)."""
        while not self._stopped.wait(LOAD_REFRESH_S):
            stats = self.engine.stats()
            self.metrics.set_load(stats.running_requests, stats.waiting_requests)


def encode_pngs(images: np.ndarray, scale: int = 1) -> list[str]:
    """uint8 (n, H, W, C) -> base64 PNGs (C = 1 grey, 3 RGB, 4 RGBA), upscaled ``scale`` times (nearest pixel)."""
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return [base64.b64encode(encode_png(image)).decode("ascii") for image in images]


def latents_to_uint8(latents: np.ndarray) -> np.ndarray:
    """(n, C, H, W) latents of a model served without a VAE -> uint8 (n, H, W, C): a view of the latent, for
    benchmarks of latent-space models (random weights); real images need the VAE decoder."""
    x = np.clip(latents, -1.0, 1.0)
    return np.round((x + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


model_api = make_api("Class-conditional DiT image generation behind OpenAI's images API (one model, served by "
                     "its own replicas).")


# Last in the module: serve.ingress pickles the app when it is decorated, so every helper it uses must exist.
@serve.ingress(model_api)
class ModelIngress(ModelServer, Frontend):
    """One model serving the HTTP API from its own replicas: the request goes from Ray's HTTP ingress straight to
    the engine in this process. Its queue bound (``max_queue_size``) is the admission control: past it, 429."""

    def __init__(self, args: ModelArgs, limits: Limits, auth: AuthArgs):
        Frontend.__init__(self, [args.name], limits, auth)  # first: a bad API key file fails before the model loads
        ModelServer.__init__(self, args, limits)

    async def _call_unary(self, model: str, payload: dict) -> dict:
        # The engine answers 504 at the deadline itself; this bounds an engine that cannot answer at all.
        remaining = payload[DEADLINE_KEY] - time.time() + DEADLINE_GRACE_S
        return await asyncio.wait_for(self.generate(payload), remaining)

    def _open_stream(self, model: str, payload: dict):
        return self.generate_stream(payload)

    async def _describe(self, model: str) -> dict:
        return await self.describe()

    async def _ready(self, model: str) -> dict:
        return await self.ready()
