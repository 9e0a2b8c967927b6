"""What serving adds to the engine, and the server under Poisson load.

    python -m benchmarks serve --out OUT --preset dit-10l --device cuda --precision fp16 --compile --cuda-graphs

1. The engine alone, in this process: one-image requests one at a time, and what the model server's handler adds
   around the same engine (``ModelServer.generate``: no HTTP, no Ray). ``--no-engine-alone`` leaves it out: on a cold
   host it builds the engine once more than the replica does (with a compiled decoder, 204 s on an H100).
2. The model served by Ray Serve in one of the two layouts (``--layout``):
   - ``direct`` (serve_config.gpu.yaml, the Docker image): one application per model under Ray Serve's direct
     ingress with HAProxy, timed on the model's own route and on the gateway's single URL;
   - ``gateway`` (``build_app``): Ray's Python HTTP proxy -> the gateway -> a handle call -> the model.
   One-image requests one at a time over one kept-alive connection: each answer carries the engine's own time, so
   overhead = latency - engine time. Ray Serve's floor for the model's route is timed in the same run: a route
   with none of our code that waits as long as the engine on another thread, then answers a body of the same size
   (the control: what any model behind Ray Serve pays).
3. ``benchmarks.loadgen`` at each of ``--rates`` (Poisson arrivals) on the model's route: images/s, p50/p99, shed,
   and each serving process's CPU per request; with ``--floor-load`` on the floor's route too, the control for where
   the served rate tops out; with ``--profile``, py-spy's account of each process's GIL time per request by part of
   the stack (``benchmarks.cpu_profile``).
Every result is written to ``--out`` as soon as it exists; ``summary.json`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import cpu_profile
from .loadgen import ARRIVALS
from .stats import percentile


def log(msg: str) -> None:
    print(f"[serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write(out: Path, name: str, row: dict) -> None:
    (out / name).write_text(json.dumps(row, indent=2))
    log(f"{name}: {json.dumps(row)}")


def model_args(a) -> dict:
    m = {"name": a.model_name, "device": a.device, "precision": a.precision, "compile": a.compile,
         "cuda_graphs": a.cuda_graphs, "max_batch_size": a.max_batch_size, "max_queue_size": a.max_queue_size,
         "num_cpus": a.num_cpus, "num_gpus": 1 if a.device == "cuda" else 0, "compile_cache_dir": a.compile_cache_dir,
         "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "batch_buckets": a.batch_buckets,
         "stall_stacks": a.stall_stacks}
    if a.checkpoint:
        m["checkpoint"] = a.checkpoint
    else:
        m.update(preset=a.preset, allow_random_weights=True, random_weights_as="student" if a.student else "teacher")
    if a.vae == "sd-random":  # random weights of sd-vae-ft-ema's configuration (335 MB), written once, not in OUT
        from benchmarks.decode import write_random_vae
        a.vae = str(write_random_vae(Path(tempfile.gettempdir()) / "dit-serve-vae-sd-random"))
    if a.vae:  # with --compile the decoder is compiled too (compile_decoder), as a deployment that cares would
        m.update(vae=a.vae, compile_decoder=a.compile, decoder_cuda_graphs=a.decoder_graphs,
                 decoder_compile_options=a.decoder_compile_options)
    return m


def app_args(a) -> dict:
    return {"models": [model_args(a)], "gateway": {"num_replicas": a.gateway_replicas},
            "limits": {"max_images_per_request": 8, "max_inference_steps": max(250, a.steps)}}


def engine_alone(a, out: Path) -> dict:
    """The engine's own one-image latency in this process, and what the model server's handler adds around it."""
    from serving.config import AppArgs
    from serving.model_server import ModelServer

    args = AppArgs.parse(app_args(a))
    t0 = time.perf_counter()
    server = ModelServer(args.models[0], args.limits)  # loads, warms up and starts the engine
    if server.engine is None:
        raise RuntimeError(server.load_error)
    log(f"engine loaded and warmed up in {time.perf_counter() - t0:.1f} s")

    async def run(n: int) -> tuple[list[float], list[float]]:
        latency, extra = [], []
        for i in range(n):
            request = server.model_spec.build_request(prompt="3", num_inference_steps=a.steps, seed=i,
                                                      deadline=time.time() + 120)
            start = time.perf_counter()
            answer = await server.generate(request)
            elapsed = time.perf_counter() - start
            if not hasattr(answer, "b64_images"):
                raise RuntimeError(f"request failed: {answer}")
            latency.append(answer.engine_seconds)
            extra.append(elapsed - answer.engine_seconds)
        return latency, extra

    asyncio.run(run(a.warmup))
    engine, handler = asyncio.run(run(a.sequential))
    server.__del__()  # stops the engine and the server's threads
    server = None  # and its engine, decoder and CUDA graphs with it
    gc.collect()
    import torch

    if torch.cuda.is_available():  # this process's cached blocks and graph pools, which the replica's GPU needs
        torch.cuda.empty_cache()
    row = {"requests": a.sequential, "steps": a.steps, "engine_p50_ms": 1000 * percentile(engine, 50),
           "handler_overhead_p50_ms": 1000 * percentile(handler, 50),
           "handler_overhead_p95_ms": 1000 * percentile(handler, 95)}
    write(out, "engine_alone.json", row)
    return row


def sequential(a, prefix: str, count: int) -> dict:
    """One-image requests one at a time on one kept-alive connection: latency and overhead over the engine."""
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=120)
    body = {"model": a.model_name, "prompt": "3", "n": 1, "num_inference_steps": a.steps}
    latency, overhead, engine = [], [], []
    for i in range(a.warmup + count):
        start = time.perf_counter()
        conn.request("POST", prefix + "/v1/images/generations", json.dumps({**body, "seed": i}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"{prefix or '/'}: {response.status} {text[:300]!r}")
        answer = json.loads(text)
        waited = answer.get("waited_s", answer.get("timings", {}).get("engine_seconds", 0.0))
        if i >= a.warmup:
            latency.append(elapsed)
            engine.append(waited)
            overhead.append(elapsed - waited)
    conn.close()
    engine_p50, overhead_p50 = percentile(engine, 50), percentile(overhead, 50)
    return {"route": prefix or "/", "requests": count, "latency_p50_ms": 1000 * percentile(latency, 50),
            "engine_p50_ms": 1000 * engine_p50, "overhead_p50_ms": 1000 * overhead_p50,
            "overhead_p95_ms": 1000 * percentile(overhead, 95),
            "overhead_pct_of_engine": 100 * overhead_p50 / engine_p50 if engine_p50 else None}


def deploy_floor(wait_s: float, answer_chars: int) -> str:
    """Ray Serve alone: a route that waits ``wait_s`` on another thread (as our engine does), then answers a body
    of ``answer_chars`` characters of image data. Returns its route prefix."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()
    answer = {"created": 0, "data": [{"b64_json": "A" * answer_chars}]}

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Floor:
        def __init__(self):  # a thread per request in flight (under load too), as many as the replica admits
            self.waiters = ThreadPoolExecutor(1000)

        @api.post("/v1/images/generations")
        async def generate(self, body: dict) -> dict:
            def wait() -> float:
                start = time.perf_counter()
                time.sleep(wait_s)
                return time.perf_counter() - start
            return {**answer, "waited_s": await asyncio.get_running_loop().run_in_executor(self.waiters, wait)}

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    return "/floor"


