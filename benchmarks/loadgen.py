"""Open-loop HTTP load generator for the images API: Poisson arrivals at several rates.

    python -m benchmarks load --url http://127.0.0.1:8000 --model digits-s --rates 2,5,10 --duration 20

For each rate it sends requests with exponential inter-arrival times (open loop: a slow server does not slow the
arrivals), then prints and appends one JSON line (``--out``) with throughput, latency p50/p95/p99, the answers by
status, client timeouts, and what serving added on top of the engine (HTTP latency minus the ``timings`` the server
reports for the request). ``--sequential N`` instead sends N requests one at a time (latency without queueing),
with aiohttp or, ``--client http.client``, over one kept-alive connection of the standard library's client (less
client-side time in each figure; Ray's floor in ``serve_bench.py`` is timed with it). Needs aiohttp (a Ray
dependency, also on the GPU hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp

from dit_runtime.pauses import CollectionTimer

from .stats import percentile


@dataclass
class Sample:
    status: int  # HTTP status; 0 = client timeout, -1 = connection error
    latency: float
    engine_seconds: float | None = None
    images: int = 0
    server_seconds: float | None = None  # time inside the API route that answered (timings.server_seconds)


@dataclass
class Run:
    label: str
    offered_rate: float | None
    samples: list[Sample] = field(default_factory=list)
    wall_seconds: float = 0.0


ARRIVALS = ("paced", "poisson")  # how an open-loop client spaces its requests (send_offsets)


def check_arrivals(arrivals: str) -> None:
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")


def send_offsets(rate: float, seconds: float, arrivals: str = "paced", seed: int = 0) -> Iterator[float]:
    """Seconds from the start at which requests go out, ``rate`` a second for ``seconds``: every ``1 / rate``
    (paced), or at intervals drawn from the exponential distribution (Poisson's arrivals)."""
    check_arrivals(arrivals)
    rng = random.Random(seed)
    k, at = 0, 0.0
    while at < seconds:
        yield at
        k += 1
        at = k / rate if arrivals == "paced" else at + rng.expovariate(rate)


class ClientPauses(CollectionTimer):
    """The load generator's own stop-the-world pauses while it measures (CPython's cyclic collector), since every
    latency it reports includes them. Entering collects and freezes the heap it has so far (imports, Ray, torch when
    the process also drives a cluster: a full collection of that walks ~300k objects, 250 ms on two cores), so a
    collection during the measurement walks only what the measurement allocated; each collection is recorded."""

    def __init__(self, freeze: bool = True):
        super().__init__()
        self.freeze = freeze  # False: the heap as it is (the control)

    def __enter__(self) -> "ClientPauses":
        if self.freeze:
            gc.collect()
            gc.freeze()
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.freeze:
            gc.unfreeze()

    def since(self, start: float) -> list[tuple[float, float]]:
        """Each collection as (when it ended, in seconds after ``start``, a perf_counter reading; its length, s)."""
        return [(end - start, seconds) for end, _, seconds in tuple(self.pauses)]  # a copy: collections may append

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict:
        """Collections that ended in [start, end): how many, the longest and the sum, in ms."""
        mine = [seconds for at, _, seconds in tuple(self.pauses) if start <= at < end]
        return {"client_gc_pauses": len(mine), "client_gc_max_ms": round(1e3 * max(mine, default=0.0), 1),
                "client_gc_total_ms": round(1e3 * sum(mine), 1)}


def summarize(run: Run) -> dict:
    ok = [s for s in run.samples if s.status == 200]
    lat = [s.latency for s in ok]
    overhead = [s.latency - s.engine_seconds for s in ok if s.engine_seconds is not None]
    engine = [s.engine_seconds for s in ok if s.engine_seconds is not None]
    # The overhead split at the route: our handler around the engine, and everything outside the handler (HTTP
    # client and server, HAProxy or Ray's proxy, Ray's hand-off to the replica's event loop).
    in_route = [s.server_seconds - s.engine_seconds for s in ok
                if s.server_seconds is not None and s.engine_seconds is not None]
    outside = [s.latency - s.server_seconds for s in ok if s.server_seconds is not None]
    by_status: dict[str, int] = {}
    for s in run.samples:
        key = {0: "timeout", -1: "conn_error"}.get(s.status, str(s.status))
        by_status[key] = by_status.get(key, 0) + 1

    def ms(x):
        return None if x is None else round(1000 * x, 2)
    med_engine = percentile(engine, 50)
    med_overhead = percentile(overhead, 50)
    return {
        "label": run.label, "offered_rps": run.offered_rate, "sent": len(run.samples), "ok": len(ok),
        "by_status": by_status, "failed": sum(1 for s in run.samples if s.status >= 500 or s.status <= 0),
        "shed": sum(1 for s in run.samples if s.status in (429, 503)),
        "throughput_rps": round(len(ok) / run.wall_seconds, 3) if run.wall_seconds else None,
        "images_per_s": round(sum(s.images for s in ok) / run.wall_seconds, 3) if run.wall_seconds else None,
        "p50_ms": ms(percentile(lat, 50)), "p95_ms": ms(percentile(lat, 95)), "p99_ms": ms(percentile(lat, 99)),
        "engine_p50_ms": ms(med_engine), "overhead_p50_ms": ms(med_overhead),
        "overhead_p95_ms": ms(percentile(overhead, 95)),
        "in_route_overhead_p50_ms": ms(percentile(in_route, 50)), "outside_route_p50_ms": ms(percentile(outside, 50)),
        "overhead_pct_of_engine_p50": round(100 * med_overhead / med_engine, 2) if engine and med_engine else None,
    }


async def one(session: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> Sample:
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            payload = await r.read()
            latency = time.perf_counter() - t0
            if r.status != 200:
                return Sample(r.status, latency)
            data = json.loads(payload)
            timings = data.get("timings", {})
            return Sample(200, latency, timings.get("engine_seconds"), len(data["data"]), timings.get("server_seconds"))
    except asyncio.TimeoutError:
        return Sample(0, time.perf_counter() - t0)
    except aiohttp.ClientError:
        return Sample(-1, time.perf_counter() - t0)


async def poisson(url: str, body: dict, rate: float, duration: float, timeout: float, seed: int,
                  max_in_flight: int) -> Run:
    rng = random.Random(seed)
    run = Run(label=f"poisson@{rate:g}/s", offered_rate=rate)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        start = time.perf_counter()
        next_at = start
        while True:
            next_at += rng.expovariate(rate)
            if next_at - start > duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, url, {**body, "seed": rng.randrange(2 ** 31)}, timeout)))
        run.samples = list(await asyncio.gather(*tasks))
        run.wall_seconds = time.perf_counter() - start
    return run


