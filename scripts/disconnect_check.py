"""Does a client that goes away free its batch rows, through HAProxy or at the replica's own port?

Starts Ray Serve with direct ingress and HAProxy (as serve_config.gpu.yaml runs), one slow CPU model, then N times:
send a 1000-step request, go away (unary: a 0.8 s read timeout; stream: close after the first progress event), and
time until the engine has no running request (up to 20 s). Prints one line per try and a summary.

    .venv/bin/python scripts/disconnect_check.py --via haproxy --tries 25
    .venv/bin/python scripts/disconnect_check.py --via replica --tries 10
    .venv/bin/python scripts/disconnect_check.py --via haproxy --stream --tries 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serving"), str(ROOT / "tests")]
os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"})

import httpx  # noqa: E402
import ray  # noqa: E402
import psutil  # noqa: E402  (ray ships it and puts it on sys.path when imported)
from ray import serve  # noqa: E402
from serve_helpers import SLOW_DIGITS, free_port, model_args, write_digits_checkpoint  # noqa: E402

from serving.app import build_model_app  # noqa: E402

LIMITS = {"max_images_per_request": 1, "max_inference_steps": 1000, "max_body_bytes": 4096}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--via", choices=["haproxy", "replica"], default="haproxy")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--tries", type=int, default=10)
    args = ap.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    slow = write_digits_checkpoint(Path(tempfile.mkdtemp()) / "slow.safetensors", config=SLOW_DIGITS)
    serve.run(build_model_app({"limits": LIMITS, "models": [model_args("slow", slow, verify_manifest=False)]}),
              name="slow", route_prefix="/models/slow")
    base = f"http://127.0.0.1:{port}"
    if args.via == "replica":
        pid = serve.get_deployment_handle("model-slow", app_name="slow").replica_pid.remote().result()
        own = [c.laddr.port for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.pid == pid and 30000 <= c.laddr.port < 31000]
        url = f"http://127.0.0.1:{own[0]}/models/slow/v1/images/generations"
    else:
        url = base + "/models/slow/v1/images/generations"

    def running() -> int:
        return httpx.get(base + "/models/slow/readyz", timeout=30).json()["models"]["slow"]["load"]["running_requests"]

    body = {"prompt": "4", "num_inference_steps": 1000, "stream": args.stream}
    freed = 0
    for i in range(args.tries):
        while running():  # start each try with an empty batch
            time.sleep(0.1)
        with httpx.Client() as client:
            if args.stream:
                with client.stream("POST", url, json=body, timeout=30) as r:
                    lines = r.iter_lines()
                    while not next(lines).startswith('data: {"type": "image_generation.progress"'):
                        pass
            else:
                try:
                    client.post(url, json=body, timeout=0.8)
                except httpx.ReadTimeout:
                    pass
        started = time.perf_counter()
        while running() and time.perf_counter() - started < 20:
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        freed += seconds < 1.5
        print(f"try {i}: batch empty {seconds:.2f} s after the client went away", flush=True)
    print(f"via {args.via}, {'stream' if args.stream else 'unary'}: {freed} of {args.tries} abandoned requests "
          f"left the batch within 1.5 s", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
