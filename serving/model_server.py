"""The per-model Ray Serve deployment: owns one Engine, runs requests through it and encodes the PNGs.

``ModelServer`` is called by the gateway through a deployment handle (``backend.RemoteModel``). ``ModelIngress`` is
the same replica serving the HTTP API itself for its one model (``app.build_model_app``): no gateway, no handle hop;
its ``Frontend`` reaches it in-process through ``LocalModel``. Either way the request arrives as the
``GenerationRequest`` the API built, and answers leave as ``EncodedImages``, ``Progress`` or an ``APIError`` value.

Batching happens inside the engine (step-level, across every admitted request), so this class takes requests one by
one (no ``@serve.batch``) and Ray's ``max_ongoing_requests`` is set high enough not to cap the engine's batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from dit_runtime.checkpoint import read_info
from dit_runtime.contract import random_student_contract
from dit_runtime.decoders import load_vae
from dit_runtime.engine import (DeadlineExceededError, Engine, EngineError, EngineStoppedError, GenerationRequest,
                                GenerationResult, InvalidRequestError, ModelSpec, QueueFullError,
                                RequestCancelledError, StepEvent, configure_compile, freeze_startup_heap)
from dit_runtime.engine.engine import settle_threadsafe
from dit_runtime.images import encode_base64, encode_threads
from dit_runtime.pauses import CollectionTimer, StallWatch

from .autoscaling import OCCUPANCY, QUEUE_WAIT
from .backend import EncodedImages, Progress, Readiness, ReplicaLoad, StartupTimes, raise_if_error
from .config import AuthArgs, Limits, ModelArgs
from .errors import APIError, invalid
from .frontend import Frontend
from .manifest import verify_checkpoint
from .metrics import EngineMetrics

log = logging.getLogger("ray.serve")

LOAD_REFRESH_S = 1.0  # how often the running/waiting gauges are refreshed while the engine is idle
# A garbage collection this long is logged as a warning (all are in dit_gc_pause_seconds): the engine's loop waits it
# out, so for a 4-step student it is several steps' time.
SLOW_COLLECTION_S = 0.02
# A hold of every Python thread this long is counted (dit_stalled_seconds_total): two of the interpreter's 5 ms
# switch intervals, so threads queued for their turn with the GIL count as well as one long holder. A second whose
# holds add up to STALL_WARN_S is logged; with `stall_stacks`, a hold of STALL_DUMP_S writes every thread's stack,
# while it lasts, to the replica's stderr: the holder's among them.
STALL_MIN_S = 0.01
STALL_WARN_S = 0.05
STALL_DUMP_S = 0.1
# Answers of at most this many pixels (all images of a request, no VAE) are encoded on the event loop instead: a
# 64x64 PNG takes about 0.1 ms to write, less than the wake-ups of a hand-off to a thread and back.
INLINE_ENCODE_MAX_PIXELS = 64 * 64


def stack_file():
    """Where the stall watch writes every thread's stack: this process's stderr, if it has a descriptor (faulthandler
    writes to one); else nowhere, said once."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        log.warning("stall_stacks is on, but this process's stderr has no file descriptor: no stacks are written")
        return None
    return sys.stderr


