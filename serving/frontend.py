"""The HTTP API, shared by both ingresses: the gateway (every model, behind deployment handles) and a model
replica serving its own model directly (one hop, see ``app.build_model_app``).

Routes: ``POST /v1/images/generations`` (OpenAI's images API; ``stream: true`` for server-sent events),
``GET /v1/models``, ``GET /healthz`` (liveness: this process answers), ``GET /readyz`` (readiness: every model is
loaded and its engine loop healthy), ``GET /openapi.json``. With API keys configured (``auth`` in the config), the
``/v1`` routes need ``Authorization: Bearer <key>``. No torch here: the gateway process stays small.

``Frontend`` holds the routes; a subclass says where a request goes (``_call_unary``, ``_open_stream``,
``_describe``, ``_ready``) and may refuse it early (``_admit``). ``make_api`` builds one FastAPI app with the
middleware, the error handlers and the routes; each ingress class gets its own (``serve.ingress`` rewrites the app
it is given into views of that class).
"""


import abc
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import AuthArgs, Limits
from .errors import APIError
from .metrics import GatewayMetrics
from .protocol import DEADLINE_KEY, ErrorResponse, ImageGenerationRequest, ImagesResponse, ModelList, check_limits

log = logging.getLogger("ray.serve")

UNKNOWN_MODEL = "unknown"  # metrics label of requests for no configured model (bounded label values)
RETRY_AFTER_UNAVAILABLE_S = 2.0
# The API stops waiting for a model this long after the request's deadline, in case it cannot answer at all (the
# engine itself answers 504 at the deadline; this only bounds a hung engine or an unreachable replica).
DEADLINE_GRACE_S = 5.0
PROTECTED_PREFIX = "/v1/"  # what API keys guard; /healthz, /readyz and /openapi.json stay open
GENERATIONS_ROUTE = "/v1/images/generations"

ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 429, 503, 504)}


class _State:
    """Per-process settings the middleware and error handlers need (set by Frontend.__init__)."""

    limits = Limits()
    metrics: GatewayMetrics | None = None
    key_digests: list[bytes] = []  # sha256 of each accepted API key; empty: no keys, the API is open
    frontend: "Frontend | None" = None  # the ingress of this process (Ray runs one replica per process)


def load_api_keys(auth: AuthArgs) -> list[str]:
    """The API keys from the environment variable and the file named by the config (a missing file is an error)."""
    keys = []
    if auth.api_keys_env:
        keys += [k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",")]
    if auth.api_keys_file:
        lines = Path(auth.api_keys_file).read_text().splitlines()
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


