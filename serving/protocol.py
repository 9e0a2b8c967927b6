"""HTTP schemas: OpenAI's images API (``POST /v1/images/generations``) plus our extension fields.

The official ``openai`` client sends ``model``, ``prompt``, ``n``, ``size``, ``response_format``, ``output_format``,
``output_compression`` and ``user``; our extensions (``class_label``, ``seed``, ``num_inference_steps``,
``guidance_scale``, ``sampler``, ``cache``, ``stream``) travel as extra body fields (``extra_body=...``). These
schemas check types and shapes only: every bound (the ones all models share and a deployment's limits) is checked in
one place, ``dit_runtime.request``, when the API builds the request, and the ranges below are its constants, shown
in the schema for clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dit_runtime.request import (CACHE_POLICIES, DEFAULT_OUTPUT_COMPRESSION, MAX_GUIDANCE_SCALE, MAX_SEED,
                                 NUM_TRAIN_TIMESTEPS, OUTPUT_FORMATS, SAMPLERS, Sampler)


class ImageGenerationRequest(BaseModel):
    """A request for ``n`` images of one class of the chosen model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(),
                              json_schema_extra={"example": {"model": "digits-s", "prompt": "3", "n": 2,
                                                             "response_format": "b64_json", "seed": 1}})

    model: str | None = Field(None, max_length=64, description="model id from GET /v1/models; default: the first")
    prompt: str | None = Field(None, min_length=1, max_length=1000,
                               description="a class name or class id of the model, e.g. '3' or 'seven'")
    n: int = Field(1, description="number of images, from 1 to the model's max_images_per_request",
                   json_schema_extra={"minimum": 1})
    size: str | None = Field(None, max_length=16,
                             description="'WxH': the model's resolution times a whole factor, up to the server's "
                                         "limits.max_image_side; default: the model's resolution")
    response_format: Literal["b64_json"] = "b64_json"
    output_format: str | None = Field(None, max_length=16, description=f"the image files: one of "
                                                                        f"{', '.join(OUTPUT_FORMATS)}; default png")
    output_compression: int | None = Field(None, description=f"jpeg and webp: the encoder's quality, 0-100; default "
                                                             f"{DEFAULT_OUTPUT_COMPRESSION}",
                                           json_schema_extra={"minimum": 0, "maximum": 100})
    user: str | None = Field(None, max_length=256)
    stream: bool = Field(False, description="answer with server-sent events: progress per step, then the images")
    # Extensions.
    class_label: int | list[int] | None = Field(None, description="class id(s) instead of a prompt: one, or one "
                                                                  "per image")
    seed: int | None = Field(None, description="same seed and request, same images; default: a random one "
                                               "below 2**53, which JSON clients reading doubles hold exactly",
                             json_schema_extra={"minimum": 0, "exclusiveMaximum": MAX_SEED})
    num_inference_steps: int | None = Field(None, description="denoising steps, up to the model's "
                                                              "max_inference_steps; default: the model's",
                                            json_schema_extra={"minimum": 1, "maximum": NUM_TRAIN_TIMESTEPS})
    guidance_scale: float | None = Field(None, description="classifier-free guidance, up to the model's "
                                                           "max_guidance_scale; 1 disables it; default: the model's",
                                         json_schema_extra={"minimum": 1, "maximum": MAX_GUIDANCE_SCALE})
    sampler: str | None = Field(None, max_length=32, description=f"one of {', '.join(SAMPLERS)}; default: the "
                                                                 "model's")
    cache: str | None = Field(None, max_length=32,
                              description=f"feature caching: one of {', '.join(CACHE_POLICIES)} (the model card's "
                                          "cache_policies); the steps between full ones forecast the blocks' output "
                                          "instead of computing it; default: the model's")


class ImageData(BaseModel):
    b64_json: str = Field(description="an image file of the response's output_format, base64-encoded")


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
    output_format: str = Field(description="png, jpeg or webp: the files in data")
    seed: int = Field(description="the seed used (extension): send it back for the same images")
    timings: Timings


def images_response_json(b64_images: Sequence[bytes], *, created: int, output_format: str, seed: int,
                         timings: Timings) -> bytes:
    """An ``ImagesResponse``'s JSON, composed around its images: the fields around them are pydantic's own, and each
    base64 file (whose alphabet needs no escaping in JSON) goes into the body as it is. Built through pydantic, four
    256x256 PNGs cost a replica 0.69 ms of GIL a request on the H100 host, checking and copying strings that our own
    encoder wrote."""
    shell = ImagesResponse(created=created, data=[], output_format=output_format, seed=seed,
                           timings=timings).model_dump_json().encode()
    head, tail = shell.split(b'"data":[]', 1)
    files = b'{"b64_json":"' + b'"},{"b64_json":"'.join(b64_images) + b'"}' if b64_images else b""
    return b"".join((head, b'"data":[', files, b"]", tail))


class ProgressEvent(BaseModel):
    """One SSE event per denoising step of a streamed request."""

    type: Literal["image_generation.progress"] = "image_generation.progress"
    step: int
    num_steps: int


class SamplingDefaults(BaseModel):
    """What a model uses for the fields a request leaves out (its checkpoint's measured settings)."""

    num_inference_steps: int
    sampler: Sampler
    guidance_scale: float
    cache: str


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
    max_batch_size: int | None = Field(None, description="rows of one forward pass (a guided image takes two)")
    defaults: SamplingDefaults | None = None
    max_images_per_request: int | None = None
    max_inference_steps: int | None = None
    max_guidance_scale: float | None = None
    cache_policies: list[str] | None = Field(None, description="the `cache` presets this deployment runs")
    samplers: list[str] | None = Field(None, description="the `sampler` values this model runs")
    step_counts: list[int] | None = Field(None, description="the only `num_inference_steps` values a distilled "
                                                            "student takes (null: any in [1, max_inference_steps])")
    guidance: Literal["null-row", "embedded", "none"] | None = Field(
        None, description="how guidance is applied: a null-class row per image (two rows), an input of the model "
                          "(a distilled student: one row), or none")
    distilled_from: str | None = Field(None, description="a student's teacher checkpoint")
    precision: str | None = Field(None, description="what the deployment computes in: fp32, fp16, bf16 or fp8")


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
