"""Where a model replica's event loop spends its time per request: py-spy samples of the replica serving the API.

Starts Ray Serve as the Docker image runs it (direct ingress behind HAProxy, the throughput switches) with one
random-weight model application on the CPU, sends one-image requests one at a time over a kept-alive connection,
records the replica with py-spy (``pip install py-spy``; it needs ptrace), and sorts the samples of the thread that
runs the API (Ray's "AsyncIO Thread: default") into: uvicorn, Ray's replica code, asyncio, FastAPI/Starlette/pydantic,
metrics, our code (serving/, dit_runtime/), json. Idle (waiting in epoll) is left out.

    .venv/bin/python scripts/profile_replica.py --seconds 20 --out /tmp/replica.txt
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serving")]
os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"})

import ray  # noqa: E402
from ray import serve  # noqa: E402
from serve_helpers import free_port  # noqa: E402

from serving.app import build_model_app  # noqa: E402

CATEGORIES = [  # the deepest frame that matches decides; metrics before our code (our metrics calls count there)
    ("metrics", ("ray/util/metrics", "ray/serve/metrics", "serving/metrics")),
    ("our code", ("serving/", "dit_runtime/")),
    ("FastAPI/Starlette/pydantic", ("fastapi/", "starlette/", "pydantic")),
    ("uvicorn", ("uvicorn/", "httptools")),
    ("Ray replica", ("ray/",)),
    ("asyncio", ("asyncio/",)),
    ("json", ("json/",)),
]


def categorize(raw: Path) -> dict:
    counts = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "AsyncIO Thread" not in frames[0] or frames[-1].startswith("Thread.run "):  # leaf Thread.run: idle
            continue
        category = "other"
        for frame in reversed(frames[1:]):
            hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit:
                category = hit
                break
        counts[category] += int(n)
    busy = sum(counts.values())
    return {name: round(count / busy, 3) for name, count in counts.most_common()} | {"busy_samples": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/replica-profile.txt"))
    args = ap.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = {"name": "dit-tiny", "preset": "dit-tiny", "allow_random_weights": True, "device": "cpu",
             "dtype": "float32", "num_cpus": 0.5}
    serve.run(build_model_app({"models": [model]}), name="dit-tiny", route_prefix="/models/dit-tiny")
    pid = serve.get_deployment_handle("model-dit-tiny", app_name="dit-tiny").replica_pid.remote().result()
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"prompt": "3", "num_inference_steps": args.steps})

    def request() -> None:
        conn.request("POST", "/models/dit-tiny/v1/images/generations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    for _ in range(20):
        request()
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "500",
                            "--duration", str(int(args.seconds) + 2), "--format", "raw", "--threads",
                            "-o", str(args.out)])
    time.sleep(1)
    sent, start = 0, time.time()
    while time.time() - start < args.seconds:
        request()
        sent += 1
    spy.wait()
    print(json.dumps({"requests": sent, "loop_busy_shares": categorize(args.out)}))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
