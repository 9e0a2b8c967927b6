"""CPU time the HTTP API spends per image request, in-process: the ASGI app with and without the fast path.

    .venv/bin/python scripts/api_overhead.py [--requests 3000] [--rounds 5] [--out OUT]

Builds the model ingress's FastAPI app twice (``make_api(fast_path=True/False)``), routed to a Frontend whose model
answers at once with a ready response of a one-image answer's size, and drives each app directly through ASGI
(no socket, no Ray replica, no engine): what remains is the API's own work per request (middleware, routing,
validation, the route handler, metrics, the JSON answer). The two apps alternate in rounds; the table gives the
median over rounds of the mean microseconds per request. It also checks that both apps give the same status and
body for a set of valid and invalid requests, since the fast path must not change any answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.serve import context as serve_context  # noqa: E402
from ray.serve._private.http_util import make_fastapi_class_based_view  # noqa: E402

from serving.config import AuthArgs, Limits  # noqa: E402
from serving.frontend import Frontend, make_api  # noqa: E402

ANSWER_B64_CHARS = 5480  # a 32x32x4 latent view's PNG (4,109 bytes) in base64, what the H200 benchmarks return
MODEL = "dit-10l"


class ReadyModel(Frontend):
    """The API in front of a model that answers at once (what the route costs without the engine)."""

    answer = {"created": 0, "data": [{"b64_json": "A" * ANSWER_B64_CHARS}], "seed": 1,
              "timings": {"queue_seconds": 0.0, "denoise_seconds": 0.0, "engine_seconds": 0.0}}

    async def _call_unary(self, model: str, payload: dict) -> dict:
        return {"result": {**self.answer, "timings": dict(self.answer["timings"])}}

    def _open_stream(self, model: str, payload: dict):
        raise NotImplementedError

    async def _describe(self, model: str) -> dict:
        return {"id": model, "created": 0, "status": "ready"}

    async def _ready(self, model: str) -> dict:
        return {"ready": True, "detail": None}


def build(fast_path: bool):
    api = make_api("api_overhead", fast_path=fast_path)
    make_fastapi_class_based_view(api, ReadyModel)  # what serve.ingress does to the routes
    return api


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


SAME_ANSWER_BODIES = [
    {"model": MODEL, "prompt": "3"},
    {"model": MODEL, "prompt": "3", "n": 2, "seed": 7, "num_inference_steps": 25, "guidance_scale": 4.0},
    {"model": "nope", "prompt": "3"},  # valid body, unknown model: 404 from the route in both
    {"model": MODEL, "prompt": "3", "n": 0},
    {"model": MODEL, "prompt": "3", "n": 99},
    {"model": MODEL, "prompt": "3", "guidance_scale": 0.5},
    {"model": MODEL, "prompt": "3", "steps": 5},
    {"model": MODEL},
    [1, 2],
]


def same_answers(fast, slow) -> list[dict]:
    rows = []
    for body in SAME_ANSWER_BODIES + [b"{not json", b""]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        a, b = asyncio.run(call(fast, raw)), asyncio.run(call(slow, raw))
        a_body, b_body = json.loads(a[1] or b"null"), json.loads(b[1] or b"null")
        for answer in (a_body, b_body):  # the route's own timing differs between any two calls
            if isinstance(answer, dict) and "timings" in answer:
                answer["timings"].pop("server_seconds", None)
        rows.append({"body": raw.decode(errors="replace")[:80], "status": [a[0], b[0]], "same": (a[0], a_body) ==
                     (b[0], b_body)})
    return rows


async def timed(app, body: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call(app, body)
    return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    ingress = ReadyModel([MODEL], Limits(), AuthArgs())
    serve_context._INTERNAL_REPLICA_CONTEXT = types.SimpleNamespace(servable_object=ingress)  # as in a replica
    apps = {"fastapi": build(False), "fast_path": build(True)}
    checks = same_answers(apps["fast_path"], apps["fastapi"])
    for row in checks:
        print(json.dumps(row))
    body = json.dumps({"model": MODEL, "prompt": "3", "n": 1, "num_inference_steps": 25}).encode()
    per = {name: [] for name in apps}
    for name, app in apps.items():
        asyncio.run(timed(app, body, 200))  # warm
    for _ in range(a.rounds):
        for name, app in apps.items():
            per[name].append(asyncio.run(timed(app, body, a.requests)) * 1e6)
    result = {"requests_per_round": a.requests, "rounds": a.rounds, "python": sys.version.split()[0],
              "us_per_request_median": {k: round(statistics.median(v), 1) for k, v in per.items()},
              "us_per_request_rounds": {k: [round(x, 1) for x in v] for k, v in per.items()},
              "same_answers": all(r["same"] for r in checks)}
    result["saved_us"] = round(result["us_per_request_median"]["fastapi"] -
                               result["us_per_request_median"]["fast_path"], 1)
    print(json.dumps(result))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "api_overhead.json").write_text(json.dumps({**result, "checks": checks}, indent=1) + "\n")
    return 0 if result["same_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
