"""The engine: a loop of schedule -> execute -> update on a background thread, and request handles.

``submit`` validates a request and queues it; the loop admits it at the next step boundary, runs one forward
pass per step over every admitted image, streams a StepEvent per step to the request's handle, and delivers the
images as soon as that request's last step is done. Handles work from threads (``for event in handle``) and from
asyncio (``async for event in handle``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from ..checkpoint import CheckpointInfo, default_class_names, load_model
from ..contract import SamplingContract
from ..decoders import Decoder, decoder_for
from ..model import DiTModel, count_parameters, get_preset
from ..request import GenerationRequest, ModelSpec
from .admission import Admission, AdmissionReplay, BusyStepTime
from .runner import COMPUTE_DTYPES, ModelRunner
from .scheduler import RequestState, Scheduler, StepPlan
from .types import (EngineConfig, EngineError, EngineStats, EngineStoppedError, GenerationResult, StepEvent,
                    StepStats)

log = logging.getLogger(__name__)

_END = object()  # marks the end of a handle's stream
_PENDING = object()  # a handle's outcome before the request ended


class RequestHandle:
    """A submitted request: iterate it for StepEvents and then its GenerationResult; ``cancel()`` to drop it."""

    def __init__(self, request_id: str, engine: "Engine", state: RequestState, progress: bool = True):
        self.request_id = request_id
        self.progress = progress  # False: no StepEvents, only the result (no per-step wake-ups of the caller)
        self._engine = engine
        self._state = state
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()
        self._finished = False
        self._outcome = _PENDING  # the GenerationResult or the exception, once the request ended
        self._callbacks: list[Callable] = []

    # called from the engine thread
    def _push(self, item) -> None:
        if isinstance(item, (GenerationResult, BaseException)):  # the outcome: callbacks first, then the stream
            with self._lock:
                self._outcome, callbacks, self._callbacks = item, self._callbacks, []
            for callback in callbacks:
                self._call(callback, item)
        self._items.put(item)
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    @staticmethod
    def _call(callback: Callable, outcome) -> None:
        try:
            callback(outcome)
        except Exception:  # a caller's bug must not stop the engine loop
            log.exception("a request's on_finish callback failed")

    def on_finish(self, callback: Callable[[GenerationResult | BaseException], None]) -> None:
        """Call ``callback(outcome)`` once, when the request ends: with its GenerationResult, or with the error it
        failed with. It runs on the engine thread before the outcome reaches the handle's stream (here, at once, if
        the request has already ended), so it must be quick: hand real work on to another thread, as
        ``ModelServer`` does with its PNGs (one hand-off, not a wake-up of a caller that then hands it on)."""
        with self._lock:
            if self._outcome is _PENDING:
                self._callbacks.append(callback)
                return
        self._call(callback, self._outcome)

    def cancel(self) -> None:
        """Drop the request; its images leave the batch at the next step boundary."""
        self._state.cancelled = True
        self._engine._cancel(self._state)

    def _unpack(self, item):
        if item is _END:
            self._finished = True
            return _END
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def __iter__(self):
        while not self._finished:
            item = self._unpack(self._items.get())
            if item is _END:
                return
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        while not self._finished:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                event = asyncio.Event()
                with self._lock:
                    self._waiters.append((loop, event))
                try:
                    if self._items.empty():  # re-check after registering: no lost wake-ups
                        await event.wait()
                finally:
                    with self._lock:
                        self._waiters.remove((loop, event))
                continue
            item = self._unpack(item)
            if item is _END:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the images are ready (raises the request's error, or TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._unpack(self._items.get(timeout=remaining))
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
            if isinstance(item, GenerationResult):
                return item

    async def result_async(self) -> GenerationResult:
        """Wait for the images without blocking the event loop (one wake-up of the loop, at the end)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.on_finish(lambda outcome: settle_threadsafe(loop, done, outcome))
        return await done


