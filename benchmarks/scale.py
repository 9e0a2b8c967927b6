"""Scale-out under overload, in one run: one replica at 3x its capacity, the autoscaler's second replica, and what
each phase carried.

    python -m benchmarks scale --out OUT --preset dit-10l --device cuda --compile --cuda-graphs    # 2 GPUs

1. Serves one model on its own route (``build_model_app``, direct ingress behind HAProxy as serve_config.gpu.yaml
   does, or Ray's Python proxy), one GPU per replica, autoscaling 1 -> 2
   on the engines' wait estimate (``serving.autoscaling.QueueWaitPolicy``), admission by time (``--max-queue-wait``).
   The first replica's start (load, compile, graph capture) is timed.
2. One replica's capacity: ``--clients`` closed-loop clients for ``--capacity-seconds``; their median latency is one
   request's service time on a busy batch.
3. Poisson arrivals at ``--factor`` x that capacity for ``--seconds``, every answer kept with its send time, while
   ``serve.status()`` is sampled every 0.5 s.

The run splits into phases by the replica counts: one replica; the second starting (from the scale decision, when it
first appears, to RUNNING: its start with the compile cache the first one wrote); two replicas. Per phase, by send
time: offered and accepted images/s, accepted p50/p99, the share refused (429/503 with Retry-After), the client's
own collector pauses; and by answer time the images/s served. The scale-out ratio is the images/s served while two
replicas ran over those served while one did (both one-replica phases). The one-replica phase is checked against the
bound admission promises: accepted p99 <= max_queue_wait_s + the service time's p99 (+10%). Ray Serve's probe of each
replica's event loops is read back at the end. ``--max-replicas 1`` keeps one replica under the whole load. Writes
OUT/scale.json, OUT/timeline.jsonl (one row per second) and OUT/scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

from .loadgen import ClientPauses, one
from .stats import percentile
from .serve import add_model_arguments, log, shut_down
from .serve import model_args as serve_model_args

APP = "scale"


def model_args(a) -> dict:
    """``benchmarks.serve``'s model entry, with admission by time and autoscaling 1 -> 2."""
    return {**serve_model_args(a), "max_queue_wait_s": a.max_queue_wait, "feature_cache_rows": a.feature_cache_rows,
            "autoscaling": {"min_replicas": 1, "max_replicas": a.max_replicas, "upscale_delay_s": a.upscale_delay,
                            "downscale_delay_s": 600, "look_back_period_s": a.look_back}}


def replicas() -> dict[str, int]:
    from ray import serve

    from serving.config import model_deployment_name

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    deployment = next((d for name, d in app.deployments.items() if name.startswith(model_deployment_name(""))), None)
    return dict(deployment.replica_states) if deployment else {}


async def drive(url: str, body: dict, rate: float, seconds: float, timeout: float,
                pauses: ClientPauses) -> tuple[list, list]:
    """Open-loop Poisson arrivals; returns (send time, Sample) per request and the replica samples (time, states).
    The client's own collector pauses are recorded in ``pauses`` (its heap frozen first unless asked not to)."""
    import aiohttp

    rng = random.Random(0)
    sent, timeline = [], []
    stop = asyncio.Event()

    async def watch():
        while not stop.is_set():
            timeline.append((time.perf_counter(), await asyncio.to_thread(replicas)))
            await asyncio.sleep(0.5)

    async def timed(session, at, payload):
        return at, await one(session, url, payload, timeout)

    watcher = asyncio.create_task(watch())
    with pauses:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            start = next_at = time.perf_counter()
            tasks = []
            while next_at - start < seconds:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.create_task(timed(session, next_at, {**body, "seed": rng.randrange(2 ** 31)})))
                next_at += rng.expovariate(rate)
            sent = await asyncio.gather(*tasks)
    stop.set()
    await watcher
    return sent, timeline


async def capacity(url: str, body: dict, clients: int, seconds: float,
                   timeout: float) -> tuple[float, float, float]:
    """Requests/s answered 200 by closed-loop clients, and the median and 99th percentile of their latency."""
    import aiohttp

    latencies = []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession() as session:
        async def client(k: int):
            while time.perf_counter() < stop:
                s = await one(session, url, {**body, "seed": k}, timeout)
                if s.status == 200:
                    latencies.append(s.latency)
                else:
                    await asyncio.sleep(0.01)
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
    return (len(latencies) / (time.perf_counter() - start), percentile(latencies, 50) or 0.0,
            percentile(latencies, 99) or 0.0)


def completed(sent: list, start: float, end: float) -> int:
    """Images answered 200 in [start, end), by the time the answer came: what the replicas served then. (Counted by
    send time instead, the first second of overload carries an empty queue's worth of admissions on top.)"""
    return sum(s.images for at, s in sent if s.status == 200 and start <= at + s.latency < end)


