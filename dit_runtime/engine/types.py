"""The engine's public vocabulary: its config, a request, what a request's handle yields, and its errors."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..diffusion import SAMPLERS, Spacing

Precision = Literal["float32", "float16", "bfloat16"]
# Smallest forward batch (rows) on the CPU; see EngineConfig.buckets.
CPU_MIN_BUCKET = 16


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs its model. Validated at construction; errors name the field."""

    device: str = "cpu"
    dtype: Precision = "float32"  # fp16/bf16 on the GPU; fp32 on the CPU
    max_batch_size: int = 32  # rows per forward pass; a guided image takes two (conditional + null)
    max_queue_size: int = 256  # images waiting for admission; past it submit() raises QueueFullError
    max_images_per_request: int = 8
    max_inference_steps: int = 1000
    compile: bool = False  # torch.compile the step function
    # False: one compiled program per bucket, specialised to its row count (static shapes); True: one program with
    # a symbolic batch size serves every bucket. Static was 2.5% faster at 256 rows and the same for one image
    # (docs/benchmarks.md, run 16), and compiles a bucket in under half the time, but compiles every bucket.
    compile_dynamic: bool = False
    # Inductor options for that compile (torch.compile's ``options``), e.g. {"max_autotune": True}: its GEMM search
    # takes minutes per model, so it is off by default (docs/benchmarks.md has what it buys).
    compile_options: dict | None = field(default=None, hash=False)
    fused_mlp_epilogue: bool = True  # on CUDA: bias + GELU inside the fc1 GEMM (cuBLASLt epilogue)
    fused_adaln: bool = True  # every block's adaLN modulation in one GEMM per step
    split_k: int = 4  # on CUDA: split the reduction of attn.proj and fc2 into this many chunks ...
    split_k_max_rows: int = 512  # ... in forwards of at most this many token rows (few rows under-fill the GPU)
    cuda_graphs: bool = False  # capture each bucket's step as a CUDA graph (needs device=cuda)
    batch_buckets: tuple[int, ...] | None = None  # row counts forwards are padded to; default powers of two
    spacing: Spacing = "trailing"
    clip_denoised: bool | None = None  # clip x0 to [-1, 1]; default: on for pixel-space models
    compile_cache_dir: str | None = None  # inductor/FX cache, so a restart does not recompile
    warmup: bool = True  # compile and capture every bucket at start-up
    batching: Literal["step", "request", "single"] = "step"  # step-level (default); the others are baselines
    stall_timeout: float = 120.0  # seconds without a finished step, with work pending, before health() fails

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"dtype must be one of float32, float16, bfloat16, got {self.dtype!r}")
        for name in ("max_batch_size", "max_queue_size", "max_images_per_request", "max_inference_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            problems.append(f"split_k must be a positive integer, got {self.split_k!r}")
        if not isinstance(self.split_k_max_rows, int) or self.split_k_max_rows < 0:
            problems.append(f"split_k_max_rows must be a non-negative integer, got {self.split_k_max_rows!r}")
        if self.cuda_graphs and not str(self.device).startswith("cuda"):
            problems.append("cuda_graphs needs device 'cuda'")
        if self.dtype != "float32" and not str(self.device).startswith("cuda"):
            problems.append(f"dtype {self.dtype} is for the GPU; use float32 on {self.device}")
        if self.batching not in ("step", "request", "single"):
            problems.append(f"batching must be one of step, request, single, got {self.batching!r}")
        if self.batch_buckets is not None:
            if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
                problems.append(f"batch_buckets must be positive row counts, got {self.batch_buckets!r}")
            elif max(self.batch_buckets) < self.max_batch_size:
                problems.append(f"the largest batch bucket ({max(self.batch_buckets)}) must be >= max_batch_size "
                                f"({self.max_batch_size})")
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    @property
    def buckets(self) -> tuple[int, ...]:
        """Sorted row counts the forward pass is padded to (static shapes for compile and CUDA graphs)."""
        if self.batch_buckets is not None:
            return tuple(sorted(set(b for b in self.batch_buckets if b <= self.max_batch_size)
                                | {self.max_batch_size}))
        # On the CPU, matrix products with fewer than 16 rows take MKL's small-matrix path, whose summation order
        # differs from the blocked one; starting the buckets at 16 rows keeps a request's numbers the same alone and
        # among batch neighbours (bit for bit on every CPU measured; BLAS promises it only within one shape).
        b = 1 if str(self.device).startswith("cuda") else min(CPU_MIN_BUCKET, self.max_batch_size)
        out = []
        while b < self.max_batch_size:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_batch_size])


