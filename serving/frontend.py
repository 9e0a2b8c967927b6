"""The HTTP API: one code path for every layout, in front of ``ModelBackend``s (backend.py).

Routes: ``POST /v1/images/generations`` (OpenAI's images API; ``stream: true`` for server-sent events),
``GET /v1/models`` and ``/v1/models/{model}``, ``GET /healthz`` (liveness: this process answers), ``GET /readyz``
(readiness: every model loaded and its engine loop healthy), ``GET /openapi.json``, and ``GET /``, the playground
page (static/playground.html: a browser client of the public API, nothing else). With API keys configured
(``auth``), the ``/v1`` routes need ``Authorization: Bearer <key>``. No torch here: the gateway process stays small.

The gateway (every model, through deployment handles) and a model serving its own route (in-process) are the same
``Frontend`` over other backends. A request is parsed into the HTTP schema, resolved against the model's spec into a
``GenerationRequest`` once (defaults, limits, class names: ``ModelSpec.build_request``), handed to the backend
unchanged, and its ``EncodedImages`` become the ``ImagesResponse``. Each replica builds its own app with its own
settings (Ray calls ``build_asgi_app`` through ``__serve_build_asgi_app__``): nothing is shared through globals.

The generations route has one path, ``GenerationsRoute``, in front of FastAPI's router: FastAPI's routing and
parameter machinery cost more CPU per request than the route's own work (``python -m benchmarks api``). FastAPI
serves the other routes and the OpenAPI schema, where the generations operation is declared (``openapi``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from dit_runtime.request import InvalidRequestError, ModelSpec

from .backend import EncodedImages, ModelBackend, Progress, deadline_left
from .config import AuthArgs, Limits
from .errors import ERROR_TYPES, APIError, invalid
from .metrics import GatewayMetrics
from .protocol import (ErrorResponse, ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList,
                       ProgressEvent, SamplingDefaults, Timings, images_response_json)

log = logging.getLogger("ray.serve")

UNKNOWN_MODEL = "unknown"  # metrics label of requests for no configured model (bounded label values)
# The API stops waiting for a model this long after the request's deadline, in case it cannot answer at all (the
# engine itself answers 504 at the deadline; this only bounds a hung engine or an unreachable replica).
DEADLINE_GRACE_S = 5.0
PROTECTED_PREFIX = "/v1/"  # what API keys guard; /, /healthz, /readyz and /openapi.json stay open
GENERATIONS_ROUTE = "/v1/images/generations"
ERROR_STATUSES = (400, 401, 404, 413, 415, 429, 503, 504)
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in ERROR_STATUSES}
PLAYGROUND_PAGE = "static/playground.html"  # package data of `serving`
# The page runs its own inline code and talks to this origin only: hosts may have no internet, and a browser then
# refuses anything the page would fetch from elsewhere.
PLAYGROUND_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                      "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; "
                      "form-action 'none'; frame-ancestors 'none'", "Cache-Control": "no-cache"}


def load_api_keys(auth: AuthArgs) -> list[str]:
    """The API keys from the environment variable and the file named by the config (a missing file is an error)."""
    keys = []
    if auth.api_keys_env:
        keys += [k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",")]
    if auth.api_keys_file:
        lines = Path(auth.api_keys_file).read_text().splitlines()
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _route(scope) -> str:
    """The request path inside this app (Starlette's ``path`` includes the app's route prefix, ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


class APIKeyAuth:
    """Refuse /v1 requests without a valid ``Authorization: Bearer <key>`` (401, OpenAI's error shape)."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.digests = [_digest(k) for k in keys]  # compared in constant time, digest against digest

    def accepts(self, presented: str) -> bool:
        digest, found = _digest(presented), False
        for d in self.digests:
            found |= hmac.compare_digest(digest, d)
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or not _route(scope).startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key.strip() and self.accepts(key.strip()):
            return await self.app(scope, receive, send)
        message = ("missing API key: send `Authorization: Bearer <key>`" if not header else
                   "invalid API key in the Authorization header (want `Bearer <key>` with a key this server accepts)")
        response = _error_response(APIError(401, message, code="invalid_api_key"))
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while reading them, and POST bodies
    declared as anything but JSON with 415 (the body is read here, so an oversized one never reaches the route)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"request body of {size} bytes is over the limit of {self.max_bytes} bytes "
                             "(limits.max_body_bytes)", code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(self._too_large(int(declared)))(scope, receive, send)
        media_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if scope["method"] == "POST" and media_type.lower() != b"application/json":
            error = APIError(415, f"the request body must be JSON sent with `Content-Type: application/json`, got "
                                  f"{media_type.decode('latin-1')[:80]!r}", code="unsupported_media_type")
            return await _error_response(error)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _error_response(self._too_large(len(body)))(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    """An ASGI receive that first returns ``messages``, then defers to the real one (for disconnects)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed


class GenerationsRoute:
    """``POST /v1/images/generations``, answered here in front of FastAPI's router: the route's one path. Its body
    has been read whole (and bounded) by ``BodySizeLimit``; every other request goes on to FastAPI."""

    def __init__(self, app, frontend: "Frontend"):
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _route(scope) != GENERATIONS_ROUTE:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            error = APIError(405, f"{scope['method']} {GENERATIONS_ROUTE}: Method Not Allowed; send a POST",
                             code="method_not_allowed")
            return await _error_response(error)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False) and message["type"] == "http.request"
        response = await self.frontend.generations(body)
        await response(scope, receive, send)