def phase(sent: list, start: float, end: float, pauses: ClientPauses) -> dict:
    mine = [s for at, s in sent if start <= at < end]
    accepted = [s.latency for s in mine if s.status == 200]
    refusals = [s.latency for s in mine if s.status in (429, 503)]
    refused = len(refusals)
    seconds = max(end - start, 1e-9)
    return {"seconds": round(seconds, 1), "offered_rps": round(len(mine) / seconds, 1),
            "accepted_images_per_s": round(sum(s.images for s in mine if s.status == 200) / seconds, 1),
            "completed_images_per_s": round(completed(sent, start, end) / seconds, 1),
            "accepted_p50_s": round(percentile(accepted, 50) or 0, 3),
            "accepted_p99_s": round(percentile(accepted, 99) or 0, 3),
            "refused_share": round(refused / len(mine), 3) if mine else None,
            "refused_p50_ms": round(1e3 * (percentile(refusals, 50) or 0), 1),
            "refused_p99_ms": round(1e3 * (percentile(refusals, 99) or 0), 1),
            "failed": len(mine) - len(accepted) - refused, **pauses.summary(start, end)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--batch-buckets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--feature-cache-rows", type=int, default=0, help="0 (default): one step function, a quicker "
                                                                      "compile; the admission does not depend on it")
    ap.add_argument("--max-queue-size", type=int, default=4096, help="the memory guard, far from binding")
    ap.add_argument("--max-queue-wait", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=float, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients measuring capacity (a batch full)")
    ap.add_argument("--capacity-seconds", type=float, default=8)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=75)
    ap.add_argument("--max-replicas", type=int, default=2, help="1: autoscaling off, one replica under the whole load")
    ap.add_argument("--client-gc", choices=["frozen", "as-is"], default="frozen",
                    help="frozen (default): the load generator's heap is collected and frozen before it measures, so "
                         "its own collector pauses stay out of the latencies; as-is: the control")
    ap.add_argument("--upscale-delay", type=float, default=5)
    ap.add_argument("--look-back", type=float, default=5)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=9999, help="Ray's metrics export port: the replicas' "
                    "start phases (dit_replica_startup_seconds) are read from it at the end")
    ap.add_argument("--pycache", type=Path, help="a bytecode cache for Ray's processes (PYTHONPYCACHEPREFIX, with "
                    "PYTHONDONTWRITEBYTECODE lifted), on a host that ships packages without bytecode and forbids "
                    "writing it: the replicas then import as they would where pip installed the packages")
    ap.add_argument("--layout", choices=["direct", "proxy"], default="direct",
                    help="direct: Ray Serve's direct ingress behind HAProxy (the GPU config); proxy: Ray's Python "
                         "proxy, which at 3x a GPU replica's capacity queues requests before any engine sees them")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.compile_cache_dir = a.compile_cache_dir if a.compile else None
    # Replicas report their load every second instead of every 10 s (read when Ray starts).
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    # Ray Serve's own probe of each replica's event loops (a sleep's lateness) every 0.1 s instead of every 5 s.
    os.environ.setdefault("RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S", "0.1")
    if a.pycache:  # read by the processes Ray starts, which inherit this environment
        os.environ["PYTHONPYCACHEPREFIX"] = str(a.pycache)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if a.layout == "direct":  # as serve_config.gpu.yaml and the Docker image run: HAProxy to each replica's server
        from serving.config import DIRECT_INGRESS_ENV
        os.environ.update(DIRECT_INGRESS_ENV)
    import ray
    from ray import serve

    from serving.app import build_model_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False, _metrics_export_port=a.metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    t0 = time.perf_counter()
    serve.run(build_model_app({"models": [model_args(a)],
                               "limits": {"max_images_per_request": 8, "max_inference_steps": max(250, a.steps)}}),
              name=APP, route_prefix=f"/models/{a.model_name}")
    first_start = time.perf_counter() - t0
    log(f"one replica serving in {first_start:.1f} s (load, compile, graph capture)")
    url = f"http://127.0.0.1:{a.port}/models/{a.model_name}/v1/images/generations"
    body = {"prompt": "3", "num_inference_steps": a.steps}
    cap, service, service_p99 = asyncio.run(capacity(url, body, a.clients, a.capacity_seconds, a.timeout))
    log(f"one replica: {cap:.1f} req/s, service time {service * 1e3:.0f} ms; now {a.factor:g}x for {a.seconds:g} s")
    pauses = ClientPauses(freeze=a.client_gc == "frozen")
    sent, timeline = asyncio.run(drive(url, body, a.factor * cap, a.seconds, a.timeout, pauses))
    start, end = sent[0][0], sent[-1][0]
    decided = next((t for t, s in timeline if sum(s.values()) >= 2), None)
    serving = next((t for t, s in timeline if s.get("RUNNING", 0) >= 2), None)
    one_replica = phase(sent, start, decided or end, pauses)
    bound = 1.1 * (a.max_queue_wait + service_p99)  # at p99: the wait bound and the service time's p99
    result = {
        "command": "python -m benchmarks scale " + " ".join(argv if argv is not None else sys.argv[2:]),
        "first_replica_start_s": round(first_start, 1), "capacity_rps": round(cap, 1),
        "service_s": round(service, 3), "service_p99_s": round(service_p99, 3),
        "offered_rps": round(a.factor * cap, 1), "max_queue_wait_s": a.max_queue_wait,
        "scale_decision_after_s": round(decided - start, 1) if decided else None,
        "second_replica_start_s": round(serving - decided, 1) if decided and serving else None,
        "one_replica": one_replica,
        "second_starting": phase(sent, decided, serving or end, pauses) if decided else None,
        "two_replicas": phase(sent, serving, end, pauses) if serving else None,
        "bound_s": round(bound, 3), "one_replica_p99_within_bound": one_replica["accepted_p99_s"] <= bound,
    }
    metrics = ray_metrics(a.metrics_port)
    result["replica_startup_s"] = replica_startups(metrics)
    result["replica_loop_lateness"] = loop_lateness(metrics)
    if serving:  # images/s served while two replicas ran against the whole time one did, both by answer time
        one = completed(sent, start, serving) / (serving - start)
        result["one_replica_served_images_per_s"] = round(one, 1)
        result["scale_out_ratio"] = round(result["two_replicas"]["completed_images_per_s"] / one, 3) if one else None
    (a.out / "scale.json").write_text(json.dumps(result, indent=1))
    log(json.dumps(result))
    with open(a.out / "timeline.jsonl", "w") as f:  # per second: answers by send time, replicas at that time
        for second in range(int(end - start) + 1):
            lo = start + second
            row = phase(sent, lo, lo + 1, pauses)
            states = [s for t, s in timeline if t <= lo + 1]
            f.write(json.dumps({"t": second, **row, "replicas": states[-1] if states else {}}) + "\n")
    plot(a.out, "one replica at 3x its capacity" + (", then two" if a.max_replicas > 1 else ""))
    shut_down()
    return 0