def settle_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome) -> None:
    """From any thread: resolve ``future`` on ``loop`` with a result, or with an exception. A no-op once the waiter
    gave up (the future is cancelled, or its loop has closed)."""
    try:
        loop.call_soon_threadsafe(_settle, future, outcome)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class _Pending:
    """A finished request's images (and a latent model's samples) on their way to the host."""

    state: RequestState
    images: torch.Tensor
    latents: torch.Tensor | None
    event: torch.cuda.Event | None
    finished_at: float


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host: from a GPU into pinned memory without waiting (record an event after it), else ``t``."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Engine:
    """Step-level continuously batched DiT sampling for one model on one device."""

    def __init__(self, model: DiTModel, info: CheckpointInfo, config: EngineConfig = EngineConfig(),
                 on_step: Callable[[StepStats], None] | None = None, vae: torch.nn.Module | None = None):
        """``vae``: a latent-space model's diffusers ``AutoencoderKL`` (any device and dtype; it moves to the
        engine's); without one a latent model answers a view of its latents (``decoders.LatentView``)."""
        self.config = config
        self.info = info
        if vae is not None:
            vae = vae.to(config.device, COMPUTE_DTYPES[config.precision])
        saved = config.compile_cache_dir and config.compile_programs and config.warmup  # as the runner's programs
        self.decoder: Decoder = decoder_for(info, vae, max_batch=config.decode_batch_size,
                                            compile=config.compile_decoder, cuda_graphs=config.decoder_cuda_graphs,
                                            compile_options=config.decoder_compile_options,
                                            program_dir=os.path.join(config.compile_cache_dir, "programs")
                                            if saved else None)
        # On a GPU the decoder and the copy to the host run on a stream of their own, beside the next step.
        cuda = torch.device(config.device).type == "cuda"
        self._decode_stream = torch.cuda.Stream(torch.device(config.device)) if cuda else None
        self.spec = self._spec(model, info, config, self.decoder)
        clip = config.clip_denoised if config.clip_denoised is not None else info.space == "pixel"
        self.runner = ModelRunner(model, config, clip_denoised=clip,
                                  num_train_timesteps=info.sampling.num_train_timesteps)
        self.scheduler = Scheduler(config.max_batch_size, config.buckets, model.config.null_class,
                                   cache_rows=config.cache_rows, compute_buckets=config.compute_buckets)
        self.on_step = on_step
        self._handles: dict[int, RequestHandle] = {}  # by id() of the request's state
        self._inbox: list[RequestState] = []
        self._inbox_images = 0
        self._cancelled: list[RequestState] = []  # cancelled since the loop's last turn
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._last_step_at: float | None = None
        self._steps_done = 0
        self._pending: list[_Pending] = []
        self.warmup_seconds: dict[int, float] = self.runner.warm_up() if config.warmup else {}
        # A compiled decoder's programs, built now rather than at the first requests that finish together.
        self.decoder_warmup_seconds = self.decoder.warm_up(self.runner.image_shape) if config.warmup else 0.0
        # The busy step time starts from the warm-up's step of the largest bucket, every row running the blocks.
        step_time = BusyStepTime(config.max_batch_size, self.runner.full_step_seconds if config.warmup else None)
        self.admission = Admission(self._replay_queue, self._lock, step_time, config.max_queue_size,
                                   config.max_queue_wait_s)

    # ---- construction -----------------------------------------------------------------------------------------
    @staticmethod
    def _spec(model: DiTModel, info: CheckpointInfo, config: EngineConfig, decoder: Decoder) -> ModelSpec:
        """What this engine accepts and answers: the checkpoint's sampling contract with the config's defaults merged
        over its own (``SamplingContract.with_overrides``), a default the limits refuse failing here, at start-up;
        images of the decoder's side and channels."""
        try:
            contract = info.sampling.with_overrides(num_inference_steps=config.default_inference_steps,
                                                    cache=config.default_cache)
        except ValueError as e:
            raise ValueError(f"the engine config's defaults do not fit this checkpoint: {e}") from None
        defaults, cfg, limits = contract.defaults, model.config, config.limits
        for name, value, bound in (("num_inference_steps", defaults.num_inference_steps, limits.max_inference_steps),
                                   ("guidance_scale", defaults.guidance_scale, limits.max_guidance_scale)):
            if value > bound:
                fix = " or set default_inference_steps" if name == "num_inference_steps" else ""
                raise ValueError(f"the checkpoint's default {name} ({value:g}) is above the limit ({bound:g}): raise "
                                 f"the limit{fix}")
        return ModelSpec(class_names=tuple(info.class_names), resolution=cfg.input_size * decoder.upsampling,
                         channels=decoder.channels,
                         space=info.space, parameters=count_parameters(model), max_rows=config.max_batch_size,
                         contract=contract, limits=limits, max_cache_rows=config.cache_rows,
                         precision=config.precision)

    @classmethod
    def from_checkpoint(cls, path, config: EngineConfig = EngineConfig(), **kwargs) -> "Engine":
        """Load a safetensors checkpoint (built on the meta device, weights assigned) and warm up."""
        model, info = load_model(path, device=config.device)
        return cls(model, info, config, **kwargs)

    @classmethod
    def random_weights(cls, preset: str, config: EngineConfig = EngineConfig(), seed: int = 0,
                       sampling: SamplingContract | None = None, **kwargs) -> "Engine":
        """An engine over a randomly initialised preset: for benchmarks, never for serving images. ``sampling``: the
        contract to serve it under (a student's gives the model a guidance embedding); default a teacher's."""
        cfg = get_preset(preset)
        if sampling is not None and sampling.guidance == "embedded":
            cfg = replace(cfg, guidance_embed=True)
        device = torch.device(config.device)
        # The initialisers draw from the default generator of the device they fill: seeded inside a fork, so the
        # process's random streams are as they were once the model is built.
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            with torch.device(device):
                model = DiTModel.from_config(cfg)
            for block in model.blocks:  # adaLN-Zero starts as the identity; give the blocks work to do
                torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
        info = CheckpointInfo(config=cfg, class_names=default_class_names(cfg.num_classes), space="latent",
                              training={"note": f"random weights ({preset}), for benchmarks"}, sampling=sampling)
        return cls(model, info, config, **kwargs)

    # ---- public API -------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, request: GenerationRequest, progress: bool = True) -> RequestHandle:
        """Check and queue a request; raises InvalidRequestError, QueueFullError or EngineStoppedError.

        With ``progress=False`` the handle yields only the result: a caller that waits for the images alone is
        not woken once per step (under load that is a wake-up per request per step, on the caller's event loop).
        """
        self._raise_if_stopped()
        return self._enqueue(request, progress, bounded=True)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to the end in the calling thread and return their results in order (raising the first
        failure): the offline entry point of dit-sample, dit-eval and the benchmarks, as vLLM's ``LLM.generate``.
        Everything given is queued at once, past ``max_queue_size``; ``on_step`` sees every step. Only for an
        engine whose loop was not started (``start()`` gives the loop its own thread: use ``submit`` there)."""
        if self._thread is not None:
            raise RuntimeError("generate() runs the engine loop in the calling thread, but this engine's loop runs "
                               "on its own thread (start() was called): use submit()")
        self._raise_if_stopped()
        handles = [self._enqueue(request, progress=False, bounded=False) for request in requests]
        while self._run_once():
            pass
        self._deliver_pending(block=True)
        return [handle.result(timeout=0) for handle in handles]

    def _enqueue(self, request: GenerationRequest, progress: bool, bounded: bool) -> RequestHandle:
        self.spec.check(request)
        seed = request.sampling.seed_or_draw()
        state = RequestState(request=request, seed=seed, submitted_at=time.monotonic())
        with self._lock:
            if bounded:
                waiting = self.scheduler.waiting_images + self._inbox_images
                self.admission.check(state.rows, state.num_images, waiting, request.deadline)
            handle = RequestHandle(request.request_id, self, state, progress)
            self._handles[id(state)] = handle
            self._inbox.append(state)
            self._inbox_images += state.num_images
            self.admission.queued(state.rows, request.sampling.num_inference_steps)
        self._wake()
        return handle

    def estimated_wait(self, rows: int) -> float:
        """Seconds a request of ``rows`` rows queued now would wait for admission (``Admission.estimated_wait``)."""
        return self.admission.estimated_wait(rows)

    def _replay_queue(self) -> AdmissionReplay:
        """The admission replay of the batch and the queue (``Admission``'s source). Called under the lock."""
        return self.scheduler.replay(list(self.scheduler.running), list(self.scheduler.waiting) + self._inbox)

    def stats(self) -> EngineStats:
        with self._lock:
            inbox = list(self._inbox)
        waiting = list(self.scheduler.waiting) + inbox
        running = list(self.scheduler.running)
        since = None if self._last_step_at is None else time.monotonic() - self._last_step_at
        return EngineStats(running_requests=len(running), running_images=sum(s.num_images for s in running),
                           running_rows=sum(s.rows for s in running),
                           waiting_requests=len(waiting), waiting_images=sum(s.num_images for s in waiting),
                           max_batch_size=self.config.max_batch_size, max_queue_size=self.config.max_queue_size,
                           steps_done=self._steps_done, seconds_since_last_step=since,
                           estimated_wait_seconds=self.estimated_wait(self.spec.defaults.rows_per_image))

    def health(self) -> None:
        """Raise EngineStoppedError when the loop died, was stopped, or made no step for ``stall_timeout`` s."""
        self._raise_if_stopped()
        if self._thread is None:
            raise EngineStoppedError("the engine loop was never started")
        stats = self.stats()
        busy = stats.running_requests or stats.waiting_requests
        if busy and stats.seconds_since_last_step is not None and \
                stats.seconds_since_last_step > self.config.stall_timeout:
            raise EngineStoppedError(f"the engine loop is stuck: no step finished in "
                                     f"{stats.seconds_since_last_step:.0f} s with work pending")

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()

    def _cancel(self, state: RequestState) -> None:
        with self._lock:
            self._cancelled.append(state)
        self._wake()

    def _raise_if_stopped(self) -> None:
        if self._failure is not None:
            raise EngineStoppedError(f"the engine loop died: {self._failure!r}")
        if self._stopping:
            raise EngineStoppedError("the engine is stopped")

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self._run_once():
                    self._deliver_pending(block=True)
                    self._wakeup.wait(timeout=0.05)
                    self._wakeup.clear()
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop failed")
            self._failure = e
            for state, _ in self.scheduler.abort_all(EngineStoppedError(f"the engine loop died: {e!r}")):
                self._finish(state, EngineStoppedError(f"the engine loop died: {e!r}"))
            return
        error = EngineStoppedError("the engine was stopped")
        with self._lock:  # what was submitted as it stopped fails with the rest
            for state in self._inbox:
                self.scheduler.add(state)
            self._inbox, self._inbox_images = [], 0
        self._finish_all(self.scheduler.abort_all(error))
        self._deliver_pending(block=True)

    def _run_once(self) -> bool:
        """One turn of the loop: deliver what is ready, take in new requests, run a step. False when idle."""
        self._deliver_pending(block=False)
        with self._lock:  # the queue's order unchanged: the admission replay stays true
            for state in self._inbox:
                self.scheduler.add(state)
            for state in self._cancelled:  # after the inbox: a request cancelled before its first turn is queued
                self.scheduler.cancel(state)
            self._inbox, self._inbox_images, self._cancelled = [], 0, []
        if not self.scheduler.has_work():
            return False
        self._step()
        with self._lock:
            self.admission.stepped()
        return True

    @torch.no_grad()  # not inference mode: the runner's loaded programs check the grad mode (programs.py)
    def _step(self) -> None:
        """One step: schedule -> execute -> update, then the step's stats."""
        start = time.monotonic()
        plan = self.scheduler.schedule(start)
        self._finish_all(plan.aborted)
        if plan.layout is None or not self._execute(plan):
            return
        finished = self.scheduler.update(plan)
        self._stream(plan.running, finished)
        self._record_step(plan, start)

    def _execute(self, plan: StepPlan) -> bool:
        """Run ``plan`` on the runner; False when its forward failed (its requests failed with it)."""
        try:
            self.runner.execute(plan.layout.bucket, plan.compute_bucket, plan.updated_bucket,
                                forecast=plan.compute_rows < plan.layout.rows, admitted=plan.admitted,
                                layout=plan.layout if plan.layout_changed else None)
        except Exception as e:  # a failed forward fails the requests in it, not the engine or the queue
            log.exception("engine step failed")
            self._finish_all(self.scheduler.abort_running(EngineError(f"generation failed: {e}")))
            return False
        return True

    def _stream(self, running: list[RequestState], finished: list[RequestState]) -> None:
        """A StepEvent to each running request's handle; the finished requests' samples on their way to the host."""
        for state in running:
            handle = self._handles.get(id(state))
            if handle is not None and handle.progress and state.admitted_at is not None:
                handle._push(StepEvent(state.request.request_id, state.step,
                                       state.request.sampling.num_inference_steps))
        if finished:
            self._read(finished)

    def _record_step(self, plan: StepPlan, start: float) -> None:
        """Count the step, time it for admission, and hand its StepStats to ``on_step``."""
        now = time.monotonic()
        layout = plan.layout
        self.admission.step_time.observe(layout.rows, start, now)
        self._last_step_at = now
        self._steps_done += 1
        if self.on_step is not None:
            wait = self.admission.reported_wait(now, self.spec.defaults.rows_per_image)
            self.on_step(StepStats(duration_seconds=now - start, rows=layout.rows, bucket=layout.bucket,
                                   images=layout.images, compute_rows=plan.compute_rows,
                                   compute_bucket=plan.compute_bucket, rows_by_cache=plan.rows_by_cache,
                                   running_requests=len(self.scheduler.running),
                                   waiting_requests=len(self.scheduler.waiting),
                                   waiting_images=self.scheduler.waiting_images, estimated_wait_seconds=wait))

    def _read(self, finished: list[RequestState]) -> None:
        """The finished requests' images on their way to the host: the step's samples gathered, decoded as one batch
        and copied once. On a GPU this is queued on the decode stream and the loop goes on; an event says when the
        pixels are on the host. A failed decode fails those requests, not the engine."""
        now = time.monotonic()
        samples = self.runner.gather_samples([slot for state in finished for slot in state.slots])
        stream = self._decode_stream
        if stream is not None:  # after the step that wrote them; kept alive until the decode stream is done
            stream.wait_stream(torch.cuda.current_stream(stream.device))
            samples.record_stream(stream)
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                images = to_host(self.decoder(samples))
                latents = to_host(samples) if self.info.space == "latent" else None
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
        except Exception as e:
            log.exception("decoding failed")
            self._finish_all([(state, EngineError(f"decoding the images failed: {e}")) for state in finished])
            return
        start = 0
        for state in finished:
            end = start + state.num_images
            self._pending.append(_Pending(state=state, images=images[start:end],
                                          latents=latents[start:end] if latents is not None else None,
                                          event=event, finished_at=now))
            start = end

    def _deliver_pending(self, block: bool) -> None:
        keep = []
        for p in self._pending:
            if p.event is not None and not p.event.query():
                if not block:
                    keep.append(p)
                    continue
                p.event.synchronize()
            self._deliver(p)
        self._pending = keep

    def _deliver(self, p: _Pending) -> None:
        state = p.state
        admitted = state.admitted_at if state.admitted_at is not None else state.submitted_at
        result = GenerationResult(request_id=state.request.request_id, images=p.images.numpy(), seed=state.seed,
                                  queue_seconds=admitted - state.submitted_at,
                                  denoise_seconds=p.finished_at - admitted,
                                  total_seconds=time.monotonic() - state.submitted_at,
                                  latents=p.latents.float().numpy() if p.latents is not None else None)
        self._finish(state, result)

    def _finish_all(self, outcomes: list[tuple[RequestState, EngineError]]) -> None:
        for state, err in outcomes:
            self._finish(state, err)

    def _finish(self, state: RequestState, outcome) -> None:
        handle = self._handles.pop(id(state), None)
        if handle is not None:
            handle._push(outcome)
            handle._push(_END)