def validation_error(e: ValidationError) -> APIError:
    """A body that does not fit the schema, in OpenAI's shape: 400 naming the first bad field."""
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = loc[0] if loc else None  # the request field; deeper parts name pydantic's union members (`int`)
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}; see /openapi.json for the fields this API accepts",
                        param=param, code="unknown_field")
    if kind == "model_type" and not loc:
        return APIError(400, "the request body must be a JSON object with the fields of /openapi.json",
                        code="invalid_value")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f", got {json.dumps(got)[:80]}"
    return APIError(400, f"{param}: {first.get('msg')}{shown}", param=param, code="invalid_value")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class Frontend:
    """The API in front of ``backends`` (model name -> backend; the first is the default model). Everything a
    client sees (validation, limits, deadlines, error shapes, SSE framing, the request metrics) is here, once."""

    def __init__(self, backends: dict[str, ModelBackend], limits: Limits, auth: AuthArgs):
        self.backends = dict(backends)
        self.model_names = list(backends)
        self.limits = limits
        self.api_keys = load_api_keys(auth)  # a missing key file fails here, before any model loads
        self.metrics = GatewayMetrics()
        self.playground_html = resources.files(__package__).joinpath(PLAYGROUND_PAGE).read_bytes()
        log.info("API: %s", f"{len(self.api_keys)} API key(s) guard {PROTECTED_PREFIX}" if self.api_keys else
                 "no API keys configured, the API is open")

    def build_asgi_app(self) -> FastAPI:
        """This frontend's FastAPI app: its middleware (with its settings), error handlers and routes."""
        api = FastAPI(title="DiT Serve", version="0.1.0",
                      description="Class-conditional DiT image generation behind OpenAI's images API.")
        api.add_exception_handler(APIError, self._api_error)
        api.add_exception_handler(StarletteHTTPException, self._http_error)
        api.add_middleware(GenerationsRoute, frontend=self)
        api.add_middleware(BodySizeLimit, max_bytes=self.limits.max_body_bytes)
        api.add_middleware(APIKeyAuth, keys=self.api_keys)  # added last, runs first: no body read without a key
        api.openapi = lambda: openapi(api)
        api.get("/v1/models", response_model=ModelList, summary="The served models")(self.list_models)
        api.get("/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES,
                summary="One served model")(self.get_model)
        api.get("/healthz", summary="Liveness: this process answers")(self.healthz)
        api.get("/readyz", summary="Readiness: every model loaded and its engine healthy (503 otherwise)")(
            self.readyz)
        api.get("/", include_in_schema=False)(self.playground)
        return api

    # ---- POST /v1/images/generations --------------------------------------------------------------------------
    async def generations(self, raw: bytes) -> Response:
        """An image request's body, validated by the schema's own model, then answered."""
        try:
            body = ImageGenerationRequest.model_validate_json(raw)
        except ValidationError as e:
            self.metrics.record(UNKNOWN_MODEL, 400, 0.0)
            return _error_response(validation_error(e))
        return await self.create_images(body)

    async def create_images(self, body: ImageGenerationRequest) -> Response:
        started = time.perf_counter()
        model = body.model or self.model_names[0]
        label = model if model in self.backends else UNKNOWN_MODEL
        status = 500
        try:
            backend = self._backend(model)
            spec = await backend.spec()
            try:
                request = spec.build_request(prompt=body.prompt, class_label=body.class_label, n=body.n,
                                             size=body.size, num_inference_steps=body.num_inference_steps,
                                             sampler=body.sampler, guidance_scale=body.guidance_scale,
                                             cache=body.cache, seed=body.seed, output_format=body.output_format,
                                             output_compression=body.output_compression,
                                             deadline=time.time() + self.limits.request_timeout_s)
            except InvalidRequestError as e:
                raise invalid(e.field, str(e)) from None
            if body.stream:
                response = await self._stream(model, backend, request, started)
                status = None  # recorded when the stream ends
                return response
            try:  # a context, not wait_for: no task of its own per request
                async with asyncio.timeout(deadline_left(request, DEADLINE_GRACE_S)):
                    images = await backend.generate(request)
            except TimeoutError:
                raise APIError(504, f"model {model!r} did not answer within the request's deadline",
                               code="deadline_exceeded") from None
            status = 200
            return Response(images_response_json(images.b64_images, created=int(time.time()),
                                                 output_format=images.output_format, seed=images.seed,
                                                 timings=self._timings(images, started)),
                            media_type="application/json")
        except APIError as e:
            status = e.status
            return _error_response(e)
        except asyncio.CancelledError:  # the client went away; the model call is cancelled, freeing its batch rows
            status = 499
            raise
        except Exception as e:  # anything unforeseen still answers in OpenAI's shape (and is logged)
            log.exception("request to model %r failed", model)
            error = APIError(500, f"model {model!r} failed: {type(e).__name__}: {e}"[:1000], code="internal_error")
            status = error.status
            return _error_response(error)
        finally:
            if status is not None:  # after the answer is on its way: the loop's next turn, off the critical path
                asyncio.get_running_loop().call_soon(self.metrics.record, label, status,
                                                     time.perf_counter() - started)

    def _backend(self, model: str) -> ModelBackend:
        if model not in self.backends:
            raise APIError(404, f"model {model!r} not found; this server has {', '.join(self.model_names)}",
                           param="model", code="model_not_found")
        return self.backends[model]

    @staticmethod
    def _timings(images: EncodedImages, started: float | None) -> Timings:
        return Timings(queue_seconds=images.queue_seconds, denoise_seconds=images.denoise_seconds,
                       engine_seconds=images.engine_seconds,
                       server_seconds=None if started is None else time.perf_counter() - started)

    @classmethod
    def _images_response(cls, images: EncodedImages, started: float | None) -> ImagesResponse:
        """The answer as a model, for a stream's last event (a plain answer's JSON is composed:
        ``images_response_json``)."""
        return ImagesResponse(created=int(time.time()),
                              data=[ImageData(b64_json=b.decode("ascii")) for b in images.b64_images],
                              output_format=images.output_format, seed=images.seed,
                              timings=cls._timings(images, started))

    async def _stream(self, model: str, backend: ModelBackend, request, started: float) -> StreamingResponse:
        events = backend.stream(request)
        first = await events.__anext__()  # an error before any work is a plain JSON answer, not a stream
        return StreamingResponse(self._sse_events(model, first, events, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse_events(self, model: str, first, events, started: float):
        """Server-sent events: progress per step, then the images (or an error), then [DONE]."""
        status, item = 200, first
        try:
            while True:
                if isinstance(item, Progress):
                    event = ProgressEvent(step=item.step, num_steps=item.num_steps)
                    yield _sse(event.type, event.model_dump())
                else:
                    yield _sse("image_generation.completed", {"type": "image_generation.completed",
                                                              **self._images_response(item, None).model_dump()})
                    break
                try:
                    item = await events.__anext__()
                except StopAsyncIteration:
                    break
                except APIError as e:
                    status = e.status
                    yield _sse("error", {"type": "error", **e.body()})
                    break
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            status = 499
            raise
        finally:
            await events.aclose()  # stops the model's work when the stream did not end
            self.metrics.record(model, status, time.perf_counter() - started)

    # ---- the other routes -------------------------------------------------------------------------------------
    async def list_models(self) -> ModelList:
        return ModelList(data=await asyncio.gather(*(self._card(n) for n in self.model_names)))

    async def get_model(self, model: str) -> ModelCard:
        self._backend(model)
        return await self._card(model)

    async def _card(self, model: str) -> ModelCard:
        created = int(time.time())
        try:
            spec: ModelSpec = await self.backends[model].spec()
        except APIError as e:
            return ModelCard(id=model, created=created, status="unavailable", detail=e.message)
        d, limits, contract = spec.defaults, spec.limits, spec.contract
        return ModelCard(id=model, created=created, status="ready", resolution=[spec.resolution] * 2,
                         channels=spec.channels, space=spec.space, num_classes=len(spec.class_names),
                         class_names=list(spec.class_names), supports_guidance=spec.supports_guidance,
                         parameters=spec.parameters, max_batch_size=spec.max_rows,
                         defaults=SamplingDefaults(num_inference_steps=d.num_inference_steps, sampler=d.sampler,
                                                   guidance_scale=d.guidance_scale, cache=d.cache),
                         max_images_per_request=limits.max_images_per_request,
                         max_inference_steps=spec.max_inference_steps,
                         max_guidance_scale=spec.max_guidance_scale,
                         cache_policies=list(spec.cache_policies), samplers=list(contract.samplers),
                         step_counts=None if contract.step_counts is None else [
                             n for n in contract.step_counts if n <= spec.max_inference_steps],
                         guidance=contract.guidance,
                         distilled_from=contract.teacher.checkpoint if contract.teacher else None,
                         precision=spec.precision)

    async def playground(self) -> Response:
        """The playground page: open like /healthz (it asks for an API key itself when /v1 needs one)."""
        return Response(self.playground_html, media_type="text/html; charset=utf-8", headers=PLAYGROUND_HEADERS)

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        answers = await asyncio.gather(*(self.backends[n].ready() for n in self.model_names))
        models = {n: {"ready": a.ready, "detail": a.detail, **({"load": asdict(a.load)} if a.load is not None else {}),
                      **({"startup_s": a.startup.phases()} if a.startup is not None else {})}
                  for n, a in zip(self.model_names, answers)}
        ok = all(a.ready for a in answers)
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                            status_code=200 if ok else 503)

    @staticmethod
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @staticmethod
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_json", 404: "route_not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        code=code))


def openapi(api: FastAPI) -> dict:
    """FastAPI's schema of its routes, plus the generations operation that ``GenerationsRoute`` answers."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        refs, top = models_json_schema([(ImageGenerationRequest, "validation"), (ImagesResponse, "serialization"),
                                        (ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])
        body, images, error = (refs[(m, mode)] for m, mode in ((ImageGenerationRequest, "validation"),
                                                                (ImagesResponse, "serialization"),
                                                                (ErrorResponse, "serialization")))
        schema["paths"][GENERATIONS_ROUTE] = {"post": {
            "summary": "Create images (OpenAI images API; `stream: true` for server-sent events)",
            "operationId": "create_images",
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "the images, or with `stream: true` server-sent events",
                                  "content": {"application/json": {"schema": images}, "text/event-stream": {}}},
                          **{str(s): {"description": ERROR_TYPES[s], "content": {"application/json": {"schema": error}}}
                             for s in ERROR_STATUSES}}}}
        api.openapi_schema = schema
    return api.openapi_schema