async def sequential(url: str, body: dict, count: int, timeout: float) -> Run:
    run = Run(label=f"sequential x{count}", offered_rate=None)
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        for i in range(count):
            run.samples.append(await one(session, url, {**body, "seed": i}, timeout))
        run.wall_seconds = time.perf_counter() - start
    return run


def sequential_stdlib(url: str, body: dict, count: int, timeout: float) -> Run:
    """The same as ``sequential`` with http.client on one kept-alive connection: less client code per request."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    run = Run(label=f"sequential x{count} (http.client)", offered_rate=None)
    start = time.perf_counter()
    for i in range(count):
        data = json.dumps({**body, "seed": i})
        t0 = time.perf_counter()
        conn.request("POST", parts.path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        latency = time.perf_counter() - t0
        if response.status != 200:
            run.samples.append(Sample(response.status, latency))
            continue
        answer = json.loads(payload)
        timings = answer.get("timings", {})
        run.samples.append(Sample(200, latency, timings.get("engine_seconds"), len(answer["data"]),
                                  timings.get("server_seconds")))
    run.wall_seconds = time.perf_counter() - start
    conn.close()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--rates", default="1,2,4", help="comma-separated arrival rates, requests/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    p.add_argument("--sequential", type=int, default=0, help="send N requests one at a time instead")
    p.add_argument("--client", choices=["aiohttp", "http.client"], default="aiohttp",
                   help="the client of --sequential (the Poisson phases always use aiohttp)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompt", default="3")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, s")
    p.add_argument("--max-in-flight", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3, help="requests sent (and ignored) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append one JSON line per rate here as it completes")
    args = p.parse_args(argv)

    url = args.url.rstrip("/") + "/v1/images/generations"
    body = {"model": args.model, "prompt": args.prompt, "n": args.n, "num_inference_steps": args.steps}
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if args.warmup:
        asyncio.run(sequential(url, body, args.warmup, args.timeout))
    if args.sequential and args.client == "http.client":
        emit(summarize(sequential_stdlib(url, body, args.sequential, args.timeout)))
    elif args.sequential:
        emit(summarize(asyncio.run(sequential(url, body, args.sequential, args.timeout))))
    else:
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            print(f"[loadgen] {rate:g} req/s for {args.duration:g} s ...", file=sys.stderr, flush=True)
            emit(summarize(asyncio.run(poisson(url, body, rate, args.duration, args.timeout, args.seed + i,
                                                 args.max_in_flight))))

    print(f"\n{'run':>18} {'ok/sent':>9} {'req/s':>7} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'+serve p50 ms':>13} {'+serve %':>8}  errors", file=sys.stderr)
    for r in rows:
        errors = {k: v for k, v in r["by_status"].items() if k != "200"}
        print(f"{r['label']:>18} {r['ok']:>4}/{r['sent']:<4} {r['throughput_rps'] or 0:7.2f} "
              f"{r['images_per_s'] or 0:7.2f} {r['p50_ms'] or 0:8.1f} {r['p95_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f} "
              f"{r['overhead_p50_ms'] or 0:13.2f} {r['overhead_pct_of_engine_p50'] or 0:8.2f}  {errors or '-'}",
              file=sys.stderr)
    if args.out:
        print(f"[loadgen] results appended to {args.out}", file=sys.stderr)
    return 0

