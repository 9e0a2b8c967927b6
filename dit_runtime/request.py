"""One generation request, from the HTTP edge to the sampler: what it asks for, and what a model accepts.

- ``SamplingParams``: how the images are denoised (steps, sampler, guidance, eta, feature cache, seed), checked on
  construction; its defaults are the ones every model falls back to.
- ``CachePolicy``: which denoising steps run the model's blocks for an image, and how the others forecast them
  (named presets in ``CACHE_POLICIES``; ``is_full_step`` is the rule the scheduler and the runner share).
- ``GenerationRequest``: the job: a class id per image, its ``SamplingParams``, the output upscale and encoding
  (``OutputEncoding``), and the deadline.
  The API builds it once; the model server, the engine and the runner read it unchanged.
- ``ModelSpec``: what a served model accepts (its classes, resolution, defaults and the deployment's limits).
  ``build_request`` resolves a client's fields against it and ``check`` holds a request to it: every rule about a
  request is in this module, and each error names the API field and the allowed values.

No torch here: the API's processes import this module and stay small.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from .contract import SamplingContract

# "consistency" is a distilled student's sampler (contract.py): its guidance is an input of the model, not a null row.
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "consistency")
Sampler = Literal["ddpm", "ddim", "dpm-solver++", "consistency"]
Space = Literal["pixel", "latent"]

# The paper's training schedule has 1000 timesteps; a sampler takes at most one step per timestep.
NUM_TRAIN_TIMESTEPS = 1000
# Guidance past this saturates the images of every model we know; a deployment may allow less (limits).
MAX_GUIDANCE_SCALE = 20.0
# Forward rows of a guided image: its conditional and its null-class ("unconditional") row run in the same pass.
GUIDED_ROWS_PER_IMAGE = 2
MAX_SEED = 2 ** 63  # seeds are in [0, MAX_SEED)
# A seed the engine draws (a request without one) is below this: the answer reports it, and a client that reads JSON
# numbers as doubles (JavaScript, the playground) holds integers exactly only up to 2**53. Above it the seed it shows
# and sends again is rounded, and "the same seed" draws other images. A seed the client gives may use all of MAX_SEED.
MAX_DRAWN_SEED = 2 ** 53
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")  # the API's `size`: "WxH"
# The API's `output_format`s (OpenAI's), and the quality a lossy one is encoded at when `output_compression` is left
# out: OpenAI's default of 100, the encoder's best.
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_COMPRESSION = 100


# A request's id names it in errors and logs. Unique across processes (a random prefix, drawn again in a forked child)
# without a system call per request: uuid4 reads the OS's randomness every time, and under load each such call is a
# release and a re-take of the GIL on the request path (py-spy of a replica at its capacity).
_request_ids = itertools.count()
_request_id_prefix = uuid.uuid4().hex[:16]


def _new_request_id_prefix() -> None:
    global _request_ids, _request_id_prefix
    _request_ids, _request_id_prefix = itertools.count(), uuid.uuid4().hex[:16]


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_request_id_prefix)


def new_request_id() -> str:
    """32 hex digits, as a uuid4's: the process's prefix, then a count."""
    return f"{_request_id_prefix}{next(_request_ids):016x}"


class InvalidRequestError(ValueError):
    """A request field is out of range; ``field`` names it as the API does, the message gives the allowed values."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name

    def __reduce__(self):  # pickles with its field (it crosses process boundaries)
        return type(self), (self.field, str(self))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high


def check_images(n, high: int) -> None:
    if not _is_int(n) or not 1 <= n <= high:
        raise InvalidRequestError("n", f"n must be an integer in [1, {high}], got {n!r}")


def check_steps(steps, high: int) -> None:
    if not _is_int(steps) or not 1 <= steps <= high:
        raise InvalidRequestError("num_inference_steps", f"num_inference_steps must be an integer in [1, {high}], "
                                                         f"got {steps!r}")


def check_guidance(scale, high: float) -> None:
    if not _in_range(scale, 1.0, high):
        raise InvalidRequestError("guidance_scale", f"guidance_scale must be a finite number in [1, {high:g}], "
                                                    f"got {scale!r}")


