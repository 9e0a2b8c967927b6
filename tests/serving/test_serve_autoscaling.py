"""Autoscaling on the CPU: under sustained load a model deployment grows past its minimum, and shrinks back to it
once the load stops (short delays; replica counts read from serve.status()). The signal is the default one, the
engines' estimated wait and batch occupancy (serving.autoscaling.QueueWaitPolicy)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_helpers import free_port, model_args

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serving.app import build_app, model_deployment_name  # noqa: E402

# Replicas and handles report their load every 0.25 s instead of every 10 s, so decisions take seconds.
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.25",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.25"}
MODEL = "digits-a"


@pytest.fixture(scope="module")
def server(checkpoints):
    with pytest.MonkeyPatch.context() as env:
        for key, value in FAST_METRICS.items():
            env.setenv(key, value)  # inherited by the Ray processes started below
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_queue_wait_s": 0.1, "upscale_delay_s": 0.5,
                       "downscale_delay_s": 3, "look_back_period_s": 1.5}
        # Every request is served (no admission refusals): the test is about the replica count.
        serve.run(build_app({"models": [model_args(MODEL, checkpoints["digits-s"], autoscaling=autoscaling,
                                                   max_queue_wait_s=60.0)]}),
                  name="dit", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
        ray.shutdown()


def running_replicas() -> int:
    deployment = serve.status().applications["dit"].deployments[model_deployment_name(MODEL)]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_deployment_scales_up_under_load_and_back_down_after(server):
    assert running_replicas() == 1
    stop = threading.Event()
    codes: list[int] = []

    def client():
        with httpx.Client(base_url=server, timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v1/images/generations", json={"model": MODEL, "prompt": "3", "num_inference_steps": 40})
                codes.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(10)]  # 10 in flight: 8 fill the batch, 2 wait
    for t in threads:
        t.start()
    try:
        peak, deadline = 1, time.monotonic() + 60
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, running_replicas())
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak >= 2, f"no scale-up under load (requests answered: {len(codes)})"
    assert codes and set(codes) == {200}

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running_replicas() > 1:
        time.sleep(0.5)
    assert running_replicas() == 1, "did not scale back down to min_replicas after the load stopped"