def ray_metrics(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of Ray's metrics export at the end of the run: (name, tags, value)."""
    import re
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError as e:
        log(f"no replica metrics: the metrics port {port} did not answer ({e})")
        return []
    return [(name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value))
            for name, labels, value in re.findall(r"^(\w+)\{(.*)\}\s+(\S+)$", text, re.MULTILINE)]


def replica_startups(metrics: list) -> dict[str, dict[str, float]]:
    """Each replica's start by phase (the gauge dit_replica_startup_seconds, serving.backend.StartupTimes): where a
    warm replica's seconds from the scale decision to serving went."""
    out: dict[str, dict[str, float]] = {}
    for name, tags, value in metrics:
        if name == "ray_dit_replica_startup_seconds":
            out.setdefault(tags.get("replica", "?"), {})[tags["phase"]] = round(float(value), 2)
    return out


def loop_lateness(metrics: list) -> dict[str, dict[str, float]]:
    """Per replica and event loop, from Ray Serve's own probe (``serve_event_loop_scheduling_latency_ms``, a 0.1 s
    sleep's lateness, over the whole run): how many probes, and the share later than 10, 50 and 100 ms. A replica
    whose loop is stalled answers nothing, refusals included, until it runs again."""
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for name, tags, value in metrics:
        if name == "ray_serve_event_loop_scheduling_latency_ms_bucket" and tags.get("application") == APP:
            key = (tags.get("actor_id", "?")[:8], tags.get("loop_type", "?"))
            buckets.setdefault(key, {})[float(tags["le"])] = value
    out = {}
    for (actor, loop), cumulative in sorted(buckets.items()):
        total = cumulative.get(float("inf"), max(cumulative.values()))
        if total:
            out[f"{actor} {loop}"] = {"probes": int(total), **{
                f"later_than_{ms}ms": round(1 - cumulative[float(ms)] / total, 4)
                for ms in (10, 50, 100) if float(ms) in cumulative}}
    return out


def plot(out: Path, title: str) -> None:
    from dit_runtime.plot import line_plot

    rows = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    series = {"accepted images/s": [(r["t"], r["accepted_images_per_s"]) for r in rows],
              "refused req/s": [(r["t"], round(r["offered_rps"] * (r["refused_share"] or 0), 1)) for r in rows],
              "replicas running x 100": [(r["t"], 100 * r["replicas"].get("RUNNING", 0)) for r in rows]}
    line_plot(series, out / "scale.png", title=title, xlabel="seconds",
              ylabel="per second")
