"""The inference engine: step-level continuously batched DiT sampling, usable with or without Ray.

    engine = Engine.from_checkpoint("checkpoints/digits-s.safetensors", EngineConfig()).start()
    handle = engine.submit(GenerationRequest.of(3, n=2, seed=1))
    for event in handle:            # StepEvent per step, then a GenerationResult
        ...

The scheduler (which images run next) is separate from the runner (model, buffers, compiled graphs); the
engine's loop is schedule -> execute -> update. ``Engine.generate`` runs that loop in the caller's thread.
A process that builds compiled engines calls ``configure_compile`` first (inductor's cache, Dynamo's limits).
"""

from ..request import GenerationRequest, InvalidRequestError, ModelSpec, RequestLimits, SamplingParams
from .engine import Engine, RequestHandle
from .fast_paths import FastPaths
from .process_settings import configure_compile, freeze_startup_heap
from .types import (DeadlineExceededError, EngineConfig, EngineError, EngineStats, EngineStoppedError,
                    GenerationResult, QueueFullError, RequestCancelledError, StepEvent, StepStats)

__all__ = ["Engine", "RequestHandle", "EngineConfig", "FastPaths", "GenerationRequest", "SamplingParams",
           "ModelSpec", "RequestLimits", "GenerationResult", "StepEvent", "StepStats", "EngineStats", "EngineError",
           "InvalidRequestError", "QueueFullError", "DeadlineExceededError", "RequestCancelledError",
           "EngineStoppedError", "configure_compile", "freeze_startup_heap"]
