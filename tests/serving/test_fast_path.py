"""The hot route's shortcut past FastAPI (``frontend.FastGenerations``) changes no answer.

In-process ASGI calls, no Ray cluster: the API in front of a model that answers at once
(``scripts/api_overhead.py``'s ``ReadyModel``, the same harness that measures what the shortcut saves).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import types
from pathlib import Path

import pytest
from ray.serve import context as serve_context

from serving.config import AuthArgs, Limits
from serving.frontend import FastGenerations, _State

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "api_overhead.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("api_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = serve_context._INTERNAL_REPLICA_CONTEXT, dict(vars(_State))
    ingress = module.ReadyModel([module.MODEL], Limits(), AuthArgs())  # sets this process's _State
    serve_context._INTERNAL_REPLICA_CONTEXT = types.SimpleNamespace(servable_object=ingress)  # as in a replica
    yield module
    serve_context._INTERNAL_REPLICA_CONTEXT = saved[0]
    for name in ("limits", "metrics", "key_digests", "frontend"):
        setattr(_State, name, saved[1][name])


def test_fast_path_and_fastapi_answer_every_request_alike(harness):
    rows = harness.same_answers(harness.build(fast_path=True), harness.build(fast_path=False))
    assert {r["status"][0] for r in rows} == {200, 400, 404}  # valid, invalid and unknown-model bodies
    assert [r for r in rows if not r["same"]] == []


def test_only_a_valid_body_skips_fastapi(harness):
    reached = []

    async def fastapi_stand_in(scope, receive, send):  # records what would have gone on to FastAPI
        message = await receive()
        reached.append(message["body"])
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = FastGenerations(fastapi_stand_in)
    valid = json.dumps({"model": harness.MODEL, "prompt": "3", "n": 2}).encode()
    status, body = asyncio.run(harness.call(app, valid))
    assert status == 200 and len(json.loads(body)["data"]) == 1 and reached == []
    for invalid in (json.dumps({"model": harness.MODEL, "prompt": "3", "n": "two"}).encode(), b"{", b""):
        status, _ = asyncio.run(harness.call(app, invalid))
        assert status == 418 and reached[-1] == invalid  # the whole body, replayed
    status, _ = asyncio.run(harness.call(app, valid, path="/v1/models"))
    assert status == 418  # other routes are FastAPI's
