"""One application per model, each model's replicas serving the API themselves (``build_model_app``), and the
gateway as an application of its own (``build_gateway_app``), under Ray Serve's direct ingress with HAProxy in
front (what serve_config.gpu.yaml runs): the layout that takes Ray's Python proxy and the handle hop off the path.
Real Ray Serve, the real HAProxy binary that ray[serve] installs, the official openai client."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from PIL import Image
from serve_helpers import SLOW_DIGITS, free_port, image_serve_env, model_args, replica_pids, write_digits_checkpoint

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serving.app import build_gateway_app, build_model_app, model_deployment_name  # noqa: E402

LIMITS = {"max_images_per_request": 4, "max_inference_steps": 60, "max_body_bytes": 4096,
          "default_inference_steps": 8}
# Ray Serve's switches as the image runs them (direct ingress, HAProxy, the throughput switches and the log buffer
# they bring): read by Serve's controller and replicas when they start, so set before ray.init, restored after the
# module.
IMAGE_SERVE_ENV = image_serve_env()


@pytest.fixture(scope="module")
def base(checkpoints, tmp_path_factory):
    assert {"RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"} <= set(IMAGE_SERVE_ENV), IMAGE_SERVE_ENV
    saved = {k: os.environ.get(k) for k in IMAGE_SERVE_ENV}
    os.environ.update(IMAGE_SERVE_ENV)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        models = [model_args("digits-s", checkpoints["digits-s"]), model_args("digits-m", checkpoints["digits-m"])]
        for m in models:
            serve.run(build_model_app({"limits": LIMITS, "models": [m]}), name=m["name"],
                      route_prefix=f"/models/{m['name']}")
        serve.run(build_gateway_app({"limits": LIMITS, "models": models}), name="dit", route_prefix="/")
        # Steps of several milliseconds: a 1000-step request is still running when its client goes away.
        slow = write_digits_checkpoint(tmp_path_factory.mktemp("slow") / "slow.safetensors", config=SLOW_DIGITS)
        serve.run(build_model_app({"limits": {**LIMITS, "max_inference_steps": 1000},
                                   "models": [model_args("digits-slow", slow, verify_manifest=False)]}),
                  name="digits-slow", route_prefix="/models/digits-slow")
        # A gateway naming a model whose application is not deployed: it starts all the same.
        orphan = [model_args("digits-x", checkpoints["digits-s"])]
        serve.run(build_gateway_app({"limits": LIMITS, "models": orphan}), name="orphan", route_prefix="/orphan")
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
        ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def replica_url(model: str) -> str:
    """The HTTP server of the model's (one) replica itself, behind HAProxy: Ray gives each direct-ingress replica a
    port of its own in 30000-30999 (its defaults)."""
    (pid,) = replica_pids(model, model_deployment_name(model))
    own = [c.laddr.port for c in psutil.net_connections("tcp")
           if c.status == psutil.CONN_LISTEN and c.pid == pid and 30000 <= c.laddr.port < 31000]
    assert len(own) == 1, own
    return f"http://127.0.0.1:{own[0]}"


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_no_python_proxy_runs_haproxy_does(base):
    """The layout under test really is direct ingress: the process that listens on Serve's HTTP port is HAProxy
    (Ray's Python proxy only manages it), and the model replicas listen on ports of their own."""
    port = int(base.rsplit(":", 1)[1])
    listeners = {c.laddr.port: c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert psutil.Process(listeners[port]).name() == "haproxy"
    r = httpx.post(replica_url("digits-s") + "/models/digits-s/v1/images/generations",
                   json={"prompt": "3", "seed": 1, "num_inference_steps": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]  # the replica itself answered the API
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200


def test_a_replica_the_host_stops_warns_in_its_log_at_once(base):
    """Ray Serve's throughput switch holds a replica's log records in a buffer that only an error or a full buffer
    writes out; the image sets it to one record, so a warning is in the replica's log file when it is made. A replica
    the host does not run for 0.5 s (SIGSTOP) sees its threads held off, and says so there within seconds."""
    (pid,) = replica_pids("digits-s", model_deployment_name("digits-s"))
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def held() -> set[tuple[str, str]]:
        """(file, line) of each warning of held-off threads in the replica's log files so far."""
        return {(f.name, line) for f in logs.glob(f"replica_digits-s_{model_deployment_name('digits-s')}_*.log")
                for line in f.read_text().splitlines() if "Python threads were held off" in line}

    def longest(lines: set[tuple[str, str]]) -> list[int]:  # a line still being written has no match yet
        return [int(ms) for _, line in lines for ms in re.findall(r"the longest (\d+) ms", line)]

    before = held()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(ms >= 400 for ms in longest(held() - before)):
        time.sleep(0.1)
    assert any(ms >= 400 for ms in longest(held() - before)), held() - before


def test_model_route_and_gateway_give_the_same_images(base):
    """The openai client at the model's own URL and at the gateway's: same request, same seed, same PNGs."""
    direct = openai.OpenAI(base_url=base + "/models/digits-m/v1", api_key="unused")
    gateway = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    kwargs = dict(model="digits-m", prompt="7", n=2, response_format="b64_json",
                  extra_body={"seed": 4, "num_inference_steps": 6})
    one, two = direct.images.generate(**kwargs), gateway.images.generate(**kwargs)
    assert [d.b64_json for d in one.data] == [d.b64_json for d in two.data]
    images = [decode(d.b64_json) for d in one.data]
    assert images[0].shape == (16, 16) and not np.array_equal(images[0], images[1])


def test_model_route_serves_only_its_model(base):
    http = httpx.Client(base_url=base + "/models/digits-s", timeout=60)
    r = http.post("/v1/images/generations", json={"model": "digits-m", "prompt": "3"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["param"] == "model" and "digits-s" in err["message"]
    listed = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["digits-s"] and listed[0]["status"] == "ready"
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and list(ready["models"]) == ["digits-s"] and ready["models"]["digits-s"]["ready"]
    assert http.post("/v1/images/generations", json={"prompt": "3", "seed": 1}).status_code == 200  # model optional


@pytest.mark.parametrize("body, status, param", [
    ({"model": "digits-s", "prompt": "3", "num_inference_steps": 61}, 400, "num_inference_steps"),
    ({"model": "digits-s", "prompt": "elephant"}, 400, "prompt"),
    ({"model": "digits-s", "prompt": "3", "sead": 1}, 400, "sead"),
    ({"model": "digits-s", "prompt": "3", "pad": " " * 5000}, 413, None),
])
def test_model_route_answers_errors_exactly_as_the_gateway(base, body, status, param):
    answers = [httpx.post(base + prefix + "/v1/images/generations", json=body, timeout=60)
               for prefix in ("/models/digits-s", "")]
    assert [r.status_code for r in answers] == [status, status]
    assert answers[0].json() == answers[1].json() and answers[0].json()["error"]["param"] == param


def test_model_route_streams_progress_then_the_images(base):
    body = {"model": "digits-s", "prompt": "2", "seed": 9, "num_inference_steps": 5}
    events = []
    with httpx.stream("POST", base + "/models/digits-s/v1/images/generations", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [(e["type"], e["step"]) for e in parsed[:-1]] == [("image_generation.progress", k) for k in range(1, 6)]
    unary = httpx.post(base + "/models/digits-s/v1/images/generations", json=body, timeout=60).json()
    assert parsed[-1]["type"] == "image_generation.completed" and parsed[-1]["data"] == unary["data"]


def test_gateway_answers_503_for_a_model_application_that_is_not_deployed(base):
    r = httpx.post(base + "/orphan/v1/images/generations", json={"model": "digits-x", "prompt": "3"}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 503 and err["code"] == "model_unavailable" and "Retry-After" in r.headers
    assert "no application 'digits-x'" in err["message"]
    ready = httpx.get(base + "/orphan/readyz", timeout=60)
    assert ready.status_code == 503 and not ready.json()["models"]["digits-x"]["ready"]


def slow_load(base: str) -> dict:
    return httpx.get(base + "/models/digits-slow/readyz", timeout=30).json()["models"]["digits-slow"]["load"]


# A unary request is cancelled when the replica's HTTP server sees its connection close. HAProxy 2.8 does not pass a
# client's close on while it waits for the answer if it read the whole request at once (haproxy/haproxy#2340, a
# fast local client): measured here, 24 of 25 unary requests abandoned through HAProxy ran on until they finished.
# So the unary case is driven against the replica's own port (the hop HAProxy forwards to), and a streamed request
# through HAProxy (which notices the client is gone when it forwards the next progress event); docs/serving.md says
# what this means for clients.
@pytest.mark.parametrize("stream", [False, True])
def test_client_that_disconnects_from_the_model_route_frees_its_batch_rows(base, stream):
    body = {"prompt": "4", "num_inference_steps": 1000, "stream": stream}
    with httpx.Client() as client:
        if stream:
            url = base + "/models/digits-slow/v1/images/generations"  # through HAProxy
            with client.stream("POST", url, json=body, timeout=30) as r:
                lines = r.iter_lines()
                while not next(lines).startswith('data: {"type": "image_generation.progress"'):
                    pass
                before = slow_load(base)
        else:
            url = replica_url("digits-slow") + "/models/digits-slow/v1/images/generations"

            def probe():
                time.sleep(0.5)
                probe.load = slow_load(base)
            t = threading.Thread(target=probe)
            t.start()
            with pytest.raises(httpx.ReadTimeout):
                client.post(url, json=body, timeout=0.8)  # the client gives up
            t.join()
            before = probe.load
    assert before["running_requests"] == 1, before
    started = time.perf_counter()
    while slow_load(base)["running_requests"] and time.perf_counter() - started < 10:
        time.sleep(0.02)
    after = slow_load(base)
    assert after["running_requests"] == 0, after
    # Freed long before its 1000 steps could run out: counted in the engine's steps, which a slow host slows along
    # with its noticing the disconnect (a bound of 1.5 s in seconds failed at 1.63 s on a slow host).
    assert after["steps_done"] - before["steps_done"] < 500, (before, after)