def process_role(pid: int, args: str) -> str | None:
    """Which part of the serving stack a process on this host is, from its command line (None: not one)."""
    if pid == os.getpid():
        return "load client (this process)"
    replica = re.search(r"ServeReplica:([^:\s]+):([^\s.]+)", args)
    if replica:
        return f"replica {replica[1]}:{replica[2]}"
    for needle, role in (("ProxyActor", "Ray proxy"), ("haproxy", "HAProxy"), ("ServeController", "Serve controller"),
                         ("raylet", "Ray core"), ("gcs_server", "Ray core")):
        if needle in args:
            return role
    return None


def serving_processes():
    """(pid, role, /proc stat fields after the name) of each process of the serving stack on this host (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after the name: state is field 0
        except OSError:  # gone meanwhile
            continue
        role = process_role(int(entry.name), args)
        if role is not None:
            yield int(entry.name), role, fields


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds (user + system) each part of the serving stack on this host has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    used = collections.defaultdict(float)
    for _, role, fields in serving_processes():
        used[role] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return dict(used)


def loadgen(a, out: Path, rate: str, prefix: str) -> dict:
    """One Poisson phase on ``prefix``: loadgen's row, with the CPU milliseconds each part of the stack spent per
    answered request during it (also appended to ``cpu.jsonl``): where a request's CPU goes under load."""
    from benchmarks import loadgen as lg

    path = out / "loadgen.jsonl"
    phase = f"{prefix.strip('/').replace('/', '_') or 'root'}-{rate}"
    recordings = []
    if a.profile:  # the Python processes a request goes through: replicas (gateway, model) and Ray's proxy
        pids = {pid: role for pid, role, _ in serving_processes() if role.startswith("replica") or role == "Ray proxy"}
        recordings = cpu_profile.record(pids, a.duration, out, phase)
    before = cpu_seconds_by_role()
    lg.main(["--url", f"http://127.0.0.1:{a.port}{prefix}", "--model", a.model_name, "--steps", str(a.steps),
             "--rates", rate, "--duration", str(a.duration), "--warmup", "0", "--n", str(a.images_per_request),
             "--out", str(path)])
    after = cpu_seconds_by_role()
    row = json.loads(path.read_text().splitlines()[-1])
    answered = max(row.get("ok") or 0, 1)
    for recording in recordings:
        recording.wait(timeout=30)
        parts = cpu_profile.ms_per_request(recording.path, answered) if recording.path.exists() else {}
        with open(out / "profile.jsonl", "a") as f:
            f.write(json.dumps({"layout": a.layout, "route": prefix, "label": row.get("label"),
                                "process": recording.role,
                                "images_per_request": a.images_per_request, "ok": row.get("ok"),
                                "gil_ms_per_request": parts}) + "\n")
        log(f"GIL ms per request in {recording.role} at {row.get('label')}: {json.dumps(parts)}")
    row["cpu_ms_per_request"] = {role: round(1000 * (after[role] - before.get(role, 0.0)) / answered, 3)
                                 for role in sorted(after)}
    with open(out / "cpu.jsonl", "a") as f:
        f.write(json.dumps({"route": prefix, "label": row.get("label"), "images_per_request": a.images_per_request,
                            "ok": row.get("ok"), "cpu_ms_per_request": row["cpu_ms_per_request"]}) + "\n")
    log(f"CPU ms per request at {row.get('label')} on {prefix}: {json.dumps(row['cpu_ms_per_request'])}")
    return row


