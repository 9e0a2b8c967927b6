"""The HTTP API's own CPU time per image request, in-process: no socket, no Ray, no engine.

    python -m benchmarks api [--requests 3000] [--rounds 5] [--out OUT]

Drives the API's ASGI app (``Frontend.build_asgi_app``) directly, in front of a model that answers at once with a
one-image answer of the size the H200 benchmarks return: what remains is the API's work per request (middleware,
routing, parsing and validating the body, building the request from the spec, the JSON answer, metrics). The table
gives the median over rounds of the mean microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from dit_runtime.contract import SamplingContract
from dit_runtime.request import GenerationRequest, ModelSpec, RequestLimits
from serving.backend import EncodedImages, Readiness
from serving.config import AuthArgs, Limits
from serving.frontend import Frontend

ANSWER_B64_CHARS = 5480  # a 32x32x4 latent view's PNG (4,109 bytes) in base64, what the H200 benchmarks return
MODEL = "dit-10l"
SPEC = ModelSpec(class_names=tuple(f"class_{i}" for i in range(1000)), resolution=32, channels=4, space="latent",
                 parameters=0, max_rows=64, contract=SamplingContract(), limits=RequestLimits())


class ReadyModel:
    """A model that answers at once (what the route costs without the engine)."""

    async def spec(self) -> ModelSpec:
        return SPEC

    async def generate(self, request: GenerationRequest) -> EncodedImages:
        return EncodedImages(("A" * ANSWER_B64_CHARS,) * request.num_images, "png", seed=1, queue_seconds=0.0,
                             denoise_seconds=0.0, engine_seconds=0.0)

    def stream(self, request: GenerationRequest):
        raise NotImplementedError

    async def ready(self) -> Readiness:
        return Readiness(True)


async def call(app, body: bytes, path: str = "/v1/images/generations") -> tuple[int, bytes]:
    """One request through the ASGI app: (status, body)."""
    sent = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)  # no disconnect while the answer is written

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def timed(app, body: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call(app, body)
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks api", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    app = Frontend({MODEL: ReadyModel()}, Limits(), AuthArgs(api_keys_env=None)).build_asgi_app()
    body = json.dumps({"model": MODEL, "prompt": "3", "n": 1, "num_inference_steps": 25}).encode()
    status, answer = asyncio.run(call(app, body))
    if status != 200:
        print(f"the API answered {status}: {answer[:300]!r}", file=sys.stderr)
        return 1
    asyncio.run(timed(app, body, 200))  # warm
    rounds = [asyncio.run(timed(app, body, a.requests)) * 1e6 for _ in range(a.rounds)]
    result = {"requests_per_round": a.requests, "rounds": a.rounds, "python": sys.version.split()[0],
              "us_per_request_median": round(statistics.median(rounds), 1),
              "us_per_request_rounds": [round(x, 1) for x in rounds]}
    print(json.dumps(result))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "api.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0
