"""HTTP schemas: OpenAI's images API (``POST /v1/images/generations``) plus our extension fields.

The official ``openai`` client sends ``model``, ``prompt``, ``n``, ``size``, ``response_format`` and ``user``; our
extensions (``class_label``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``sampler``, ``stream``) travel as
extra body fields (``extra_body=...``). Static bounds live here; the per-deployment limits (n, steps, guidance, size)
come from the config and are checked by ``check_limits``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import Limits
from .errors import invalid

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Payload key (gateway -> model replica) of the request's deadline in Unix seconds; not a client field.
DEADLINE_KEY = "deadline_unix"


class ImageGenerationRequest(BaseModel):
    """A request for ``n`` images of one class of the chosen model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(),
                              json_schema_extra={"example": {"model": "digits-s", "prompt": "3", "n": 2,
                                                             "response_format": "b64_json", "seed": 1}})

    model: str | None = Field(None, max_length=64, description="model id from GET /v1/models; default: the first")
    prompt: str | None = Field(None, min_length=1, max_length=1000,
                               description="a class name or class id of the model, e.g. '3' or 'seven'")
    n: int = Field(1, ge=1, description="number of images (at most the server's limits.max_images_per_request)")
    size: str | None = Field(None, max_length=16,
                             description="'WxH'; the model's resolution times a whole factor, up to the server's "
                                         "limits.max_image_side; default: the model's resolution")
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    stream: bool = Field(False, description="answer with server-sent events: progress per step, then the images")
    # Extensions.
    class_label: int | list[int] | None = Field(None, description="class id(s) instead of a prompt: one, or one "
                                                                  "per image")
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="same seed and request, same images")
    num_inference_steps: int | None = Field(None, ge=1, description="denoising steps (default from the config)")
    guidance_scale: float | None = Field(None, ge=1.0, allow_inf_nan=False,
                                         description="classifier-free guidance; 1 disables it")
    sampler: str | None = Field(None, max_length=32, description="ddpm, ddim or dpm-solver++")


def check_limits(req: ImageGenerationRequest, limits: Limits) -> None:
    """Raise a 400 naming the first field past the configured limits, with the allowed range."""
    if req.n > limits.max_images_per_request:
        raise invalid("n", f"n must be an integer in [1, {limits.max_images_per_request}], got {req.n}")
    if req.num_inference_steps is not None and req.num_inference_steps > limits.max_inference_steps:
        raise invalid("num_inference_steps", f"num_inference_steps must be an integer in "
                                             f"[1, {limits.max_inference_steps}], got {req.num_inference_steps}")
    if req.guidance_scale is not None and req.guidance_scale > limits.max_guidance_scale:
        raise invalid("guidance_scale", f"guidance_scale must be a number in [1, {limits.max_guidance_scale:g}], "
                                        f"got {req.guidance_scale:g}")
    if req.prompt is None and req.class_label is None:
        raise invalid("prompt", "give a prompt (a class name or id of the model) or class_label", "missing")
    if isinstance(req.class_label, list) and len(req.class_label) not in (1, req.n):
        raise invalid("class_label", f"class_label must be one class id or a list of n={req.n} ids, "
                                     f"got {len(req.class_label)}")
    if req.size is not None and req.size != "auto":
        m = SIZE.match(req.size)
        if not m or max(int(m[1]), int(m[2])) > limits.max_image_side:
            raise invalid("size", f"size must be 'WxH' with sides up to {limits.max_image_side}, got {req.size!r}")


def upscale_factor(size: str | None, height: int, width: int, max_side: int) -> int:
    """The whole factor that turns the model's (height, width) into ``size``; 400 listing the valid sizes if none."""
    if size is None or size == "auto":
        return 1
    m = SIZE.match(size)
    w, h = (int(m[1]), int(m[2])) if m else (0, 0)
    if w and h and w % width == 0 and h * width == w * height and w // width >= 1 and max(w, h) <= max_side:
        return w // width
    valid = [f"{width * k}x{height * k}" for k in range(1, max_side // max(height, width) + 1)]
    shown = ", ".join(valid[:6] + (["...", valid[-1]] if len(valid) > 7 else valid[6:]))
    raise invalid("size", f"size must be this model's resolution times a whole factor: one of {shown}; "
                          f"got {size!r}")


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG, base64-encoded")


class Timings(BaseModel):
    """Where the time went inside the engine (extension; lets clients separate serving overhead)."""

    queue_seconds: float
    denoise_seconds: float
    engine_seconds: float
    server_seconds: float | None = Field(None, description="time inside the API route that answered, from the "
                                                          "validated request to the response (engine included)")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, seconds")
    data: list[ImageData]
    seed: int = Field(description="the seed used (extension): send it back for the same images")
    timings: Timings


class ProgressEvent(BaseModel):
    """One SSE event per denoising step of a streamed request."""

    type: Literal["image_generation.progress"] = "image_generation.progress"
    step: int
    num_steps: int


class ModelCard(BaseModel):
    """An entry of GET /v1/models: OpenAI's fields plus what a client needs to ask for images."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dit-serve"
    status: Literal["ready", "unavailable"]
    detail: str | None = None
    parameters: int | None = None
    resolution: list[int] | None = Field(None, description="[height, width] of the model's images")
    channels: int | None = None
    space: Literal["pixel", "latent"] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    supports_guidance: bool | None = None
    max_batch_size: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer, as OpenAI's clients expect it."""

    error: ErrorDetail