def soak_phase(a, route: str) -> dict:
    """``benchmarks.soak`` on the model's route for ``--soak`` seconds at ``--soak-load`` x its measured capacity: its
    windows, replica samples and summary to ``soak.jsonl``, as ``python -m benchmarks soak`` writes them."""
    from serving.config import model_deployment_name

    from . import soak

    app = a.model_name if a.layout == "direct" else "dit"
    deployment = model_deployment_name(a.model_name)
    body = {"model": a.model_name, "prompt": "3", "n": a.images_per_request, "num_inference_steps": a.steps}
    pids = lambda: soak.replica_pids(app, deployment)  # noqa: E731
    # Closed-loop clients enough to keep one batch of images in flight: a full batch's rate, with no queue behind it.
    clients = max(8, a.max_batch_size // a.images_per_request)
    load = soak.LOAD if a.soak_load is None else a.soak_load
    report = asyncio.run(soak.soak(f"http://127.0.0.1:{a.port}{route}", body, pids, load=load, seconds=a.soak,
                                   window_s=min(60.0, a.soak / 5), clients=clients, arrivals=a.soak_arrivals))
    summary = report.summary()
    soak.write_report(report, a.out / "soak.jsonl")
    log(f"soak: {json.dumps(summary)}")
    return summary


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The served model's options, shared with ``benchmarks.scale`` (``model_args`` reads them)."""
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model-name", default="dit-10l")
    ap.add_argument("--preset", default="dit-10l")
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--compile-cache-dir", default="/tmp/dit-compile-cache")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--student", action="store_true", help="with --preset: serve the random weights as a 4-step "
                                                           "student (one row per guided image; --steps 1, 2, 4 or 8)")
    ap.add_argument("--decoder-graphs", action="store_true",
                    help="with --vae and --compile: the decoder as CUDA graphs (decoder_cuda_graphs)")
    ap.add_argument("--decoder-compile-options", type=json.loads, metavar="JSON",
                    help='with --vae and --compile: inductor options for the decoder (decoder_compile_options), e.g. '
                         '\'{"coordinate_descent_tuning": true}\'')
    ap.add_argument("--stall-stacks", action="store_true",
                    help="each replica writes every thread's stack during each long hold of all its threads to its "
                         "stderr (stall_stacks; serve.sh collects them into stalls.txt)")
    ap.add_argument("--vae", help="a latent model's decoder: a local diffusers AutoencoderKL folder, or sd-random "
                                  "(random weights of sd-vae-ft-ema's configuration: 256x256 images from dit-10l's "
                                  "32x32 latents), compiled with --compile; default none, the latents answered as "
                                  "they are")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--batch-buckets", type=int, nargs="+", help="rows the forwards are padded to (default: powers of "
                                                                 "two up to --max-batch-size; fewer compile faster)")
    ap.add_argument("--max-queue-size", type=int, default=1024)
    ap.add_argument("--num-cpus", type=float, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sequential", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rates", default="8,32,128,256", help="comma-separated req/s of the load phases, or none")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--images-per-request", type=int, default=1, help="n of each load request (rates are requests/s)")
    ap.add_argument("--floor-load", action="store_true",
                    help="also offer each rate to Ray Serve's floor route (none of our code): where a ceiling is Ray's")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--gateway-replicas", type=int, default=1)
    ap.add_argument("--layout", choices=["direct", "gateway"], default="direct")
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="last, soak the model's route this long at --soak-load x its capacity (benchmarks/soak.py)")
    ap.add_argument("--soak-load", type=float,
                    help="the soak's offered load / measured capacity (default: soak.LOAD, the bar's)")
    ap.add_argument("--soak-arrivals", choices=ARRIVALS, default="paced",
                    help="the soak's arrivals: at even intervals, or Poisson's (benchmarks/soak.py)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy each replica and Ray's proxy during every load phase: GIL time per request by part "
                         "of the stack (benchmarks/cpu_profile.py), in profile.jsonl")
    ap.add_argument("--no-engine-alone", dest="engine_alone", action="store_false",
                    help="leave out the engine's in-process phase (1.), which builds the engine once more")
    ap.add_argument("--access-log", action="store_true", help="Ray Serve's log line per request (off by default, as in "
                                                               "serve_config.gpu.yaml)")
    a = ap.parse_args(argv)
    decoder_flags = [flag for flag, on in (("--decoder-graphs", a.decoder_graphs),
                                           ("--decoder-compile-options", a.decoder_compile_options)) if on]
    if decoder_flags and not a.vae:
        ap.error(f"{', '.join(decoder_flags)} set how the VAE decoder runs: give --vae (a folder, or sd-random)")
    if a.profile:
        cpu_profile.py_spy()  # missing: say so now, not after the engine's start
    a.out.mkdir(parents=True, exist_ok=True)
    a.compile_cache_dir = a.compile_cache_dir if a.compile else None

    alone = engine_alone(a, a.out) if a.engine_alone else None
    if a.layout == "direct":  # read by Ray Serve's controller when it starts
        from serving.config import DIRECT_INGRESS_ENV
        os.environ.update(DIRECT_INGRESS_ENV)
    import ray
    from ray import serve

    from serving.app import build_app, build_gateway_app, build_model_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    t0 = time.perf_counter()
    logging = {"enable_access_log": a.access_log}  # off, as serve_config.gpu.yaml has it
    if a.layout == "direct":
        serve.run(build_model_app(app_args(a)), name=a.model_name, route_prefix=f"/models/{a.model_name}",
                  logging_config=logging)
        serve.run(build_gateway_app(app_args(a)), name="dit", route_prefix="/", logging_config=logging)
    else:
        serve.run(build_app(app_args(a)), name="dit", route_prefix="/", logging_config=logging)
    log(f"served in {time.perf_counter() - t0:.1f} s (load, compile, graph capture)")
    route = f"/models/{a.model_name}" if a.layout == "direct" else ""
    ours = sequential(a, route, a.sequential)
    write(a.out, "sequential.json", ours)
    summary = {"layout": a.layout, "engine_alone": alone, "route": ours}
    if a.layout == "direct":
        summary["gateway"] = sequential(a, "", a.sequential)
        write(a.out, "sequential_gateway.json", summary["gateway"])
    probe = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)  # one answer's size, for the floor's body
    probe.request("POST", route + "/v1/images/generations", json.dumps({"prompt": "3", "num_inference_steps": 1}),
                  {"Content-Type": "application/json"})
    answer_chars = len(json.loads(probe.getresponse().read())["data"][0]["b64_json"])
    floor = sequential(a, deploy_floor(ours["engine_p50_ms"] / 1000, answer_chars), a.sequential)
    summary["ray_floor"] = floor
    summary["ours_over_floor_p50_ms"] = ours["overhead_p50_ms"] - floor["overhead_p50_ms"]
    write(a.out, "overhead.json", {k: v for k, v in summary.items() if k != "load"})
    rates = [] if a.rates == "none" else a.rates.split(",")
    summary["load"] = [loadgen(a, a.out, rate, route) for rate in rates]
    if a.floor_load:  # the control: Ray Serve alone under the same arrivals
        summary["floor_load"] = [loadgen(a, a.out, rate, "/floor") for rate in rates]
    if a.soak:
        summary["soak"] = soak_phase(a, route)
    write(a.out, "summary.json", summary)
    shut_down()
    return 1 if a.soak and not summary["soak"]["passed"] else 0  # as `benchmarks soak` exits


def shut_down(timeout_s: float = 60.0) -> None:
    """Stop Serve and Ray, or exit anyway after ``timeout_s``: every result is written by now, and on a GPU host
    Ray's shutdown has hung until the call's time limit killed the job."""
    import ray
    from ray import serve

    done = threading.Event()

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()
        done.set()

    threading.Thread(target=stop, name="shutdown", daemon=True).start()
    if not done.wait(timeout_s):
        log(f"Ray did not shut down within {timeout_s:.0f} s; exiting (the results are written)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
