"""The model server's handler in this process (no Ray cluster, no HTTP): where an answer is encoded changes nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from serve_helpers import model_args

from serving import model_server
from serving.config import AppArgs
from serving.model_server import ModelServer


@pytest.fixture(scope="module")
def server(checkpoints):
    args = AppArgs.parse({"models": [model_args("digits-s", checkpoints["digits-s"])]})
    srv = ModelServer(args.models[0], args.limits)
    assert srv.engine is not None, srv.load_error
    yield srv
    srv.__del__()


def generate(server: ModelServer, **fields) -> dict:
    payload = {"prompt": "3", "n": 1, "num_inference_steps": 4, "seed": 5, "deadline_unix": time.time() + 60, **fields}
    return asyncio.run(server.generate(payload))


@pytest.mark.parametrize("fields", [{}, {"n": 3}, {"size": "32x32"}])
def test_an_answer_is_the_same_encoded_on_the_loop_or_in_an_encoder_thread(server, monkeypatch, fields):
    side = server.engine.info.config.input_size
    assert server._encodes_inline(fields.get("n", 1), 2 if "size" in fields else 1)  # the default path: the loop
    on_loop = generate(server, **fields)["result"]
    monkeypatch.setattr(model_server, "INLINE_ENCODE_MAX_PIXELS", 0)  # every answer through a thread
    assert not server._encodes_inline(1, 1)
    in_thread = generate(server, **fields)["result"]
    assert len(on_loop["data"]) == fields.get("n", 1) and side == 16
    assert [d["b64_json"] for d in in_thread["data"]] == [d["b64_json"] for d in on_loop["data"]]
    assert in_thread["seed"] == on_loop["seed"] == 5


def test_an_engine_error_comes_back_as_an_api_error_on_both_paths(server, monkeypatch):
    for limit in (model_server.INLINE_ENCODE_MAX_PIXELS, 0):
        monkeypatch.setattr(model_server, "INLINE_ENCODE_MAX_PIXELS", limit)
        answer = generate(server, num_inference_steps=100, deadline_unix=time.time() + 0.01)
        assert answer["error"]["code"] == "deadline_exceeded" and answer["error"]["status"] == 504