@dataclass
class GenerationRequest:
    """One request: ``num_images`` images of the given class(es), denoised together.

    ``class_labels`` holds one label for all images or one per image; labels are class ids (names are mapped
    by the caller through ``CheckpointInfo.class_id``). Image k's noise depends only on (seed, k).
    """

    class_labels: list[int]
    num_images: int = 1
    seed: int | None = None  # None: the engine draws one and reports it in the result
    num_inference_steps: int = 25
    sampler: str = "dpm-solver++"
    guidance_scale: float = 4.0  # 1.0 disables guidance (no null-class rows are run)
    eta: float = 0.0  # DDIM only: 0 is deterministic
    resolution: int | None = None  # image side in pixels; None or the checkpoint's native side (others rejected)
    deadline: float | None = None  # time.monotonic() after which the request is dropped with DeadlineExceeded
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def labels(self) -> list[int]:
        return self.class_labels * self.num_images if len(self.class_labels) == 1 else list(self.class_labels)


@dataclass(frozen=True)
class StepEvent:
    """Progress: the request's images have finished ``step`` of ``num_steps`` denoising steps."""

    request_id: str
    step: int
    num_steps: int


@dataclass
class GenerationResult:
    """The finished images, uint8 (n, H, W, C), with the seed used and where the time went.

    For a latent-space model served without a VAE, ``images`` is None and ``latents`` holds the raw samples.
    """

    request_id: str
    images: np.ndarray | None
    seed: int
    queue_seconds: float  # submit -> admission into the batch
    denoise_seconds: float  # admission -> last step
    total_seconds: float
    latents: np.ndarray | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    running_requests: int
    running_images: int
    waiting_requests: int
    waiting_images: int
    max_batch_size: int
    max_queue_size: int
    steps_done: int
    seconds_since_last_step: float | None


@dataclass(frozen=True)
class StepStats:
    """What one engine step did; observers (metrics) receive one per step."""

    duration_seconds: float
    rows: int  # real rows in the forward (images + null rows)
    bucket: int  # rows after padding
    images: int  # images that advanced one step
    running_requests: int
    waiting_requests: int
    waiting_images: int
    timestamp: float = field(default_factory=time.monotonic)


class EngineError(Exception):
    """Base of the errors a request handle can raise."""


class InvalidRequestError(EngineError, ValueError):
    """A request field is out of range; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


class QueueFullError(EngineError):
    """The waiting queue is at its limit; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it finished; its images left the batch."""


class RequestCancelledError(EngineError):
    """The request was cancelled (e.g. its client went away); its images left the batch."""


class EngineStoppedError(EngineError):
    """The engine is stopped or its loop died; the message says why."""


def validate_request(request: GenerationRequest, num_classes: int, config: EngineConfig,
                     supports_guidance: bool, native_resolution: int | None = None) -> None:
    """Raise InvalidRequestError naming the first field that is out of range."""
    if request.resolution is not None and request.resolution != native_resolution:
        raise InvalidRequestError("size", f"size: this model generates {native_resolution}x{native_resolution} images "
                                          f"only (its native resolution), got {request.resolution}")
    if not isinstance(request.num_images, int) or not 1 <= request.num_images <= config.max_images_per_request:
        raise InvalidRequestError("n", f"n must be an integer in [1, {config.max_images_per_request}], "
                                       f"got {request.num_images!r}")
    if len(request.class_labels) not in (1, request.num_images):
        raise InvalidRequestError("class_label", f"give one class label or one per image ({request.num_images}), "
                                                 f"got {len(request.class_labels)}")
    for label in request.class_labels:
        if not isinstance(label, int) or not 0 <= label < num_classes:
            raise InvalidRequestError("class_label", f"class_label must be an integer in [0, {num_classes - 1}], "
                                                     f"got {label!r}")
    if not isinstance(request.num_inference_steps, int) or \
            not 1 <= request.num_inference_steps <= config.max_inference_steps:
        raise InvalidRequestError("num_inference_steps", f"num_inference_steps must be an integer in "
                                                         f"[1, {config.max_inference_steps}], "
                                                         f"got {request.num_inference_steps!r}")
    if request.sampler not in SAMPLERS:
        raise InvalidRequestError("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {request.sampler!r}")
    g = request.guidance_scale
    if not isinstance(g, (int, float)) or not np.isfinite(g) or not 1.0 <= g <= 20.0:
        raise InvalidRequestError("guidance_scale", f"guidance_scale must be a number in [1, 20], got {g!r}")
    if g != 1.0 and not supports_guidance:
        raise InvalidRequestError("guidance_scale", "this model was trained without label dropout, so it has no "
                                                    "null class: guidance_scale must be 1")
    if not isinstance(request.eta, (int, float)) or not np.isfinite(request.eta) or not 0.0 <= request.eta <= 1.0:
        raise InvalidRequestError("eta", f"eta must be a number in [0, 1], got {request.eta!r}")
    if request.seed is not None and (not isinstance(request.seed, int) or not 0 <= request.seed < 2 ** 63):
        raise InvalidRequestError("seed", f"seed must be an integer in [0, 2**63), got {request.seed!r}")
