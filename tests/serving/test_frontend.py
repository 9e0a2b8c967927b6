"""The HTTP API in this process, in front of a model that answers at once: no Ray cluster, no engine.

The API is the same code for the gateway and a model's own route; here it sits on a fake ``ModelBackend`` (the small
protocol it depends on), so what it does with a request, and with its own settings, can be checked exactly: a
request reaches the model as one resolved ``GenerationRequest``, and two APIs in one process keep their settings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time

import httpx
import pytest

from dit_runtime.contract import SamplingContract
from dit_runtime.request import GenerationRequest, ModelSpec, RequestLimits, SamplingParams
from serving.backend import EncodedImages, Progress, Readiness, ReplicaLoad
from serving.config import AuthArgs, Limits
from serving.errors import APIError
from serving.frontend import Frontend
from serving.protocol import ImageData, ImagesResponse, Timings, images_response_json

SPEC = ModelSpec(class_names=("zero", "one", "two", "three"), resolution=16, channels=1, space="pixel",
                 parameters=1000, max_rows=8,
                 contract=SamplingContract(defaults=SamplingParams(num_inference_steps=7, sampler="ddim",
                                                                   guidance_scale=3.0)),
                 limits=RequestLimits(max_images_per_request=4, max_inference_steps=50, max_guidance_scale=10.0,
                                      max_image_side=64), max_cache_rows=4, precision="bf16")


class FakeModel:
    """Answers every request at once with one fake PNG per image, and keeps what it was asked."""

    def __init__(self):
        self.requests: list[GenerationRequest] = []

    async def spec(self) -> ModelSpec:
        return SPEC

    async def generate(self, request: GenerationRequest) -> EncodedImages:
        self.requests.append(request)
        return EncodedImages((b"UE5H",) * request.num_images, "png", seed=request.sampling.seed or 7, queue_seconds=0.0,
                             denoise_seconds=0.0, engine_seconds=0.001)

    async def stream(self, request: GenerationRequest):
        self.requests.append(request)
        for step in range(1, request.sampling.num_inference_steps + 1):
            yield Progress(step, request.sampling.num_inference_steps)
        yield await self.generate(request)

    async def ready(self) -> Readiness:
        return Readiness(True, None, ReplicaLoad(running_requests=0, running_images=0, waiting_requests=1,
                                                 waiting_images=2, steps_done=5, estimated_wait_s=0.25))


def call(frontend: Frontend, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=frontend.build_asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture
def model():
    return FakeModel()


@pytest.fixture
def api(model):
    return Frontend({"fake": model}, Limits(max_body_bytes=2048), AuthArgs(api_keys_env=None))


def test_a_request_reaches_the_model_once_resolved_against_its_spec(api, model):
    started = time.time()
    r = call(api, "POST", "/v1/images/generations", json={"prompt": "Two", "n": 2, "size": "32x32"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["b64_json"] for d in body["data"]] == ["UE5H", "UE5H"] and body["timings"]["server_seconds"] > 0
    (request,) = model.requests
    assert request.class_ids == (2, 2) and request.upscale == 2
    assert request.sampling == SamplingParams(num_inference_steps=7, sampler="ddim", guidance_scale=3.0)
    assert started + Limits().request_timeout_s <= request.deadline <= time.time() + Limits().request_timeout_s


@pytest.mark.parametrize("n, server_seconds", [(1, 0.25), (4, None), (0, 1e-7)])
def test_the_composed_answer_is_the_json_pydantic_would_write(n, server_seconds):
    rng = random.Random(n)
    files = [base64.b64encode(rng.randbytes(rng.randrange(1, 3000))) for _ in range(n)]
    timings = Timings(queue_seconds=0.5, denoise_seconds=1 / 3, engine_seconds=2.0, server_seconds=server_seconds)
    fields = dict(created=1_767_000_000, output_format="webp", seed=2**63 - 1, timings=timings)
    body = images_response_json(files, **fields)
    expected = ImagesResponse(data=[ImageData(b64_json=f.decode()) for f in files], **fields)
    assert body == expected.model_dump_json().encode()
    assert ImagesResponse.model_validate_json(body) == expected


def test_the_cache_preset_travels_with_the_request(api, model):
    r = call(api, "POST", "/v1/images/generations", json={"prompt": "1", "n": 2, "cache": "fast"})
    assert r.status_code == 200, r.text
    assert model.requests[0].sampling.cache == "fast"


@pytest.mark.parametrize("body, param, needle", [
    ({"prompt": "3", "n": 5}, "n", "[1, 4]"),
    ({"prompt": "3", "num_inference_steps": 51}, "num_inference_steps", "[1, 50]"),
    ({"prompt": "3", "guidance_scale": 10.5}, "guidance_scale", "[1, 10]"),
    ({"prompt": "four"}, "prompt", "'zero', 'one'"),
    ({"prompt": "3", "n": 5, "guidance_scale": 1.0}, "n", "[1, 4]"),
    ({"prompt": "3", "size": "48x32"}, "size", "16x16, 32x32, 48x48, 64x64"),
    ({"prompt": "3", "sead": 1}, "sead", "unknown field"),
    ({"prompt": "3", "n": "two"}, "n", "valid integer"),
    ({"prompt": "3", "cache": "turbo"}, "cache", "off, balanced, fast"),
    ({"prompt": "3", "n": 3, "cache": "balanced"}, "cache", "6 rows of the feature cache, which holds 4"),
])
def test_bad_fields_are_refused_before_the_model_is_asked(api, model, body, param, needle):
    r = call(api, "POST", "/v1/images/generations", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and needle in error["message"], error
    assert model.requests == []


def test_the_stream_is_framed_as_server_sent_events(api):
    r = call(api, "POST", "/v1/images/generations", json={"prompt": "1", "num_inference_steps": 3, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [(e["type"], e.get("step")) for e in parsed] == [
        ("image_generation.progress", 1), ("image_generation.progress", 2), ("image_generation.progress", 3),
        ("image_generation.completed", None)]


def test_a_model_error_reaches_the_client_in_openai_shape_with_retry_after(api, model):
    async def full(request):
        raise APIError(429, "model 'fake' is at capacity", code="queue_full", retry_after=1.5)
    model.generate = full
    r = call(api, "POST", "/v1/images/generations", json={"prompt": "1"})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"] == {"message": "model 'fake' is at capacity", "type": "rate_limit_error",
                                 "param": None, "code": "queue_full"}


def test_the_schema_declares_the_request_body_the_route_reads(api):
    """The route is answered in front of FastAPI's router, so its schema is declared by hand: it must be complete."""
    schema = call(api, "GET", "/openapi.json").json()
    ref = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    assert {"prompt", "n", "size", "seed", "num_inference_steps", "guidance_scale", "stream"} <= set(body["properties"])
    assert body["additionalProperties"] is False
    assert body["properties"]["guidance_scale"]["maximum"] == 20.0  # the bound every model shares
    answers = schema["paths"]["/v1/images/generations"]["post"]["responses"]
    assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImagesResponse")
    assert answers["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert call(api, "GET", "/v1/images/generations").status_code == 405


def test_two_apis_in_one_process_keep_their_own_limits_and_keys(model, monkeypatch):
    monkeypatch.setenv("DIT_TEST_KEYS", "sk-a")
    guarded = Frontend({"fake": model}, Limits(max_body_bytes=1024), AuthArgs(api_keys_env="DIT_TEST_KEYS"))
    roomy = Frontend({"fake": model}, Limits(max_body_bytes=8192), AuthArgs(api_keys_env=None))
    padded = {"prompt": "1", "user": "x" * 200, "pad": " " * 2000}
    assert call(guarded, "POST", "/v1/images/generations", json={"prompt": "1"}).status_code == 401
    assert call(guarded, "POST", "/v1/images/generations", json=padded,
                headers={"Authorization": "Bearer sk-a"}).status_code == 413
    assert call(roomy, "POST", "/v1/images/generations", json={"prompt": "1"}).status_code == 200
    r = call(roomy, "POST", "/v1/images/generations", json=padded)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"  # read, not refused for size


def test_models_and_readiness_come_from_the_spec(api):
    card = call(api, "GET", "/v1/models/fake").json()
    assert card["status"] == "ready" and card["class_names"][3] == "three" and card["resolution"] == [16, 16]
    assert card["defaults"] == {"num_inference_steps": 7, "sampler": "ddim", "guidance_scale": 3.0, "cache": "off"}
    assert card["cache_policies"] == ["off", "balanced", "fast"]
    assert card["samplers"] == ["ddpm", "ddim", "dpm-solver++"] and card["precision"] == "bf16"
    assert card["max_images_per_request"] == 4
    assert call(api, "GET", "/readyz").json() == {"status": "ready", "models": {
        "fake": {"ready": True, "detail": None, "load": {
            "running_requests": 0, "running_images": 0, "waiting_requests": 1, "waiting_images": 2, "steps_done": 5,
            "estimated_wait_s": 0.25}}}}
    assert call(api, "GET", "/v1/models/other").status_code == 404
