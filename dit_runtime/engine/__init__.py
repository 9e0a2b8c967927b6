"""The inference engine: step-level continuously batched DiT sampling, usable with or without Ray.

    engine = Engine.from_checkpoint("checkpoints/digits-s.safetensors", EngineConfig()).start()
    handle = engine.submit(GenerationRequest(class_labels=[3], num_images=2, seed=1))
    for event in handle:            # StepEvent per step, then a GenerationResult
        ...

The scheduler (which images run next) is separate from the runner (model, buffers, compiled graphs); the
engine's loop is schedule -> execute -> update.
"""

from .engine import Engine, RequestHandle
from .types import (DeadlineExceededError, EngineConfig, EngineError, EngineStats, EngineStoppedError,
                    GenerationRequest, GenerationResult, InvalidRequestError, QueueFullError, RequestCancelledError,
                    StepEvent, StepStats)

__all__ = ["Engine", "RequestHandle", "EngineConfig", "GenerationRequest", "GenerationResult", "StepEvent",
           "StepStats", "EngineStats", "EngineError", "InvalidRequestError", "QueueFullError",
           "DeadlineExceededError", "RequestCancelledError", "EngineStoppedError"]