@dataclass(frozen=True)
class CachePolicy:
    """Feature caching for one image: which steps run the DiT's blocks, and how the steps between forecast them.

    Between a warm-up and the last steps, only every ``interval``-th step runs the blocks ("full"); the others skip
    them and forecast the blocks' residual (their output minus their input) from the full steps by a Taylor
    expansion in the step index: order 0 reuses the last residual (FORA), order 1 extrapolates it linearly from
    the last two full steps (TaylorSeer). The embedders and the final layer run at every step, at the step's own
    timestep. The schedule depends only on the step index, so the scheduler knows before a step which rows run
    the blocks and packs them into a smaller forward, with no read-back from the GPU.
    """

    interval: int = 1  # a full step every `interval` steps; 1: every step is full (no caching)
    order: int = 0  # Taylor order of the forecast, 0..MAX_CACHE_ORDER
    warmup_fraction: float = 0.0  # the first ceil(fraction x steps) steps are full (at least order + 1)
    final_full_steps: int = 1  # the last steps are full: they set the details a forecast would blur

    def __post_init__(self) -> None:
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"interval must be a positive integer, got {self.interval!r}")
        if not _is_int(self.order) or not 0 <= self.order <= MAX_CACHE_ORDER:
            raise ValueError(f"order must be an integer in [0, {MAX_CACHE_ORDER}], got {self.order!r}")
        if not _in_range(self.warmup_fraction, 0.0, 1.0):
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}")
        if not _is_int(self.final_full_steps) or self.final_full_steps < 0:
            raise ValueError(f"final_full_steps must be a non-negative integer, got {self.final_full_steps!r}")

    @property
    def caches(self) -> bool:
        return self.interval > 1

    def schedule(self, num_steps: int) -> tuple[int, int, int]:
        """``(interval, warmup, cooldown)`` for ``is_full_step``: steps before ``warmup`` and from ``cooldown`` on
        are full. Step 0 is always full, so a request's first step writes its cache before anything reads it."""
        warmup = max(1, self.order + 1, math.ceil(self.warmup_fraction * num_steps))
        return self.interval, warmup, num_steps - self.final_full_steps

    def is_full_step(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` of ``num_steps`` runs the blocks."""
        return bool(is_full_step(step, *self.schedule(num_steps)))

    def full_steps(self, num_steps: int) -> int:
        """How many of ``num_steps`` steps run the blocks."""
        return sum(self.is_full_step(step, num_steps) for step in range(num_steps))


def is_full_step(step, interval, warmup, cooldown):
    """Whether ``step`` runs the blocks: the one rule, for ints (the scheduler) and tensors (the runner's
    ``is_full_step_on_device``)."""
    return (step < warmup) | (step >= cooldown) | ((step - warmup) % interval == 0)


# Highest Taylor order a policy may use; the runner keeps this many difference terms per cached row.
MAX_CACHE_ORDER = 1
# The API's `cache` presets, measured on the shipped checkpoints (docs/benchmarks.md, "Feature caching").
CACHE_POLICIES: dict[str, CachePolicy] = {
    "off": CachePolicy(),
    "balanced": CachePolicy(interval=2, order=1, warmup_fraction=0.1, final_full_steps=1),
    "fast": CachePolicy(interval=3, order=1, warmup_fraction=0.1, final_full_steps=1),
}


def rows_per_image(null_row: bool) -> int:
    """Rows one image takes in a forward pass: the rule the scheduler, the limits, the API and every batch size
    that is counted in images use. Sizing before a request's params are known, pass null_row=True: the larger
    case (a teacher's guided image)."""
    return GUIDED_ROWS_PER_IMAGE if null_row else 1


@dataclass(frozen=True)
class SamplingParams:
    """How a request's images are denoised; these defaults apply where neither the checkpoint nor the config say."""

    num_inference_steps: int = 25
    sampler: Sampler = "dpm-solver++"  # DPM-Solver++(2M): good images in 20-25 steps
    guidance_scale: float = 2.0  # classifier-free guidance; 1 runs no null rows
    eta: float = 0.0  # DDIM's noise: 0 is deterministic
    cache: str = "off"  # a CACHE_POLICIES preset: how many steps skip the blocks
    seed: int | None = None  # None: the engine draws one and reports it with the images

    def __post_init__(self) -> None:
        """The bounds that hold for every model; a deployment's limits (``ModelSpec.check``) may be tighter."""
        check_steps(self.num_inference_steps, NUM_TRAIN_TIMESTEPS)
        if self.sampler not in SAMPLERS:
            raise InvalidRequestError("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got "
                                                 f"{self.sampler!r}")
        check_guidance(self.guidance_scale, MAX_GUIDANCE_SCALE)
        if not _in_range(self.eta, 0.0, 1.0):
            raise InvalidRequestError("eta", f"eta must be a number in [0, 1], got {self.eta!r}")
        if self.cache not in CACHE_POLICIES:
            raise InvalidRequestError("cache", f"cache must be one of {', '.join(CACHE_POLICIES)}, got "
                                               f"{self.cache!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise InvalidRequestError("seed", f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def null_row(self) -> bool:
        """Whether each image has a null-class row beside it: guided, and not a student's sampler, whose model
        takes the scale as an input."""
        return self.guided and self.sampler != "consistency"

    @property
    def cache_policy(self) -> CachePolicy:
        return CACHE_POLICIES[self.cache]

    def seed_or_draw(self) -> int:
        """The seed these images are drawn with: the one given, else a fresh random one below MAX_DRAWN_SEED."""
        return self.seed if self.seed is not None else secrets.randbelow(MAX_DRAWN_SEED)

    @property
    def rows_per_image(self) -> int:
        """Rows one image of these params takes in a forward pass (``rows_per_image``)."""
        return rows_per_image(self.null_row)


@dataclass(frozen=True)
class OutputEncoding:
    """How the images leave the server: a file format, and for the lossy ones a quality (the API's
    ``output_compression``, 0-100, the scale JPEG and WebP encoders take). PNG is lossless and takes none."""

    format: str = "png"
    compression: int | None = None  # None: DEFAULT_OUTPUT_COMPRESSION for jpeg and webp

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise InvalidRequestError("output_format", f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, "
                                                       f"got {self.format!r}")
        if self.compression is None:
            return
        if self.format == "png":
            raise InvalidRequestError("output_compression", "output_compression applies to jpeg and webp; png is "
                                                            "lossless: leave it out, or ask for jpeg or webp")
        if not _is_int(self.compression) or not 0 <= self.compression <= 100:
            raise InvalidRequestError("output_compression", f"output_compression must be an integer in [0, 100], "
                                                            f"got {self.compression!r}")

    def check_channels(self, channels: int) -> None:
        """Raise ``InvalidRequestError`` when this format cannot hold images of ``channels`` channels: JPEG holds
        grey and RGB (1 or 3), PNG and WebP also the 4 of a latent served without its VAE."""
        if self.format == "jpeg" and channels not in (1, 3):
            raise InvalidRequestError("output_format", f"output_format jpeg holds grey or RGB images, and these have "
                                                       f"{channels} channels (a latent served without its VAE): ask "
                                                       "for png or webp")

    @property
    def quality(self) -> int:
        """The lossy encoders' quality, 0-100."""
        return DEFAULT_OUTPUT_COMPRESSION if self.compression is None else self.compression


@dataclass(frozen=True)
class GenerationRequest:
    """One job: an image per class id, all denoised with one ``SamplingParams``.

    Image k's noise depends only on (seed, k), so a request gives the same images alone and in any batch.
    """

    class_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    upscale: int = 1  # each image enlarged this many times, nearest pixel (the API's `size`)
    encoding: OutputEncoding = OutputEncoding()  # the API's `output_format` and `output_compression`
    deadline: float | None = None  # Unix time (time.time()) past which it is dropped with DeadlineExceededError
    request_id: str = field(default_factory=new_request_id)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_ids", tuple(self.class_ids))
        if not self.class_ids:
            raise InvalidRequestError("n", "n must be at least 1 (a class id per image), got 0")
        if not all(_is_int(c) and c >= 0 for c in self.class_ids):
            raise InvalidRequestError("class_label", f"class ids must be integers >= 0, got {list(self.class_ids)!r}")
        if not _is_int(self.upscale) or self.upscale < 1:
            raise InvalidRequestError("size", f"upscale must be a positive integer, got {self.upscale!r}")

    @classmethod
    def of(cls, class_id: int, n: int = 1, **sampling) -> "GenerationRequest":
        """``n`` images of one class: ``GenerationRequest.of(3, n=2, seed=1, num_inference_steps=10)``; the keyword
        arguments are ``SamplingParams`` fields, plus ``deadline``, ``upscale``, ``encoding`` and ``request_id``."""
        job = {k: sampling.pop(k) for k in ("deadline", "upscale", "encoding", "request_id") if k in sampling}
        return cls((class_id,) * n, SamplingParams(**sampling), **job)

    @property
    def num_images(self) -> int:
        return len(self.class_ids)

    @property
    def rows(self) -> int:
        return self.num_images * self.sampling.rows_per_image


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a deployment: the `limits` of serve_config.yaml that the engine enforces. Each
    key's default and allowed range are declared here only; ``serving.config.Limits`` reads both."""

    # Upper bound of `n`. However high, a request's rows must also fit one forward pass (max_batch_size).
    max_images_per_request: int = 8
    # Upper bound of `num_inference_steps`: every timestep of the training schedule, the one bound that holds for
    # every model and for the offline tools and tests. A long request cannot hold a server's rows past its deadline
    # (request_timeout_s); a deployment that wants less work per request says so (serve_config.yaml: 100).
    max_inference_steps: int = NUM_TRAIN_TIMESTEPS
    max_guidance_scale: float = MAX_GUIDANCE_SCALE  # upper bound of `guidance_scale`; the lower one is always 1
    max_image_side: int = 512  # largest `size` side in pixels, after upscaling

    # What each key may be set to: [low, high], None for no upper bound. An image side past 4096 pixels (48 MiB of
    # RGB per image, held while its PNG is encoded) is taken for a typo rather than a wish.
    RANGES: ClassVar[dict[str, tuple[float, float | None]]] = {
        "max_images_per_request": (1, None),
        "max_inference_steps": (1, NUM_TRAIN_TIMESTEPS),
        "max_guidance_scale": (1.0, MAX_GUIDANCE_SCALE),
        "max_image_side": (1, 4096),
    }

    def __post_init__(self) -> None:
        for name in self.RANGES:
            self.check_key(name, getattr(self, name))

    @classmethod
    def check_key(cls, name: str, value) -> None:
        """Raise a ValueError naming key ``name`` and its range when ``value`` is not in it."""
        low, high = cls.RANGES[name]
        integer = not isinstance(low, float)
        if (integer and not _is_int(value)) or not _in_range(value, low, math.inf if high is None else high):
            allowed = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} {allowed}, got {value!r}")


def lookup_class(class_names: tuple[str, ...] | list[str], name_or_id: str | int) -> int:
    """A class name (any case) or id, as text or int, -> its id; a ValueError says what the model knows."""
    if isinstance(name_or_id, str) and name_or_id.strip().isdigit() and not name_or_id.strip().isascii():
        raise ValueError(f"{name_or_id!r}: write class ids with the digits 0-9, or give a class name")
    if _is_int(name_or_id) or (isinstance(name_or_id, str) and name_or_id.strip().isdigit()):
        cid = int(name_or_id)
        if 0 <= cid < len(class_names):
            return cid
        raise ValueError(f"class id {cid} is out of range [0, {len(class_names) - 1}]")
    wanted = str(name_or_id).strip().casefold()
    for cid, name in enumerate(class_names):
        if name.casefold() == wanted:
            return cid
    shown = ", ".join(repr(n) for n in class_names[:12]) + (" ..." if len(class_names) > 12 else "")
    raise ValueError(f"unknown class {name_or_id!r}; this model knows {shown}")


@dataclass(frozen=True)
class ModelSpec:
    """What a served model accepts: its engine builds it once; the API in front reads it (GET /v1/models)."""

    class_names: tuple[str, ...]
    resolution: int  # side of its images in pixels
    channels: int  # of its images as the model makes them (latent channels for a latent model)
    space: Space
    parameters: int
    max_rows: int  # rows of one forward pass (the engine's max_batch_size)
    contract: SamplingContract  # how the model is sampled, with the deployment's defaults merged in
    limits: RequestLimits
    max_cache_rows: int = 0  # rows of the deployment's feature cache: 0 runs only cache "off"
    precision: str = "fp32"  # what the engine computes in (EngineConfig.precision)

    def build_request(self, *, prompt: str | None = None, class_label: int | list[int] | None = None, n: int = 1,
                      size: str | None = None, num_inference_steps: int | None = None, sampler: str | None = None,
                      guidance_scale: float | None = None, eta: float | None = None, cache: str | None = None,
                      seed: int | None = None, output_format: str | None = None,
                      output_compression: int | None = None, deadline: float | None = None) -> GenerationRequest:
        """Resolve an API request's fields (named as in the API; None: this model's default) into a checked
        ``GenerationRequest``; raises ``InvalidRequestError`` naming the first field out of range."""
        if prompt is None and class_label is None:
            raise InvalidRequestError("prompt", "give a prompt (a class name or id of the model) or class_label")
        check_images(n, self.limits.max_images_per_request)
        param, labels = ("class_label", class_label) if class_label is not None else ("prompt", prompt)
        labels = labels if isinstance(labels, list) else [labels]
        if len(labels) not in (1, n):
            raise InvalidRequestError(param, f"{param} must be one class id or a list of n={n} ids, got "
                                             f"{len(labels)}")
        try:
            class_ids = [lookup_class(self.class_names, label) for label in labels]
        except ValueError as e:
            raise InvalidRequestError(param, f"{param}: {e}") from None
        sampling = self.sampling(num_inference_steps=num_inference_steps, sampler=sampler,
                                 guidance_scale=guidance_scale, eta=eta, cache=cache, seed=seed)
        encoding = OutputEncoding(OutputEncoding.format if output_format is None else output_format,
                                  output_compression)  # the class's own default format when none is asked for
        request = GenerationRequest(tuple(class_ids * n if len(class_ids) == 1 else class_ids), sampling,
                                    upscale=self.upscale_for(size), encoding=encoding, deadline=deadline)
        self.check(request)
        return request

    def sampling(self, *, num_inference_steps: int | None = None, sampler: str | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, cache: str | None = None,
                 seed: int | None = None) -> SamplingParams:
        """``SamplingParams`` with this model's default (``contract.defaults``) for every field given as None.
        Raises ``InvalidRequestError`` with this deployment's ranges."""
        d = self.defaults
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = d.guidance_scale if guidance_scale is None else guidance_scale
        check_steps(steps, self.max_inference_steps)  # this deployment's ranges in the message
        check_guidance(guidance, self.max_guidance_scale)
        return SamplingParams(num_inference_steps=steps, sampler=d.sampler if sampler is None else sampler,
                              guidance_scale=guidance, eta=d.eta if eta is None else eta,
                              cache=d.cache if cache is None else cache, seed=seed)

    @property
    def defaults(self) -> SamplingParams:
        return self.contract.defaults

    @property
    def supports_guidance(self) -> bool:
        return self.contract.guidance != "none"

    @property
    def max_inference_steps(self) -> int:
        """The most steps a request may take: the deployment's limit within the model's own."""
        return min(self.limits.max_inference_steps, self.contract.max_inference_steps)

    @property
    def max_guidance_scale(self) -> float:
        return min(self.limits.max_guidance_scale, self.contract.max_guidance_scale)

    def upscale_for(self, size: str | None) -> int:
        """The whole factor that turns this model's images into ``size`` ("WxH"; None or "auto": 1)."""
        if size is None or size == "auto":
            return 1
        side, max_side = self.resolution, self.limits.max_image_side
        m = SIZE.match(size)
        if not m or max(int(m[1]), int(m[2])) > max_side:
            raise InvalidRequestError("size", f"size must be 'WxH' with sides up to {max_side}, got {size!r}")
        w, h = int(m[1]), int(m[2])
        if w == h and w % side == 0 and w >= side:
            return w // side
        valid = [f"{side * k}x{side * k}" for k in range(1, max_side // side + 1)]
        shown = ", ".join(valid[:6] + (["...", valid[-1]] if len(valid) > 7 else valid[6:]))
        raise InvalidRequestError("size", f"size must be this model's resolution times a whole factor: one of "
                                          f"{shown}; got {size!r}")

    def check(self, request: GenerationRequest) -> None:
        """Raise ``InvalidRequestError`` when ``request`` asks for more than this model and deployment allow."""
        limits, s = self.limits, request.sampling
        check_images(request.num_images, limits.max_images_per_request)
        bad = [c for c in request.class_ids if c >= len(self.class_names)]
        if bad:
            raise InvalidRequestError("class_label", f"class_label must be an integer in "
                                                     f"[0, {len(self.class_names) - 1}], got {bad[0]}")
        check_steps(s.num_inference_steps, limits.max_inference_steps)
        self.contract.check(s, max_steps=limits.max_inference_steps, max_guidance_scale=limits.max_guidance_scale)
        if s.cache_policy.caches and request.rows > self.max_cache_rows:
            why = ("this deployment keeps no feature cache (feature_cache_rows: 0)" if not self.max_cache_rows else
                   f"n={request.num_images} needs {request.rows} rows of the feature cache, which holds "
                   f"{self.max_cache_rows}")
            raise InvalidRequestError("cache", f"cache must be one of {', '.join(self.cache_policies)} here: {why}")
        if request.rows > self.max_rows:
            raise InvalidRequestError("n", f"n={request.num_images} with guidance_scale {s.guidance_scale:g} needs "
                                           f"{request.rows} batch rows, but this model runs at most {self.max_rows} "
                                           f"(an image takes {s.rows_per_image} here): ask for n <= "
                                           f"{self.max_rows // s.rows_per_image}")
        if self.resolution * request.upscale > limits.max_image_side:
            raise InvalidRequestError("size", f"size must be 'WxH' with sides up to {limits.max_image_side}, got "
                                              f"upscale {request.upscale} of {self.resolution}")

    @property
    def cache_policies(self) -> tuple[str, ...]:
        """The `cache` presets this deployment runs."""
        return self.contract.cache_presets if self.max_cache_rows else ("off",)

    @property
    def fingerprint(self) -> str:
        """A short digest of everything in this spec: another value means the model was redeployed differently."""
        return hashlib.sha1(repr(self).encode()).hexdigest()[:16]