def _key_matches(presented: str, digests: list[bytes]) -> bool:
    """Constant-time: compare sha256 digests (equal lengths) with hmac.compare_digest, against every key."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    found = False
    for d in digests:
        found |= hmac.compare_digest(digest, d)
    return found


def _route(scope) -> str:
    """The request path inside this app (Starlette's ``path`` includes the app's route prefix, ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class APIKeyAuth:
    """Refuse /v1 requests without a valid ``Authorization: Bearer <key>`` (401, OpenAI's error shape)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        digests = _State.key_digests
        if scope["type"] != "http" or not digests or not _route(scope).startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key.strip() and _key_matches(key.strip(), digests):
            return await self.app(scope, receive, send)
        message = ("missing API key: send `Authorization: Bearer <key>`" if not header else
                   "invalid API key in the Authorization header (want `Bearer <key>` with a key this server accepts)")
        error = APIError(401, message, code="invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over ``limits.max_body_bytes`` with 413, by Content-Length or while reading them, and
    POST bodies declared as anything but JSON with 415 (FastAPI would try to parse a form and fail with a 500)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _State.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _error_response(_too_large(int(declared), limit))(scope, receive, send)
        media_type = dict(scope["headers"]).get(b"content-type", b"application/json").split(b";")[0].strip()
        if scope["method"] == "POST" and media_type.lower() != b"application/json":
            error = APIError(415, f"the request body must be JSON sent with `Content-Type: application/json`, got "
                                  f"{media_type.decode('latin-1')[:80]!r}", param=None, code="unsupported_media_type")
            return await _error_response(error)(scope, receive, send)
        # Read the body here (it is small by definition) so an oversized one is refused before the app sees it:
        # an error raised from inside FastAPI's body parsing would come out as a generic 400.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _error_response(_too_large(len(body), limit))(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


class FastGenerations:
    """``POST /v1/images/generations`` with a valid body, answered by ``Frontend.create_images`` without FastAPI's
    router, dependency solving and exception middleware in between (the largest share of the replica's per-request
    CPU time we could remove; ``scripts/api_overhead.py`` measures it). It is a shortcut, not a second API: the body
    is validated by the same pydantic model, and a body that fails validation, like every other route, goes on to
    FastAPI unchanged, so every error answer and the OpenAPI schema stay FastAPI's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        frontend = _State.frontend
        if (scope["type"] != "http" or scope["method"] != "POST" or frontend is None
                or _route(scope) != GENERATIONS_ROUTE):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while not messages or messages[-1].get("more_body", False):  # BodySizeLimit replays it as one message
            messages.append(await receive())
            if messages[-1]["type"] != "http.request":
                return await self.app(scope, _replay(messages, receive), send)
            body += messages[-1].get("body", b"")
        try:
            request = ImageGenerationRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError: FastAPI parses it again and answers its own 400
            return await self.app(scope, _replay(messages, receive), send)
        try:
            response = await frontend.create_images(request)
        except APIError as e:
            response = _error_response(e)
        await response(scope, receive, send)


def _replay(messages: list[dict], receive):
    """An ASGI receive that first returns ``messages``, then defers to the real one (for disconnects)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes is over the limit of {limit} bytes (limits.max_body_bytes)",
                    code="body_too_large")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error_response(e)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """Schema errors in OpenAI's shape: 400 naming the first bad field, with pydantic's statement of the range."""
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the request field; deeper parts name pydantic's union members (`int`)
    if first.get("type") == "json_invalid":
        error = APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    elif first.get("type") == "extra_forbidden":
        error = APIError(400, f"unknown field {param!r}; see /openapi.json for the fields this API accepts",
                         param=param, code="unknown_field")
    elif first.get("type") == "missing" and not loc:
        error = APIError(400, "the request needs a JSON body", code="missing_body")
    else:
        got = first.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f", got {json.dumps(got)[:80]}"
        error = APIError(400, f"{param}: {first.get('msg')}{shown}", param=param, code="invalid_value")
    if _State.metrics is not None and request.url.path.endswith("/images/generations"):
        _State.metrics.record(UNKNOWN_MODEL, 400, 0.0)
    return _error_response(error)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {400: "invalid_json", 404: "route_not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}"
    if e.status_code == 400:  # FastAPI's own parse failure, e.g. a body that is not UTF-8
        message += "; send a UTF-8 JSON object"
    return _error_response(APIError(e.status_code, message, code=code))


async def _sse_events(model: str, first: dict, gen, metrics: GatewayMetrics, started: float):
    """Server-sent events of a streamed request: progress per step, then the images (or an error), then [DONE].

    Module level on purpose: Ray pickles the ingress class by value, and a closure inside it would lose its globals.
    """
    status = 200
    done = False
    try:
        item = first
        while True:
            if "error" in item:
                error = APIError.from_dict(item["error"])
                status = error.status
                yield _sse("error", {"type": "error", **error.body()})
                break
            if "progress" in item:
                yield _sse("image_generation.progress", {"type": "image_generation.progress", **item["progress"]})
            else:
                yield _sse("image_generation.completed", {"type": "image_generation.completed", **item["result"]})
                break
            try:
                item = await gen.__anext__()
            except StopAsyncIteration:
                break
            except Exception as e:
                item = {"error": _handle_error(model, e).to_dict()}
        done = True
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
        status = 499
        raise
    finally:
        metrics.record(model, status, time.perf_counter() - started)
        if not done:  # stop the model's work: a handle's stream is cancelled, an in-process generator closed
            if hasattr(gen, "cancel"):
                gen.cancel()
            elif hasattr(gen, "aclose"):
                await gen.aclose()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _unavailable(model: str, e: Exception, why: str | None = None) -> APIError:
    return APIError(503, f"model {model!r} has no replica able to take the request right now "
                         f"({why or type(e).__name__}); retry after the Retry-After delay", code="model_unavailable",
                    retry_after=RETRY_AFTER_UNAVAILABLE_S)


def _handle_error(model: str, e: Exception) -> APIError:
    """Map errors of a call to a model (through a deployment handle, or in this process) to API errors."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BackPressureError):
        return APIError(503, f"model {model!r} is overloaded: its replicas' request queues are full; retry after "
                             "the Retry-After delay", code="overloaded", retry_after=1.0)
    if isinstance(e, (RayActorError, DeploymentUnavailableError)):
        return _unavailable(model, e)
    if isinstance(e, TimeoutError):
        return APIError(504, f"model {model!r} did not answer within the request's deadline", code="deadline_exceeded")
    log.exception("request to model %r failed", model)
    return APIError(500, f"model {model!r} failed: {type(e).__name__}: {e}"[:1000], code="internal_error")


def _not_found(model: str, served: list[str]) -> APIError:
    return APIError(404, f"model {model!r} not found; this server has {', '.join(served)}", param="model",
                    code="model_not_found")


class Frontend(abc.ABC):
    """The routes of the API. A subclass decides where a validated request goes; everything a client sees
    (validation, limits, deadlines, error shapes, SSE framing, the request metrics) is here, once."""

    def __init__(self, model_names: list[str], limits: Limits, auth: AuthArgs):
        self.model_names = list(model_names)
        self.default_model = self.model_names[0]
        self.limits = limits
        self.request_metrics = GatewayMetrics()
        _State.limits, _State.metrics, _State.frontend = limits, self.request_metrics, self
        keys = load_api_keys(auth)
        _State.key_digests = [hashlib.sha256(k.encode("utf-8", "surrogateescape")).digest() for k in keys]
        log.info("%s: %s", type(self).__name__, f"{len(keys)} API key(s) guard {PROTECTED_PREFIX}" if keys else
                 "no API keys configured, the API is open")

    # ---- where requests go (the subclass) -----------------------------------------------------------------------
    @abc.abstractmethod
    async def _call_unary(self, model: str, payload: dict) -> dict:
        """``{"result": ImagesResponse dict}`` or ``{"error": APIError dict}``; may raise."""

    @abc.abstractmethod
    def _open_stream(self, model: str, payload: dict):
        """An async iterator of ``{"progress"}`` ... then ``{"result"}`` or ``{"error"}`` items."""

    @abc.abstractmethod
    async def _describe(self, model: str) -> dict:
        """The model's ModelCard as a dict; never raises."""

    @abc.abstractmethod
    async def _ready(self, model: str) -> dict:
        """``{"ready": bool, "detail": ...}``; never raises."""

    async def _admit(self, model: str) -> None:
        """Refuse a request before any work (raise APIError), or count it in; paired with ``_release``."""

    def _release(self, model: str) -> None:
        pass

    async def _why_unavailable(self, model: str, e: Exception) -> str:
        return f"no replica of model {model!r} answered: {e!r}"[:500]

    # ---- routes (registered by make_api) ------------------------------------------------------------------------
    async def create_images(self, body: ImageGenerationRequest):
        started = time.perf_counter()
        model = body.model or self.default_model
        label = model if model in self.model_names else UNKNOWN_MODEL
        status = 500
        try:
            if model not in self.model_names:
                raise _not_found(model, self.model_names)
            check_limits(body, self.limits)
            payload = body.model_dump(exclude={"model", "stream", "user", "response_format"})
            payload[DEADLINE_KEY] = time.time() + self.limits.request_timeout_s  # from arrival, not from admission
            await self._admit(model)
            try:
                if body.stream:
                    response = await self._stream(model, payload, started)
                    status = None  # recorded when the stream ends
                    return response
                out = await self._call_unary(model, payload)
            finally:
                self._release(model)
            if "error" in out:
                raise APIError.from_dict(out["error"])
            status = 200
            out["result"]["timings"]["server_seconds"] = time.perf_counter() - started
            return JSONResponse(out["result"])
        except APIError as e:
            status = e.status
            raise
        except asyncio.CancelledError:  # the client went away; the model call is cancelled, freeing its batch rows
            status = 499
            raise
        except Exception as e:  # anything unforeseen still answers in OpenAI's shape (and is logged)
            error = await self._call_error(model, e)
            status = error.status
            raise error from e
        finally:
            if status is not None:  # after the answer is on its way: the loop's next turn, off the critical path
                asyncio.get_running_loop().call_soon(self.request_metrics.record, label, status,
                                                     time.perf_counter() - started)

    async def list_models(self) -> dict:
        answers = await asyncio.gather(*(self._describe(n) for n in self.model_names))
        return {"object": "list", "data": answers}

    async def get_model(self, model: str) -> dict:
        if model not in self.model_names:
            raise _not_found(model, self.model_names)
        return await self._describe(model)

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        answers = await asyncio.gather(*(self._ready(n) for n in self.model_names))
        models = dict(zip(self.model_names, answers))
        ok = all(a["ready"] for a in answers)
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                            status_code=200 if ok else 503)

    async def _stream(self, model: str, payload: dict, started: float) -> StreamingResponse:
        try:
            gen = self._open_stream(model, payload)
            first = await gen.__anext__()
        except APIError:
            raise
        except Exception as e:
            raise await self._call_error(model, e)
        if "error" in first:  # refused before any work: a plain JSON error, not a stream
            raise APIError.from_dict(first["error"])
        return StreamingResponse(_sse_events(model, first, gen, self.request_metrics, started),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _call_error(self, model: str, e: Exception) -> APIError:
        if isinstance(e, DeploymentUnavailableError):
            return _unavailable(model, e, await self._why_unavailable(model, e))
        return _handle_error(model, e)


def make_api(description: str, fast_path: bool = True) -> FastAPI:
    """A FastAPI app with the API's middleware, error handlers and the routes of ``Frontend``; ``fast_path=False``
    leaves out ``FastGenerations`` (to measure it)."""
    api = FastAPI(title="DiT Serve", version="0.1.0", description=description)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    if fast_path:
        api.add_middleware(FastGenerations)  # after the body checks: it sees only bodies they let through
    api.add_middleware(BodySizeLimit)
    api.add_middleware(APIKeyAuth)  # added last, runs first: no body is read for a client without a key
    api.post(GENERATIONS_ROUTE, response_model=ImagesResponse, responses=ERROR_RESPONSES,
             summary="Create images (OpenAI images API; `stream: true` for server-sent events)")(Frontend.create_images)
    api.get("/v1/models", response_model=ModelList, summary="The served models")(Frontend.list_models)
    api.get("/v1/models/{model}", summary="One served model", responses=ERROR_RESPONSES)(Frontend.get_model)
    api.get("/healthz", summary="Liveness: this process answers")(Frontend.healthz)
    api.get("/readyz", summary="Readiness: every model loaded and its engine healthy (503 otherwise)")(
        Frontend.readyz)
    return api