def process_age_seconds() -> float | None:
    """Seconds since this process started, from Linux's /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ModelServer:
    """One model size behind one Ray Serve deployment (wrapped with ``serve.deployment`` in ``app``)."""

    def __init__(self, args: ModelArgs, limits: Limits):
        before_init = process_age_seconds()
        self.name = args.name
        self.args = args
        self.limits = limits
        self.engine: Engine | None = None
        self.model_spec: ModelSpec | None = None
        self.load_error: str | None = None
        self._stopped = threading.Event()
        # Threads that turn finished requests' images into answers (PNG, JPEG or WebP, base64) off the event loop;
        # zlib, numpy and Pillow let go of the GIL for most of it, so they run in parallel when many requests finish
        # in one step. A large PNG's deflate slices go to a pool of their own, which an encoder thread waits on.
        threads = args.encode_threads or encode_threads()
        self._encoder = ThreadPoolExecutor(threads, thread_name_prefix="dit-encode")
        self._deflater = ThreadPoolExecutor(threads, thread_name_prefix="dit-png")
        self.metrics = EngineMetrics(args.name, args.max_batch_size)
        self.startup: StartupTimes | None = None
        self._collections = CollectionTimer(young_min_s=SLOW_COLLECTION_S, keep=10_000)
        self._stalls = StallWatch(min_s=STALL_MIN_S, dump_after_s=STALL_DUMP_S,
                                  file=stack_file() if args.stall_stacks else None, keep=10_000)
        source = args.checkpoint or f"random weights of preset {args.preset!r}"
        started = time.perf_counter()
        try:
            config = args.engine_config(limits)
            configure_compile(config)  # this replica's process builds this one engine
            verified = started
            if args.checkpoint is not None:
                if args.verify_manifest:
                    verify_checkpoint(args.checkpoint)  # before a byte of it is parsed
                verified = time.perf_counter()
                if read_info(args.checkpoint).space == "latent" and args.vae is None:
                    raise ValueError(f"{args.checkpoint} is a latent-space model: set `vae:` to a local diffusers "
                                     "AutoencoderKL folder (the VAE it was trained with) so its samples decode into "
                                     "images")
            vae = load_vae(args.vae) if args.vae is not None else None  # the engine moves it to its device
            vae_loaded = time.perf_counter()
            if args.checkpoint is not None:
                self.engine = Engine.from_checkpoint(args.checkpoint, config, on_step=self.metrics.on_step, vae=vae)
            else:
                sampling = random_student_contract() if args.random_weights_as == "student" else None
                self.engine = Engine.random_weights(args.preset, config, sampling=sampling,
                                                    on_step=self.metrics.on_step, vae=vae)
            self.model_spec = self.engine.spec  # the decoder's images: their side and channels
            self.engine.start()
        except Exception as e:  # reported by check_health and by every request, naming the file
            self.load_error = f"model {self.name!r} failed to load from {source}: {e}"
            log.error(self.load_error)
            return
        runner, done = self.engine.runner, time.perf_counter()
        decoder_warmup = self.engine.decoder_warmup_seconds
        self.startup = StartupTimes(before_init=before_init, verify=verified - started,
                                    load=done - vae_loaded - runner.compile_seconds - runner.capture_seconds
                                    - decoder_warmup,
                                    compile=runner.compile_seconds, capture=runner.capture_seconds,
                                    decoder=vae_loaded - verified + decoder_warmup, total=done - started)
        self.metrics.record_startup(self.startup)
        # Saved compiled programs, the steps' and a VAE decoder's: loaded, or compiled and saved for the next start.
        stores = [store for store in (runner.store, self.engine.decoder.store) if store is not None]
        programs = (f"; compiled programs: {sum(s.loaded for s in stores)} loaded, {sum(s.compiled for s in stores)} "
                    "compiled") if stores else ""
        log.info("model %r loaded from %s in %.1f s (%s%s)", self.name, source, self.startup.total,
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.startup.phases().items()), programs)
        # This replica's process is warm: no collection while serving walks the heap that start-up built.
        log.info("start-up heap collected and frozen in %.2f s", freeze_startup_heap())
        self._collections.start()  # what serving allocates is still collected: dit_gc_pause_seconds says how long
        self._stalls.start()
        threading.Thread(target=self._refresh_load, name="dit-load-gauges", daemon=True).start()

    # ---- Ray Serve hooks ----------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Fail (Ray then replaces the replica) when the model did not load or the engine loop died or is stuck."""
        if self.load_error is not None:
            raise RuntimeError(self.load_error)
        self.engine.health()

    def __del__(self):
        self._stopped.set()
        self._collections.stop()
        self._stalls.stop()
        self._encoder.shutdown(wait=False)
        self._deflater.shutdown(wait=False)
        if self.engine is not None:
            self.engine.stop()

    # ---- what the API calls (through a handle, or in this process through LocalModel) ---------------------------
    async def spec(self) -> ModelSpec | APIError:
        """What this model accepts, for the API to build requests with (an APIError when it did not load)."""
        return self.model_spec if self.model_spec is not None else self._not_loaded()

    async def ready(self) -> Readiness:
        """Readiness (loaded and the loop healthy) and this replica's load; never raises."""
        try:
            self.check_health()
        except Exception as e:
            return Readiness(False, str(e))
        stats = self.engine.stats()
        load = ReplicaLoad(stats.running_requests, stats.running_images, stats.waiting_requests,
                           stats.waiting_images, stats.steps_done, round(stats.estimated_wait_seconds, 4))
        return Readiness(True, None, load, startup=self.startup)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.QueueWaitPolicy`` scales on (Ray Serve calls this on each replica and averages it):
        the engine's estimated wait for a new one-image request, and the share of its batch rows in use."""
        if self.engine is None:
            return {}
        stats = self.engine.stats()
        return {QUEUE_WAIT: stats.estimated_wait_seconds, OCCUPANCY: stats.running_rows / stats.max_batch_size}

    async def generate(self, request: GenerationRequest) -> EncodedImages | APIError:
        """The request's images, encoded (or the APIError it failed with).

        Small answers are encoded on the event loop once the engine wakes it, since a round trip through a thread
        costs more than the encoding (``_encodes_inline``). Others go from the engine straight to an encoder thread,
        which wakes this coroutine once with the answer: one cross-thread hand-off instead of two (engine -> loop ->
        encoder -> loop)."""
        try:
            handle = self._submit(request, progress=False)
            inline = self._encodes_inline(request)
            if inline:
                answer = handle.result_async()
            else:
                loop = asyncio.get_running_loop()
                answer = loop.create_future()
                handle.on_finish(lambda outcome: self._encoder.submit(self._answer, outcome, request, loop, answer))
            try:
                done = await answer
            except asyncio.CancelledError:  # the client went away: free its batch rows at the next step
                handle.cancel()
                raise
            if inline:
                encoded = self._encode(done, request)
                asyncio.get_running_loop().call_soon(self.metrics.on_result, done)  # after the answer is sent
                return encoded
            return done
        except APIError as e:
            return e
        except (EngineError, InvalidRequestError) as e:
            return self._engine_error(e)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[Progress | EncodedImages | APIError]:
        """A Progress per step, then the EncodedImages; or an APIError, which ends the stream."""
        try:
            handle = self._submit(request)
        except APIError as e:
            yield e
            return
        except (EngineError, InvalidRequestError) as e:
            yield self._engine_error(e)
            return
        finished = False
        try:
            async for event in handle:
                if isinstance(event, StepEvent):
                    yield Progress(event.step, event.num_steps)
                elif isinstance(event, GenerationResult):
                    finished = True
                    yield await self._encoded(event, request)
            finished = True
        except EngineError as e:
            finished = True
            yield self._engine_error(e)
        finally:  # cancelled, or closed by a reader that went away: free the request's batch rows
            if not finished:
                handle.cancel()

    # ---- internals ----------------------------------------------------------------------------------------------
    def _not_loaded(self) -> APIError:
        return APIError(503, self.load_error, code="model_unavailable", retry_after=30)

    def _submit(self, request: GenerationRequest, progress: bool = True):
        if self.engine is None:
            raise self._not_loaded()
        request.encoding.check_channels(self.model_spec.channels)  # of the images answered (the VAE's, if any)
        return self.engine.submit(request, progress=progress)

    def _encodes_inline(self, request: GenerationRequest) -> bool:
        """Whether a request's answer is encoded on the event loop: at most ``INLINE_ENCODE_MAX_PIXELS`` pixels in
        all its images."""
        side = self.model_spec.resolution * request.upscale
        return request.num_images * side * side <= INLINE_ENCODE_MAX_PIXELS

    async def _encoded(self, result: GenerationResult, request: GenerationRequest) -> EncodedImages:
        """The answer of a streamed request's result (on the loop if small, else in an encoder thread)."""
        if self._encodes_inline(request):
            encoded = self._encode(result, request)
        else:
            encoded = await asyncio.get_running_loop().run_in_executor(self._encoder, self._encode, result, request)
        self.metrics.on_result(result)
        return encoded

    def _answer(self, outcome, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                answer: asyncio.Future) -> None:
        """(encoder thread) Settle ``answer`` with the encoded images of a finished request, or its error."""
        try:
            encoded = self._encode(outcome, request) if not isinstance(outcome, BaseException) else outcome
        except Exception as e:  # the request fails with it (500), like any other error of the route
            encoded = e
        settle_threadsafe(loop, answer, encoded)
        if not isinstance(outcome, BaseException):
            self.metrics.on_result(outcome)  # after the hand-off: off the answer's path

    def _encode(self, result: GenerationResult, request: GenerationRequest) -> EncodedImages:
        """The result's images as base64 files of the request's format."""
        return EncodedImages(b64_images=tuple(encode_base64(result.images, request.encoding, request.upscale,
                                                            self._deflater)),
                             output_format=request.encoding.format, seed=result.seed,
                             queue_seconds=result.queue_seconds, denoise_seconds=result.denoise_seconds,
                             engine_seconds=result.total_seconds, spec_fingerprint=self.model_spec.fingerprint)

    def _engine_error(self, exc: Exception) -> APIError:
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
        """Keep the running/waiting gauges true while no steps run (the per-step observer only fires when busy),
        the start's gauges exported, and the garbage collections recorded (off the threads they paused)."""
        while not self._stopped.wait(LOAD_REFRESH_S):
            try:
                stats = self.engine.stats()
                self.metrics.set_load(stats.running_requests, stats.waiting_requests)
                self.metrics.record_startup(self.startup)
                self._record_collections(self._collections.drain())
                self._record_stalls(self._stalls.drain())
            except Exception:  # gauges a second stale, not a thread gone for good
                log.exception("refreshing the replica's gauges failed")

    def _record_collections(self, pauses: list[tuple[float, int, float]]) -> None:
        """Garbage collections, (end, generation, seconds) each, into ``dit_gc_pause_seconds``; a warning for each
        slow one."""
        self.metrics.record_collections(pauses)
        for _, generation, seconds in pauses:
            if seconds >= SLOW_COLLECTION_S:
                log.warning("a garbage collection of generation %d held this replica's threads for %.0f ms (%d "
                            "objects frozen at start-up)", generation, 1e3 * seconds, gc.get_freeze_count())

    def _record_stalls(self, stalls: list[tuple[float, float]]) -> None:
        """Holds of every thread, (end, seconds) each, into ``dit_stalled_seconds_total``; one warning for them all
        when they add up to ``STALL_WARN_S``."""
        self.metrics.record_stalls(stalls)
        if sum(seconds for _, seconds in stalls) >= STALL_WARN_S:
            longest = max(seconds for _, seconds in stalls)
            where = ("; every thread's stack during it is in this worker's stderr log" if self._stalls.fd is not None
                     and longest >= self._stalls.dump_late_s else "")
            log.warning("this replica's Python threads were held off for %.0f ms in the last %.0f s (%d holds of "
                        "%.0f ms or more, the longest %.0f ms)%s", 1e3 * sum(s for _, s in stalls), LOAD_REFRESH_S,
                        len(stalls), 1e3 * self._stalls.min_s, 1e3 * longest, where)


