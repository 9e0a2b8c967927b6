"""What a model route costs outside the engine, against floors that take as long as the engine does.

    .venv/bin/python scripts/route_split.py [--steps 4] [--requests 100] [--rounds 4] [--out OUT]

Ray Serve as the Docker image runs it (direct ingress behind HAProxy, the throughput switches), CPU only, one
kept-alive ``http.client`` connection, requests one at a time, five routes taken in turn within each round:

- ``floor``: a bare FastAPI deployment that answers at once (serve_bench.py's one-hop floor);
- ``ready``: our model ingress (engine loaded, idle) answering at once: our API's own cost;
- ``sleep``: the same, answering after ``--wait`` seconds of ``asyncio.sleep`` (the event loop idles);
- ``spin``: the same, answering after ``--wait`` seconds of a busy loop (the replica's thread stays hot);
- ``model``: the real route, the engine generating the image.

Each answer's ``timings`` split its latency into the time inside our route (``server_seconds``, minus the
engine's or the wait's own time) and the time outside it (HTTP, HAProxy, Ray, the client). A route that waits as
long as the engine is the fair floor for the model route: on our CPU it pays more outside the route than one that
answers at once, whatever the replica does meanwhile (docs/benchmarks.md, "Session 5").
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serving")]
os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"})

import ray  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402
from serve_helpers import free_port  # noqa: E402

from serving.app import _model_deployment  # noqa: E402
from serving.config import AppArgs  # noqa: E402
from serving.model_server import ModelIngress  # noqa: E402

MODEL = "dit-tiny"
READY = {"created": 0, "data": [{"b64_json": "A" * 240}], "seed": 1,
         "timings": {"queue_seconds": 0.0, "denoise_seconds": 0.0, "engine_seconds": 0.0}}
WAIT_S = float(os.environ.get("ROUTE_SPLIT_WAIT_S", "0.012"))  # read in the replicas too (set before ray.init)


def ready_answer(waited: float = 0.0) -> dict:
    return {"result": {**READY, "timings": {**READY["timings"], "engine_seconds": waited}}}


class ReadyIngress(ModelIngress):
    async def _call_unary(self, model, payload):
        return ready_answer()


class SleepIngress(ModelIngress):
    async def _call_unary(self, model, payload):
        start = time.perf_counter()
        await asyncio.sleep(WAIT_S)
        return ready_answer(time.perf_counter() - start)


class SpinIngress(ModelIngress):
    async def _call_unary(self, model, payload):
        start = time.perf_counter()
        while time.perf_counter() - start < WAIT_S:
            pass
        return ready_answer(time.perf_counter() - start)


floor_api = FastAPI()


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(floor_api)
class Floor:
    @floor_api.post("/v1/images/generations")
    async def generate(self, body: dict) -> dict:
        return READY


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--requests", type=int, default=100, help="per route and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = {"name": MODEL, "preset": MODEL, "allow_random_weights": True, "device": "cpu", "max_batch_size": 8,
             "num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    args = AppArgs.parse({"models": [model]})
    m = args.models[0]
    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    for name, cls in (("ready", ReadyIngress), ("sleep", SleepIngress), ("spin", SpinIngress),
                      ("model", ModelIngress)):
        serve.run(_model_deployment(cls, m, args).bind(m, args.limits, args.auth), name=name, route_prefix=f"/{name}")
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"model": MODEL, "prompt": "3", "n": 1, "num_inference_steps": a.steps})

    def once(route: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        conn.request("POST", f"/{route}/v1/images/generations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, (route, response.status, data[:300])
        t = json.loads(data).get("timings", {})
        waited, server = t.get("engine_seconds", 0.0), t.get("server_seconds", 0.0)
        return waited, elapsed - server, server - waited  # the wait, outside the route, inside it

    routes = ["floor", "ready", "sleep", "spin", "model"]
    samples = {r: [] for r in routes}
    for r in routes:
        for _ in range(20):
            once(r)
    for _ in range(a.rounds):
        for r in routes:
            samples[r] += [once(r) for _ in range(a.requests)]
    rows = []
    for r, xs in samples.items():
        med = [1000 * statistics.median(x[i] for x in xs) for i in range(3)]
        rows.append({"route": r, "requests": len(xs), "wait_or_engine_p50_ms": round(med[0], 3),
                     "outside_route_p50_ms": round(med[1], 3), "in_route_p50_ms": round(med[2], 3),
                     "overhead_p50_ms": round(1000 * statistics.median(x[1] + x[2] for x in xs), 3)})
        print(json.dumps(rows[-1]))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "route_split.json").write_text(json.dumps({"steps": a.steps, "wait_s": WAIT_S, "rows": rows},
                                                           indent=1) + "\n")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
