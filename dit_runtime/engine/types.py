"""The engine's public vocabulary: its config, what a request's handle yields, its load, and its errors.

The request itself (``GenerationRequest``, ``SamplingParams``) and what a model accepts (``ModelSpec``) are in
``dit_runtime.request``, which the API imports without torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..diffusion import Spacing
from ..request import CACHE_POLICIES, RequestLimits
from .fast_paths import FastPaths

# fp32 on the CPU; fp16 or bf16 on a GPU; fp8: bf16 activations with FP8 GEMMs in the blocks (fp8.Fp8Linear).
Precision = Literal["fp32", "fp16", "bf16", "fp8"]
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# Smallest forward batch (rows) on the CPU; see EngineConfig.buckets.
CPU_MIN_BUCKET = 16


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs its model. Validated at construction; errors name the field."""

    device: str = "cpu"
    precision: Precision = "fp32"
    max_batch_size: int = 32  # rows per forward pass; a guided image takes two (conditional + null)
    # Admission by time: submit() refuses (QueueFullError, with a Retry-After from the estimate) a request whose
    # estimated wait for a batch slot passes this many seconds, or whose estimated finish passes its own deadline. The
    # wait is replayed from the queue ahead and the measured step time (engine/admission.py). None: no bound, a
    # script's burst of submits all queue (the deadline check still applies). A server sets it: serving/config.py
    # has the default a replica runs with and why.
    max_queue_wait_s: float | None = None
    max_queue_size: int = 256  # images waiting for admission: a memory guard; past it submit() raises QueueFullError
    limits: RequestLimits = RequestLimits()  # what one request may ask for
    default_inference_steps: int | None = None  # overrides the checkpoint's measured default when set
    default_cache: str = "off"  # the `cache` preset of a request that names none (request.CACHE_POLICIES)
    compile: bool = False  # torch.compile the step function
    # False: one compiled program per bucket, specialised to its row count (static shapes); True: one program with
    # a symbolic batch size serves every bucket. Static was 2.5% faster at 256 rows and the same for one image
    # (docs/benchmarks.md), and compiles a bucket in under half the time, but compiles every bucket.
    compile_dynamic: bool = False
    # Inductor options for that compile (torch.compile's ``options``), e.g. {"max_autotune": True}: its GEMM search
    # takes minutes per model and found nothing faster than cuBLAS here, so it is off by default.
    compile_options: dict | None = field(default=None, hash=False)
    fast_paths: FastPaths = FastPaths()  # joined adaLN; on CUDA also the GELU epilogue and split-K (fast_paths.py)
    cuda_graphs: bool = False  # capture each bucket's step as a CUDA graph (needs device=cuda)
    batch_buckets: tuple[int, ...] | None = None  # row counts forwards are padded to; default powers of two
    # Image rows whose feature cache (a request's `cache` other than "off") the engine holds at once, each
    # FeatureCache.bytes_per_row of device memory; None: every row of a full batch. A caching request waits while
    # the rows are taken. 0: no feature cache; a step is then one function, and requests must ask for cache "off".
    feature_cache_rows: int | None = None
    spacing: Spacing = "trailing"
    clip_denoised: bool | None = None  # clip x0 to [-1, 1]; default: on for pixel-space models
    compile_cache_dir: str | None = None  # inductor/FX cache, so a restart does not recompile
    # With a compile_cache_dir: also save each compiled step program (and a compiled VAE decoder's) whole and load it
    # at the next start, which then skips torch.compile's tracing (engine/programs.py). False: inductor's caches
    # alone, and every start traces.
    compile_programs: bool = True
    warmup: bool = True  # compile and capture every bucket at start-up
    # The images of the requests that finish in one step are decoded together (decoders.py), in batches of at most
    # this many, which bounds a latent model's VAE activations (SD's VAE: 1 GiB per 128-channel 256x256 tensor
    # of 64 images in fp16).
    decode_batch_size: int = 64
    compile_decoder: bool = False  # torch.compile a latent model's VAE decoder (a symbolic batch size)
    # ... and capture it as CUDA graphs, a batch padded to the next graph's (decoders.graph_batches)
    decoder_cuda_graphs: bool = False
    # inductor's options for the decoder's torch.compile, as compile_options are the steps'
    decoder_compile_options: dict | None = field(default=None, hash=False)
    stall_timeout: float = 120.0  # seconds without a finished step, with work pending, before health() fails

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        elif self.precision != "fp32" and not str(self.device).startswith("cuda"):
            problems.append(f"precision {self.precision} is for an NVIDIA GPU; use fp32 on {self.device}")
        if self.max_queue_wait_s is not None and (not isinstance(self.max_queue_wait_s, (int, float))
                                                  or not self.max_queue_wait_s > 0):
            problems.append(f"max_queue_wait_s must be a positive number of seconds or None, "
                            f"got {self.max_queue_wait_s!r}")
        for name in ("max_batch_size", "max_queue_size", "decode_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.default_inference_steps is not None and not \
                1 <= self.default_inference_steps <= self.limits.max_inference_steps:
            problems.append(f"default_inference_steps must be in [1, limits.max_inference_steps = "
                            f"{self.limits.max_inference_steps}], got {self.default_inference_steps!r}")
        if self.default_cache not in CACHE_POLICIES:
            problems.append(f"default_cache must be one of {', '.join(CACHE_POLICIES)}, got {self.default_cache!r}")
        elif CACHE_POLICIES[self.default_cache].caches and self.cache_rows == 0:
            problems.append(f"default_cache {self.default_cache} needs a feature cache, but feature_cache_rows is 0")
        if self.cuda_graphs and not str(self.device).startswith("cuda"):
            problems.append("cuda_graphs needs device 'cuda'")
        if self.decoder_cuda_graphs and not (self.compile_decoder and str(self.device).startswith("cuda")):
            problems.append("decoder_cuda_graphs needs compile_decoder and device 'cuda'")
        if self.decoder_compile_options and not self.compile_decoder:
            problems.append("decoder_compile_options needs compile_decoder")
        known = None  # inductor's option names, read once and only when a model gives options
        for name in ("compile_options", "decoder_compile_options"):
            if getattr(self, name):  # checked now, not at the compile minutes into a start
                if known is None:
                    import torch._inductor

                    known = set(torch._inductor.list_options())
                # torch.compile reads "max-autotune" as max_autotune
                unknown = sorted(key for key in getattr(self, name) if key.replace("-", "_") not in known)
                if unknown:
                    problems.append(f"{name} has options inductor does not know: {', '.join(unknown)} (the known "
                                    "ones: torch._inductor.list_options())")
        rows = self.feature_cache_rows
        if rows is not None and (not isinstance(rows, int) or not 0 <= rows <= self.max_batch_size):
            problems.append(f"feature_cache_rows must be an integer in [0, max_batch_size = {self.max_batch_size}], "
                            f"got {self.feature_cache_rows!r}")
        if self.batch_buckets is not None:
            if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
                problems.append(f"batch_buckets must be positive row counts, got {self.batch_buckets!r}")
            elif max(self.batch_buckets) < self.max_batch_size:
                problems.append(f"the largest batch bucket ({max(self.batch_buckets)}) must be >= max_batch_size "
                                f"({self.max_batch_size})")
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    @property
    def cache_rows(self) -> int:
        """Rows of the feature cache's pool (0: none)."""
        return self.max_batch_size if self.feature_cache_rows is None else self.feature_cache_rows

    @property
    def compute_buckets(self) -> tuple[int, ...]:
        """Row counts the feature-cached step pads the rows that run the blocks to: the buckets, and every multiple
        of a sixteenth of the largest between the smallest and the largest, so a forward of the rows that run the
        blocks carries at most that sixteenth of padding (a mixed step's blocks compile once, for a symbolic row
        count, and are captured per size; runner._SYMBOLIC_PARTS). Without a feature cache, the buckets."""
        buckets = self.buckets
        if not self.cache_rows:
            return buckets
        grain = max(1, buckets[-1] // 16)
        return tuple(sorted(set(buckets) | {b for b in range(grain, buckets[-1], grain) if b > buckets[0]}))

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


@dataclass(frozen=True)
class StepEvent:
    """Progress: the request's images have finished ``step`` of ``num_steps`` denoising steps."""

    request_id: str
    step: int
    num_steps: int


@dataclass
class GenerationResult:
    """The finished images, uint8 (n, H, W, C) (the engine's decoder's: decoders.py), with the seed used and where
    the time went. A latent-space model's results also carry its samples, ``latents`` (n, C, h, w) float32."""

    request_id: str
    images: np.ndarray
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
    running_rows: int  # of max_batch_size
    waiting_requests: int
    waiting_images: int
    max_batch_size: int
    max_queue_size: int
    steps_done: int
    seconds_since_last_step: float | None
    estimated_wait_seconds: float  # a one-image request at the defaults, queued now, until admission


@dataclass(frozen=True)
class StepStats:
    """What one engine step did; observers (metrics) receive one per step."""

    duration_seconds: float
    rows: int  # real rows in the forward (images + null rows)
    bucket: int  # rows after padding
    images: int  # images that advanced one step
    compute_rows: int  # real rows that ran the blocks (the others forecast them from their feature cache)
    compute_bucket: int  # those rows after padding (0: the blocks did not run)
    rows_by_cache: tuple[tuple[str, int, int], ...]  # per `cache` preset in the step: (preset, computed, skipped)
    running_requests: int
    waiting_requests: int
    waiting_images: int
    estimated_wait_seconds: float = 0.0  # the engine's estimate for a one-image request queued now
    timestamp: float = field(default_factory=time.monotonic)


class EngineError(Exception):
    """Base of the errors a request handle can raise (``submit`` also raises ``InvalidRequestError``)."""


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
