#!/usr/bin/env python3
"""What serving adds on top of the engine, and how the server holds up under Poisson load.

    python scripts/serve_bench.py --out out/ --preset dit-10l --device cuda --dtype float16 --compile --cuda-graphs

1. The engine alone, in this process: one-image requests one at a time (its own latency), PNG encoding, and what
   the model server's request handler adds around the same engine (``ModelServer.generate``, no HTTP, no Ray).
2. The same model served by Ray Serve: one-image requests one at a time through a deployment handle (Ray's RPC to
   the replica + PNG encoding) and over HTTP. Each answer carries the engine's own time for that request, so
   overhead = latency - engine time. ``--layout`` picks what stands in front of the engine:
   - ``gateway`` (``build_app``): Ray's Python HTTP proxy -> the FastAPI gateway -> a handle call -> the model;
   - ``direct`` (serve_config.gpu.yaml: ``build_model_app`` + ``build_gateway_app`` under Ray Serve's direct ingress
     with HAProxy): HAProxy -> the model replica's own HTTP server (``/models/<name>/v1/...``), and the gateway's
     single URL (HAProxy -> gateway -> handle -> model) measured beside it.
   Ray Serve's own floor for each shape (the same hops, answering a ready response) is measured in the same run.
3. ``scripts/loadgen.py`` at each ``--rates`` (Poisson arrivals) on the layout's fast route, one phase per rate,
   each with its own mean batch occupancy (real rows / max rows per step) from the metrics.
Every result is written to ``--out`` as soon as it exists (``*.json`` / ``loadgen.jsonl``); ``summary.json`` last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def write(out: Path, name: str, row: dict) -> None:
    (out / name).write_text(json.dumps(row, indent=2))
    log(f"{name}: {json.dumps(row)}")


def model_args(a) -> dict:
    m = {"name": a.model_name, "device": a.device, "dtype": a.dtype, "compile": a.compile,
         "cuda_graphs": a.cuda_graphs, "max_batch_size": a.max_batch_size, "max_queue_size": a.max_queue_size,
         "num_cpus": a.num_cpus, "num_gpus": 1 if a.device == "cuda" else 0,
         "compile_cache_dir": a.compile_cache_dir,
         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    if a.checkpoint:
        m["checkpoint"] = a.checkpoint
    else:
        m.update(preset=a.preset, allow_random_weights=True)
    return m


def pillow_pngs(images) -> list[str]:
    """What the server used before dit_runtime.images.encode_png: Pillow at compress level 1 (the comparison)."""
    import base64
    import io

    from PIL import Image
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def engine_alone(a, out: Path) -> dict:
    """The engine's own one-image latency in this process, the PNG encoding time of its images, and what the model
    server's handler adds around the same engine in this process (``ModelServer.generate``: no HTTP, no Ray)."""
    import asyncio

    from dit_runtime.engine import GenerationRequest
    from serving import model_server
    from serving.config import AppArgs
    from serving.model_server import ModelServer, encode_pngs, latents_to_uint8

    args = AppArgs.parse({"models": [model_args(a)]})
    t0 = time.perf_counter()
    server = ModelServer(args.models[0], args.limits)  # loads, warms up and starts the engine
    if server.engine is None:
        raise RuntimeError(server.load_error)
    engine = server.engine
    log(f"engine loaded and warmed up in {time.perf_counter() - t0:.1f} s")
    wall, total, png, pillow = [], [], [], []
    for i in range(a.warmup + a.sequential):
        start = time.perf_counter()
        result = engine.submit(GenerationRequest(class_labels=[3], num_images=1, seed=i,
                                                 num_inference_steps=a.steps)).result(timeout=120)
        elapsed = time.perf_counter() - start
        images = result.images if result.images is not None else latents_to_uint8(result.latents)
        t1 = time.perf_counter()
        png_b64_len = len(encode_pngs(images)[0])
        t2 = time.perf_counter()
        pillow_pngs(images)
        if i >= a.warmup:
            wall.append(elapsed)
            total.append(result.total_seconds)
            png.append(t2 - t1)
            pillow.append(time.perf_counter() - t2)

    async def through_handler(n: int) -> list[float]:
        extra = []
        for i in range(n):
            start = time.perf_counter()
            answer = await server.generate({"prompt": "3", "n": 1, "num_inference_steps": a.steps, "seed": i,
                                            "deadline_unix": time.time() + 120})
            elapsed = time.perf_counter() - start
            if "error" in answer:
                raise RuntimeError(f"handler request failed: {answer['error']}")
            extra.append(elapsed - answer["result"]["timings"]["engine_seconds"])
        return extra

    # The handler as configured, and (where the server has the switch) with every answer encoded in a thread,
    # alternating in rounds so both see the same machine state.
    variants = {"handler": None}
    if hasattr(model_server, "INLINE_ENCODE_MAX_PIXELS"):
        variants["handler_thread_encode"] = 0
    asyncio.run(through_handler(a.warmup))
    handler = {name: [] for name in variants}
    default_limit = getattr(model_server, "INLINE_ENCODE_MAX_PIXELS", None)
    for _ in range(4):
        for name, limit in variants.items():
            if default_limit is not None:
                model_server.INLINE_ENCODE_MAX_PIXELS = default_limit if limit is None else limit
            handler[name] += asyncio.run(through_handler(max(1, a.sequential // 4)))
    if default_limit is not None:
        model_server.INLINE_ENCODE_MAX_PIXELS = default_limit
    server.__del__()  # stops the engine and the server's threads
    del engine, server
    gc.collect()
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:
        pass
    row = {"requests": len(wall), "steps": a.steps, "latency_p50_ms": 1000 * p(wall, 50),
           "latency_p95_ms": 1000 * p(wall, 95), "engine_total_p50_ms": 1000 * p(total, 50),
           "png_encode_p50_ms": 1000 * p(png, 50), "png_encode_p95_ms": 1000 * p(png, 95),
           "pillow_png_encode_p50_ms": 1000 * p(pillow, 50), "png_b64_len": png_b64_len,
           **{f"{name}_overhead_p50_ms": 1000 * p(xs, 50) for name, xs in handler.items()},
           **{f"{name}_overhead_p95_ms": 1000 * p(xs, 95) for name, xs in handler.items()}}
    write(out, "engine_alone.json", row)
    return row


# Ray Serve reads these when its controller starts: the direct layout sets them before ray.init.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def model_app_name(a) -> str:
    return a.model_name if a.layout == "direct" else "dit"


def handle_path(a, out: Path) -> dict:
    """One-image requests one at a time through a deployment handle: Ray RPC + replica + PNG, no proxy/gateway."""
    from ray import serve

    from serving.app import model_deployment_name
    handle = serve.get_deployment_handle(model_deployment_name(a.model_name), app_name=model_app_name(a))
    lat, engine = [], []
    for i in range(a.warmup + a.sequential):
        start = time.perf_counter()
        answer = handle.generate.remote({"prompt": "3", "n": 1, "num_inference_steps": a.steps,
                                         "seed": i}).result()
        elapsed = time.perf_counter() - start
        if "error" in answer:
            raise RuntimeError(f"handle request failed: {answer['error']}")
        if i >= a.warmup:
            lat.append(elapsed)
            engine.append(answer["result"]["timings"]["engine_seconds"])
    over = [x - e for x, e in zip(lat, engine)]
    row = {"requests": len(lat), "latency_p50_ms": 1000 * p(lat, 50), "engine_p50_ms": 1000 * p(engine, 50),
           "overhead_p50_ms": 1000 * p(over, 50), "overhead_p95_ms": 1000 * p(over, 95)}
    write(out, "handle_path.json", row)
    return row


CPU_LATENCY = Path("/dev/cpu_dma_latency")


@contextlib.contextmanager
def cpu_latency_qos(us: int = 0):
    """Hold a PM QoS request on ``/dev/cpu_dma_latency`` while inside: the kernel keeps every CPU out of idle states
    that take longer than ``us`` to leave (what tuned's latency-performance profile does). It is a host-wide request,
    released when the file closes."""
    fd = os.open(CPU_LATENCY, os.O_WRONLY)
    try:
        os.write(fd, struct.pack("i", us))
        yield
    finally:
        os.close(fd)


def cpu_idle_states() -> dict:
    """The host's cpuidle driver, governor and CPU 0's idle states with their exit latencies (us)."""
    root = Path("/sys/devices/system/cpu")
    info = {k: (root / "cpuidle" / k).read_text().strip() for k in ("current_driver", "current_governor")
            if (root / "cpuidle" / k).exists()}
    info["states"] = {(d / "name").read_text().strip(): int((d / "latency").read_text())
                      for d in sorted((root / "cpu0" / "cpuidle").glob("state*"))}
    info["pm_qos_writable"] = os.access(CPU_LATENCY, os.W_OK)
    return info


def ray_haproxy_config() -> Path:
    """The HAProxy config Ray Serve wrote for this node (direct ingress)."""
    import ray
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC
    folder, name = os.path.split(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)
    return Path(folder, ray.get_runtime_context().get_node_id(), name)


def replica_address(config: str, prefix: str) -> str:
    """host:port of the replica that serves ``prefix`` in a Ray Serve HAProxy config."""
    lines = [line.split() for line in config.splitlines()]
    names = {w[1][len("is_"):] for w in lines if len(w) >= 4 and w[0] == "acl" and w[2] == "path_beg"
             and w[3] == prefix.rstrip("/") + "/"}
    backend = None
    for w in lines:
        if len(w) >= 2 and w[0] in ("backend", "frontend", "listen", "global", "defaults"):
            backend = w[1] if w[0] == "backend" else None
        elif backend in names and len(w) >= 3 and w[0] == "server" and "backup" not in w:
            return w[2]
    raise RuntimeError(f"no replica serves {prefix!r} in Ray Serve's HAProxy config")


def haproxy_variant(config: str, port: int, busy_polling: bool = False, metrics_log: bool = True,
                    nbthread: int | None = None) -> str:
    """Ray Serve's HAProxy config, rewritten to run beside Ray's own HAProxy: its HTTP frontend on ``port``, without
    the admin socket, the Prometheus frontend and the stats listener (those are Ray's). Then changed the way Ray's own
    settings would change it: ``busy_polling`` (HAProxy's global keyword; keeps its threads spinning instead of
    sleeping in the poller, which HAProxy documents for hosts where waking a CPU is slow, virtual machines among
    them), ``metrics_log=False`` (``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: no log line per request to the socket Ray
    reads its HTTP metrics from) and ``nbthread`` (``RAY_SERVE_HAPROXY_NBTHREAD``)."""
    out, section, drop = [], None, False
    for line in config.splitlines():
        if line and not line[0].isspace():
            words = line.split()
            section = (words[0], words[1] if len(words) > 1 else None)
            drop = section[0] == "listen" or section == ("frontend", "prometheus")
            if not drop:
                out.append(line)
                if section[0] == "global" and busy_polling:
                    out.append("    busy-polling")
            continue
        if drop:
            continue
        stripped = line.strip()
        if section[0] == "global" and stripped.startswith("stats socket"):
            continue
        if section[0] == "global" and nbthread and stripped.startswith("nbthread"):
            line = f"    nbthread {nbthread}"
        if section[0] == "frontend" and stripped.startswith("bind "):
            line = f"    bind 127.0.0.1:{port}"
        if not metrics_log and (("format rfc5424" in stripped and stripped.startswith("log "))
                                or stripped.startswith("log-format-sd")):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


# What each side HAProxy changes of Ray's config (haproxy_variant's arguments); all serve our replica beside Ray's.
HAPROXY_VARIANTS = {
    "ours_haproxy_copy": {},  # the control: Ray's config as written (runs 29-32: 0.11-0.26 ms cheaper than Ray's own)
    "ours_haproxy_one_thread": {"nbthread": 1},
    "ours_haproxy_no_metrics_log": {"metrics_log": False},
    "ours_haproxy_busy_one_thread": {"busy_polling": True, "nbthread": 1},  # one thread: one core spins, not four
    "ours_haproxy_busy_one_thread_no_metrics_log": {"busy_polling": True, "metrics_log": False, "nbthread": 1},
    # Ray starts its workers, and so the HAProxy its proxy actor starts, at nice 15 (RAY_worker_niceness); ours run
    # at this script's. This one runs at Ray's.
    "ours_haproxy_copy_nice15": {"nice": 15},
}


# A busy-polling HAProxy spins one core from its start; on a 2-CPU machine it starves Ray's (niced) workers.
BUSY_POLLING_MIN_CPUS = 8


@contextlib.contextmanager
def side_proxies(a, prefix: str):
    """Other ways to reach our replica than Ray's HAProxy (port ``a.port``), for one alternation: straight to the
    replica's own HTTP server (what HAProxy costs), and through HAProxy processes of our own, the same binary with
    Ray's config changed one way each (``HAPROXY_VARIANTS``). Yields ``{name: port}``; stops them on exit."""
    from ray.serve._private.haproxy import get_haproxy_binary
    config = ray_haproxy_config().read_text()
    (a.out / "haproxy_ray.cfg").write_text(config)
    routes, procs = {"ours_replica_direct": int(replica_address(config, prefix).rsplit(":", 1)[1])}, []
    with contextlib.ExitStack() as logs:
        try:
            for i, (name, change) in enumerate(HAPROXY_VARIANTS.items()):
                if change.get("busy_polling") and (os.cpu_count() or 1) < BUSY_POLLING_MIN_CPUS:
                    log(f"{name} left out: a spinning HAProxy would starve the other processes of this "
                        f"{os.cpu_count()}-CPU host")
                    continue
                port = a.port + 11 + i
                cfg = a.out / f"haproxy_{name}.cfg"
                change = dict(change)
                nice = ["nice", "-n", str(change.pop("nice"))] if "nice" in change else []
                cfg.write_text(haproxy_variant(config, port, **change))
                stderr = logs.enter_context(open(a.out / f"haproxy_{name}.log", "w"))
                procs.append(subprocess.Popen([*nice, get_haproxy_binary(), "-db", "-f", str(cfg)],
                                              stdout=subprocess.DEVNULL, stderr=stderr))
                routes[name] = port
            time.sleep(2.0)
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a side HAProxy exited at start: {proc.args} (see its log in {a.out})")
            write(a.out, "niceness.json", process_niceness())
            yield routes
        finally:
            for proc in procs:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


def process_niceness() -> dict:
    """The nice value of every HAProxy and Ray worker process on this host, by name (from /proc)."""
    seen: dict[str, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split(" (", 1)[1].rsplit(") ", 1)
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # the process ended
        if "haproxy" in comm or title.startswith("ray::"):
            seen.setdefault(title[:60] if title.startswith("ray::") else comm, []).append(int(rest.split()[16]))
    return seen


def ray_floor(a, out: Path, png_b64_len: int, wait_s: float, ours: str | None = None) -> dict:
    """Ray Serve's own cost for our request shape, with none of our code: HTTP -> proxy -> a FastAPI ingress ->
    a deployment handle -> a replica that returns a ready answer of the same size, and the handle hop alone. The
    one-hop floor is also measured answering after ``wait_s`` (the engine's time) instead of at once: a request that
    waits pays more outside the replica's code than one answered at once (scripts/route_split.py).

    ``ours`` (our model's route prefix) joins the waiting floors' alternation, request by request, so ours and the
    floors see the same machine state. With ``--cpu-latency-ab`` every round is taken twice, without and with a
    ``/dev/cpu_dma_latency`` request of 0 us held (rows suffixed ``_qos``): how much of the cost is CPUs waking
    from idle states. In the direct layout our route also joins on the other ports of ``side_proxies``.
    Then each of these routes is timed once more back to back (``_blocks``)."""
    import asyncio
    import http.client

    from fastapi import FastAPI
    from ray import serve

    floor_api = FastAPI()
    answer = {"created": 0, "data": [{"b64_json": "A" * png_b64_len}]}

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class FloorModel:
        async def generate(self, payload: dict) -> dict:
            return {"result": answer}

    direct_api = FastAPI()

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(direct_api)
    class FloorDirect:
        @direct_api.post("/v1/images/generations")
        async def generate(self, body: dict) -> dict:
            return answer

    waiting_api = FastAPI()

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(waiting_api)
    class FloorDirectWaiting:
        @waiting_api.post("/v1/images/generations")
        async def generate(self, body: dict) -> dict:
            start = time.perf_counter()
            await asyncio.sleep(wait_s)
            return {**answer, "waited_s": time.perf_counter() - start}

    thread_api = FastAPI()

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(thread_api)
    class FloorDirectThreadWaiting:
        """The wait happens on another thread, which then wakes the event loop, as the engine's does. The wait is
        timed on that thread, so the wake-up counts as overhead, as it does for our route (engine_seconds ends on
        the engine thread)."""

        @thread_api.post("/v1/images/generations")
        async def generate(self, body: dict) -> dict:
            def wait() -> float:
                start = time.perf_counter()
                time.sleep(wait_s)
                return time.perf_counter() - start
            waited = await asyncio.get_running_loop().run_in_executor(None, wait)
            return {**answer, "waited_s": waited}

    @serve.deployment(max_ongoing_requests=2000, ray_actor_options={"num_cpus": 0})
    @serve.ingress(floor_api)
    class FloorGateway:
        def __init__(self, model):
            self.model = model

        @floor_api.post("/v1/images/generations")
        async def generate(self, body: dict) -> dict:
            return (await self.model.generate.remote(body))["result"]

    serve.run(FloorGateway.bind(FloorModel.bind()), name="floor", route_prefix="/floor")
    serve.run(FloorDirect.bind(), name="floor-direct", route_prefix="/floor-direct")
    serve.run(FloorDirectWaiting.bind(), name="floor-waiting", route_prefix="/floor-waiting")
    serve.run(FloorDirectWaiting.options(logging_config={"enable_access_log": False}).bind(),
              name="floor-waiting-quiet", route_prefix="/floor-waiting-quiet")
    serve.run(FloorDirectThreadWaiting.bind(), name="floor-thread", route_prefix="/floor-thread")
    handle = serve.get_deployment_handle("FloorModel", app_name="floor")
    conns: dict[int, http.client.HTTPConnection] = {}  # one kept-alive connection per port
    body = json.dumps({"model": a.model_name, "prompt": "3", "n": 1, "num_inference_steps": a.steps})

    def over_http(prefix: str = "/floor", port: int | None = None) -> float:
        """The request's latency, less the time the route waited on purpose."""
        port = port or a.port
        conn = conns.get(port) or conns.setdefault(port, http.client.HTTPConnection("127.0.0.1", port))
        start = time.perf_counter()
        conn.request("POST", prefix + "/v1/images/generations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, (response.status, prefix, text[:300])
        answer = json.loads(text)  # a floor says how long it waited on purpose; our route, its engine's time
        return elapsed - answer.get("waited_s", answer.get("timings", {}).get("engine_seconds", 0.0))

    def timed(fn, subtract_wait: bool = False) -> list[float]:
        """``a.sequential`` calls back to back after ``a.warmup``: their wall times, or what ``fn`` returns (the
        latency less the route's own wait) with ``subtract_wait``."""
        for _ in range(a.warmup):
            fn()
        times = []
        for _ in range(a.sequential):
            start = time.perf_counter()
            result = fn()
            times.append(result if subtract_wait else time.perf_counter() - start)
        return times

    via_handle = timed(lambda: handle.generate.remote({}).result())
    via_http = timed(over_http)
    one_hop = timed(lambda: over_http("/floor-direct"))
    # The waiting floors alternate request by request, so each sees the same machine state.
    waiting_prefixes = {"waiting": ("/floor-waiting", None), "waiting_no_access_log": ("/floor-waiting-quiet", None),
                        "thread_waiting": ("/floor-thread", None)}
    idle = cpu_idle_states()
    qos_modes = [False, True] if a.cpu_latency_ab and idle["pm_qos_writable"] else [False]
    sides = side_proxies(a, ours) if ours is not None and a.side_proxies else contextlib.nullcontext({})
    with sides as ports:  # started only now: a busy-polling HAProxy spins a core from its start
        if ours is not None:
            waiting_prefixes["ours"] = (ours, None)
            waiting_prefixes.update({name: (ours, port) for name, port in ports.items()})
        waits = {name + ("_qos" if qos else ""): [] for name in waiting_prefixes for qos in qos_modes}
        for i in range(a.warmup + a.sequential):
            for qos in qos_modes:
                with cpu_latency_qos(0) if qos else contextlib.nullcontext():
                    for name, (prefix, port) in waiting_prefixes.items():
                        elapsed = over_http(prefix, port)
                        if i >= a.warmup:
                            waits[name + ("_qos" if qos else "")].append(elapsed)
        # The same routes again, each in a block of its own (back to back, as loadgen times ours): on the GPU host
        # our route cost 0.64 ms more alternating than back to back (run 24); this says whether the floors do too.
        for name, (prefix, port) in waiting_prefixes.items():
            waits[name + "_blocks"] = timed(lambda prefix=prefix, port=port: over_http(prefix, port),
                                            subtract_wait=True)
    for name in ("floor", "floor-direct", "floor-waiting", "floor-waiting-quiet", "floor-thread"):
        serve.delete(name, _blocking=False)  # blocking, each took 31 s on the GPU host (run 22)
    row = {"layout": a.layout, "requests": a.sequential, "answer_bytes": png_b64_len,
           "handle_p50_ms": 1000 * p(via_handle, 50), "handle_p95_ms": 1000 * p(via_handle, 95),
           "http_p50_ms": 1000 * p(via_http, 50), "http_p95_ms": 1000 * p(via_http, 95),
           "http_one_hop_p50_ms": 1000 * p(one_hop, 50), "http_one_hop_p95_ms": 1000 * p(one_hop, 95),
           "waiting_s": wait_s, "cpu_idle": idle,
           **{f"http_one_hop_{name}_p50_ms": 1000 * p(xs, 50) for name, xs in waits.items()},
           **{f"http_one_hop_{name}_p95_ms": 1000 * p(xs, 95) for name, xs in waits.items()}}
    write(out, "ray_floor.json", row)
    return row


def loadgen(a, out: Path, extra: list[str], prefix: str = "") -> list[dict]:
    cmd = [sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--url", f"http://127.0.0.1:{a.port}{prefix}",
           "--model", a.model_name, "--steps", str(a.steps), "--out", str(out / "loadgen.jsonl"), *extra]
    log("running " + " ".join(cmd[1:]))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def batch_occupancy(a) -> dict:
    """Mean real-rows / max_batch_size per step and steps run, read from the Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{a.metrics_port}/metrics", timeout=10).read().decode()
    sums = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in sums:
            if line.startswith(f"ray_dit_batch_occupancy_ratio_{part}{{"):
                sums[part] += float(line.rsplit(" ", 1)[1])
    return {"steps": sums["count"], "occupancy_sum": sums["sum"],
            "mean_batch_occupancy": sums["sum"] / sums["count"] if sums["count"] else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model-name", default="dit-10l")
    ap.add_argument("--preset", default="dit-10l")
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--compile-cache-dir", default="/tmp/dit-compile-cache")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-size", type=int, default=1024)
    ap.add_argument("--num-cpus", type=float, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sequential", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rates", default="4,16,64,128", help="comma-separated req/s of the load phases, or none")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8080)
    ap.add_argument("--gateway-replicas", type=int, default=1)
    ap.add_argument("--layout", choices=["gateway", "direct"], default="gateway",
                    help="gateway: build_app behind Ray's proxy; direct: one app per model under direct ingress + "
                         "HAProxy, as serve_config.gpu.yaml (see the module docstring)")
    ap.add_argument("--cpu-latency-ab", action="store_true",
                    help="time the waiting floors and our route with and without a /dev/cpu_dma_latency request "
                         "(needs write access to it; skipped otherwise)")
    ap.add_argument("--no-side-proxies", dest="side_proxies", action="store_false",
                    help="direct layout: leave out the alternation's other ways to our replica (straight to its HTTP "
                         "server; HAProxy processes of our own running copies of Ray's config, changed one way each)")
    ap.add_argument("--metrics-settle-s", type=float, default=12.0,
                    help="wait after each load phase before reading the occupancy (Ray exports metrics every ~10 s)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.compile_cache_dir = a.compile_cache_dir if a.compile else None

    alone = engine_alone(a, a.out)

    if a.layout == "direct":
        os.environ.update(DIRECT_INGRESS_ENV)
    import ray
    from ray import serve

    from serving.app import build_app, build_gateway_app, build_model_app
    ray.init(address="local", include_dashboard=False, _metrics_export_port=a.metrics_port, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    t0 = time.perf_counter()
    args = {"models": [model_args(a)], "gateway": {"num_replicas": a.gateway_replicas},
            "limits": {"max_images_per_request": 8, "max_inference_steps": max(250, a.steps)}}
    if a.layout == "direct":
        serve.run(build_model_app(args), name=a.model_name, route_prefix=f"/models/{a.model_name}")
        serve.run(build_gateway_app(args), name="dit", route_prefix="/")
    else:
        serve.run(build_app(args), name="dit", route_prefix="/")
    log(f"served in {time.perf_counter() - t0:.1f} s (load, compile, graph capture)")
    fast_route = f"/models/{a.model_name}" if a.layout == "direct" else ""
    via_handle = handle_path(a, a.out)
    http = loadgen(a, a.out, ["--sequential", str(a.sequential), "--warmup", str(a.warmup)], fast_route)[0]
    write(a.out, "http_sequential.json", http)
    # The same with the client Ray's floor is timed with (http.client, one kept-alive connection).
    stdlib = loadgen(a, a.out, ["--sequential", str(a.sequential), "--warmup", str(a.warmup),
                                "--client", "http.client"], fast_route)[0]
    write(a.out, "http_sequential_stdlib.json", stdlib)
    engine_ms = http["engine_p50_ms"]
    decomposition = {
        "layout": a.layout,
        "engine_alone_latency_p50_ms": alone["latency_p50_ms"],
        "served_engine_time_p50_ms": engine_ms,
        "png_encode_p50_ms": alone["png_encode_p50_ms"],
        "handler_in_process_p50_ms": alone["handler_overhead_p50_ms"],
        "handler_in_process_thread_encode_p50_ms": alone.get("handler_thread_encode_overhead_p50_ms"),
        "replica_and_ray_rpc_p50_ms": via_handle["overhead_p50_ms"] - alone["png_encode_p50_ms"],
        "serving_overhead_p50_ms": http["overhead_p50_ms"],
        "serving_overhead_p95_ms": http["overhead_p95_ms"],
        # Split at the route (timings.server_seconds): our handler around the engine (submit, result hand-off, PNG,
        # metrics), and everything outside it (HTTP, HAProxy or Ray's proxy, Ray's hand-off, validation, JSON).
        "in_route_overhead_p50_ms": http.get("in_route_overhead_p50_ms"),
        "outside_route_p50_ms": http.get("outside_route_p50_ms"),
        "serving_overhead_pct_of_engine": 100 * http["overhead_p50_ms"] / engine_ms,
        "stdlib_client": {k: stdlib.get(k) for k in ("p50_ms", "engine_p50_ms", "overhead_p50_ms", "overhead_p95_ms",
                                                     "in_route_overhead_p50_ms", "outside_route_p50_ms",
                                                     "overhead_pct_of_engine_p50")},
        "http_latency_vs_engine_alone_pct": 100 * (http["p50_ms"] - alone["latency_p50_ms"]) / alone["latency_p50_ms"],
        "target_pct": 10.0,
    }
    if a.layout == "direct":  # the gateway's single URL, beside the model's own route
        via_gateway = loadgen(a, a.out, ["--sequential", str(a.sequential), "--warmup", str(a.warmup)])[0]
        write(a.out, "http_sequential_gateway.json", via_gateway)
        decomposition.update({
            "gateway_route_overhead_p50_ms": via_gateway["overhead_p50_ms"],
            "gateway_route_overhead_pct_of_engine": 100 * via_gateway["overhead_p50_ms"] / via_gateway["engine_p50_ms"]})
    else:
        decomposition["proxy_and_gateway_p50_ms"] = http["overhead_p50_ms"] - via_handle["overhead_p50_ms"]
    floor = ray_floor(a, a.out, alone["png_b64_len"], engine_ms / 1000, fast_route if a.layout == "direct" else None)
    floor_ms = floor["http_one_hop_p50_ms"] if a.layout == "direct" else floor["http_p50_ms"]
    decomposition.update({"ray_floor_http_p50_ms": floor["http_p50_ms"],
                          "ray_floor_http_one_hop_p50_ms": floor["http_one_hop_p50_ms"],
                          "ray_floor_handle_p50_ms": floor["handle_p50_ms"],
                          "ray_floor_http_one_hop_waiting_p50_ms": floor["http_one_hop_waiting_p50_ms"],
                          "ray_floor_http_one_hop_waiting_no_access_log_p50_ms":
                              floor["http_one_hop_waiting_no_access_log_p50_ms"],
                          "ray_floor_http_one_hop_thread_waiting_p50_ms": floor["http_one_hop_thread_waiting_p50_ms"],
                          "ours_over_ray_floor_p50_ms": http["overhead_p50_ms"] - floor_ms})
    if a.layout == "direct":  # the fair floor for a request that takes the engine's time, same client
        decomposition["stdlib_ours_over_waiting_floor_p50_ms"] = (stdlib["overhead_p50_ms"]
                                                                  - floor["http_one_hop_waiting_p50_ms"])
        decomposition["stdlib_ours_over_thread_waiting_floor_p50_ms"] = (
            stdlib["overhead_p50_ms"] - floor["http_one_hop_thread_waiting_p50_ms"])
    # Ours (direct layout) and the waiting floors: alternating request by request (plain names; "_qos" under a
    # /dev/cpu_dma_latency request with --cpu-latency-ab), and each back to back ("_blocks").
    waiting = {k[len("http_one_hop_"):-len("_p50_ms")]: round(v, 3) for k, v in floor.items()
               if k.startswith("http_one_hop_") and k.endswith("_p50_ms") and k != "http_one_hop_p50_ms"}
    decomposition["waiting_routes_p50_ms"] = waiting
    decomposition["ours_pct_of_engine"] = {k: round(100 * v / engine_ms, 2) for k, v in waiting.items()
                                           if k.startswith("ours")}
    decomposition["cpu_idle"] = floor["cpu_idle"]
    write(a.out, "overhead.json", decomposition)
    # One load phase per rate, with the batch occupancy of that phase alone: the difference of the histogram's
    # sum and count around it, read after Ray's metrics export has caught up (--metrics-settle-s).
    rows = []
    before = batch_occupancy(a)
    for rate in ([] if a.rates == "none" else a.rates.split(",")):
        row = loadgen(a, a.out, ["--rates", rate, "--duration", str(a.duration), "--warmup", "0"], fast_route)[0]
        time.sleep(a.metrics_settle_s)
        after = batch_occupancy(a)
        steps = after["steps"] - before["steps"]
        row["engine_steps"] = steps
        row["mean_batch_occupancy"] = (after["occupancy_sum"] - before["occupancy_sum"]) / steps if steps else None
        rows.append(row)
        before = after
    occupancy = before  # the whole run's
    write(a.out, "occupancy.json", occupancy)
    write(a.out, "summary.json", {"overhead": decomposition, "load": rows, "occupancy": occupancy})
    shut_down()
    return 0


def shut_down(timeout_s: float = 60.0) -> None:
    """Stop Serve and Ray, or exit anyway after ``timeout_s``: every result is written by now, and on the GPU host
    Ray's shutdown once hung until the call's time limit killed the job (run 22)."""
    import threading

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


if __name__ == "__main__":
    sys.exit(main())