class LocalModel:
    """A ``ModelServer`` in the API's own process, as a ``backend.ModelBackend`` (the model's own route)."""

    def __init__(self, server: ModelServer):
        self.server = server

    async def spec(self) -> ModelSpec:
        return raise_if_error(await self.server.spec())

    async def generate(self, request: GenerationRequest) -> EncodedImages:
        return raise_if_error(await self.server.generate(request))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Progress | EncodedImages]:
        async with contextlib.aclosing(self.server.generate_stream(request)) as events:
            async for item in events:
                yield raise_if_error(item)

    async def ready(self) -> Readiness:
        return await self.server.ready()


class ModelIngress(ModelServer):
    """One model serving the HTTP API from its own replicas: the request goes from Ray's HTTP ingress straight to
    the engine in this process, whose admission by time (``max_queue_wait_s``) answers 429 past the bound."""

    def __init__(self, args: ModelArgs, limits: Limits, auth: AuthArgs):
        self.frontend = Frontend({args.name: LocalModel(self)}, limits, auth)  # a bad key file fails before loading
        super().__init__(args, limits)

    def __serve_build_asgi_app__(self):
        """Ray Serve calls this after ``__init__``: the replica's own HTTP app (``serve.ingress()``, late-bound)."""
        return self.frontend.build_asgi_app()
