"""Soak: a running server at a steady share of one replica's capacity for minutes; does anything grow or fail?

    python -m benchmarks soak --url http://127.0.0.1:8000 --model dit-10l-4step --load 0.8 --seconds 600

1. Capacity: ``--clients`` closed-loop clients for ``--capacity-seconds`` (``overload.client_at_capacity``; loopback
   only).
2. Soak: requests at ``--load`` x that capacity for ``--seconds``, every request awaited (client timeout
   ``--timeout``) and timed from when it was sent. ``--arrivals paced`` (the default) sends them at a constant rate:
   every window is offered the same requests, so the last window's p99 against the first's reads what the server did
   over the soak (a leak, fragmentation, a queue that grows). ``poisson`` draws the intervals, and with them how many
   requests a window gets, which near the knee of the latency curve moves a window's p99 (on an H100 the minutes'
   p50 followed their Poisson counts, r = 0.82). Every ``--sample-every`` seconds, the resident memory (RSS) and the
   CPU time of the model's replica processes on this host (found by the title Ray gives them,
   ``ray::ServeReplica:<app>:<deployment>``) and, where nvidia-smi runs, the GPU memory they hold. Sampled on a
   thread: psutil's scan of every process and nvidia-smi take tens of milliseconds or more, and on the event loop they
   would hold up every send and every answer meanwhile.

The report, per ``--window`` seconds of the soak: requests, failures, latency p50 and p99, the p99 of the nested
spans the server times (``queue_p99_ms``: waiting for a batch slot; ``denoise_p99_ms``: its own steps;
``engine_p99_ms``: submit to images on the host, the decode included; ``server_p99_ms``: the route's, encoding
included), the cores the replicas kept busy (``replica_cpu_cores``, from their CPU time), how late this client's
event loop woke at worst (``client_lag_max_ms``) and its longest garbage collection (``client_gc_max_ms``). So a
window's p99 spike reads as queueing (a burst, or a slow engine), the denoising, the decode, the encoding or neither
(the HTTP path). A late loop is the client's own: it adds to the latencies it measures, and the requests it held back
go out together, a burst that raises the server's spans too.
And the memory at the end of the first window (warm-up) against the last sample. The bar (exit status 1 otherwise):
nothing failed or timed out, the replicas' RSS and GPU memory grew less than 1% after warm-up, and the last window's
p99 is at most 10% above the first's (one-sided: a first window slower than the last is no drift, though the
windows' rows show it). Progress goes to stderr once a window; the windows' rows, the replica samples and the summary
to ``OUT/soak.jsonl``, the summary also to stdout as one JSON line. The summary's ``started_at``, in this host's local
time as Ray's logs write theirs, puts the windows on the clock of the replicas' logs, where a replica warns of each
slow garbage collection (``serving.model_server.SLOW_COLLECTION_S``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from serving.config import model_deployment_name

from .loadgen import ARRIVALS, ClientPauses, check_arrivals, send_offsets
from .overload import Outcome, client_at_capacity, one_request
from .stats import percentile

LOAD = 0.8  # the offered share of the measured capacity that the bar is set at
# What the soak holds the server to: memory growth after warm-up, and the last window's p99 against the first's.
MAX_MEMORY_GROWTH = 0.01
MAX_P99_DRIFT = 0.10
LAG_TICK_S = 0.01  # how often the client's event loop is asked to wake, to see how late it does


def replica_pids(app: str, deployment: str) -> set[int]:
    """The live processes of a deployment's replicas on this host, by the title Ray gives an actor's process
    (``ray::ServeReplica:<app>:<deployment>``, as ps and top show it). Not through a deployment handle: a handle used
    in the caller's process starts Serve's router thread there, which outlives ``ray.shutdown()`` (ray-project/ray
    #31145: Ray threads left across a shutdown crash the process)."""
    title = f"ray::ServeReplica:{app}:{deployment}"
    pids = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        name = (p.info["cmdline"] or [""])[0].strip()  # while it runs a method: ``<title>.<method>``
        if (name == title or name.startswith(title + ".")) and p.info["status"] != psutil.STATUS_ZOMBIE:
            pids.add(p.pid)
    return pids


def gpu_memory(pids: set[int]) -> int | None:
    """Bytes of GPU memory the processes ``pids`` hold, from nvidia-smi (None where it does not run)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    return sum(int(mib) * 2**20 for pid, mib in used if int(pid) in pids)


@dataclass
class ReplicaSample:
    at: float  # seconds into the soak
    rss_bytes: int  # of the replicas, together
    gpu_bytes: int | None
    cpu_seconds: float = 0.0  # user + system, of the replicas, together, since each started
    pids: frozenset[int] = frozenset()  # the replicas read


def replica_sample(pids, at: float) -> ReplicaSample:
    """The RSS, CPU time and GPU memory of the processes ``pids()`` names, now (blocking: psutil over every
    process, then nvidia-smi)."""
    found = pids()
    rss, cpu, read = 0, 0.0, set()
    for pid in found:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                rss += process.memory_info().rss
                times = process.cpu_times()
                cpu += times.user + times.system
            read.add(pid)
        except psutil.Error:  # a replica that ended since it was found (its pid perhaps another's now)
            pass
    return ReplicaSample(at, rss, gpu_memory(found), cpu, frozenset(read))


@dataclass
class SoakReport:
    capacity_rps: float
    offered_rps: float
    window_s: float
    arrivals: str = "paced"
    outcomes: list[tuple[float, Outcome]] = field(default_factory=list)  # (seconds into the soak it was sent, ...)
    samples: list[ReplicaSample] = field(default_factory=list)
    loop_lag: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the soak, how late it woke)
    client_gc: list[tuple[float, float]] = field(default_factory=list)  # this client's collections: (ended at, s)
    wall_seconds: float = 0.0
    started_at: float = 0.0  # Unix time of the first send: a window's clock time, for the servers' logs

    async def sample_replicas(self, pids, started: float, every_s: float) -> None:
        """A sample of the replicas every ``every_s`` seconds until cancelled, each taken on a thread."""
        while True:
            self.samples.append(await asyncio.to_thread(replica_sample, pids, time.perf_counter() - started))
            await asyncio.sleep(every_s)

    async def watch_loop(self, started: float) -> None:
        """How late the event loop wakes from a ``LAG_TICK_S`` sleep, until cancelled."""
        while True:
            asleep = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.loop_lag.append((asleep - started, time.perf_counter() - asleep - LAG_TICK_S))

    def window_ended(self, at: float, sent: int, seconds: float) -> None:
        """At ``at`` s of ``seconds``, ``sent`` requests in: a line of progress, then everything the client holds
        now frozen with its heap (``gc.freeze``), so a collection walks one window's answers at most, not the soak's
        tens of thousands. That includes the requests in flight and any garbage cycles not yet collected, which the
        client then keeps until the soak ends (``ClientPauses`` unfreezes): its memory, not the replicas' measured."""
        answered = [o for _, o in self.outcomes]
        rss = self.samples[-1].rss_bytes / 2**20 if self.samples else 0.0
        late = max((late for t, late in self.loop_lag if t >= at - self.window_s), default=0.0)
        print(f"soak: {at:.0f}/{seconds:g} s, {sent} sent, {len(answered)} answered, "
              f"{sum(o.status != 200 for o in answered)} not 200, replicas' RSS {rss:.0f} MiB, this client's loop "
              f"late by {1000 * late:.0f} ms at most", file=sys.stderr, flush=True)
        gc.freeze()

    def windows(self) -> list[dict]:
        """Per window of ``window_s`` (requests by send time): requests, failures, the accepted ones' p50 and p99 and
        the p99 of each span the server timed, the replicas' busy cores, the client loop's worst lateness and its
        longest collection."""
        count = max(1, round(self.wall_seconds / self.window_s))

        def within(k: int, pairs: list[tuple[float, object]]) -> list:  # the last window takes any overrun
            return [x for at, x in pairs if k * self.window_s <= at < (k + 1) * self.window_s
                    or (k == count - 1 and at >= (k + 1) * self.window_s)]

        rows = []
        for k in range(count):
            mine = within(k, self.outcomes)
            ok = [o for o in mine if o.status == 200]
            accepted = [o.seconds for o in ok]
            spans = {f"{span}_p99_ms": _ms(percentile([getattr(o, f"{span}_seconds") for o in ok
                                                        if getattr(o, f"{span}_seconds") is not None], 99))
                     for span in ("queue", "denoise", "engine", "server")}
            lag, collections = within(k, self.loop_lag), within(k, self.client_gc)
            # from the last sample before the window, so the windows' spans of CPU time meet
            sampled = [m for m in self.samples if m.at < k * self.window_s][-1:] + within(k, [(m.at, m) for m in
                                                                                                self.samples])
            rows.append({"window": k, "from_s": k * self.window_s, "requests": len(mine), "accepted": len(accepted),
                         "failed": len(mine) - len(accepted),
                         "p50_ms": _ms(percentile(accepted, 50)), "p99_ms": _ms(percentile(accepted, 99)), **spans,
                         "replica_cpu_cores": _busy_cores(sampled),
                         "client_lag_max_ms": _ms(max(lag, default=None)),
                         "client_gc_max_ms": _ms(max(collections, default=0.0))})
        return rows

    def growth(self, key: str) -> float | None:
        """Relative growth of ``key`` (rss_bytes, gpu_bytes) from the end of the first window to the last sample."""
        values = [(m.at, getattr(m, key)) for m in self.samples if getattr(m, key) is not None]
        warm = [v for at, v in values if at >= self.window_s]
        if len(warm) < 2 or not warm[0]:
            return None
        return (warm[-1] - warm[0]) / warm[0]

    def summary(self) -> dict:
        windows = self.windows()
        failed = sum(w["failed"] for w in windows)
        timed_out = sum(o.status == 0 for _, o in self.outcomes)
        rss, gpu = self.growth("rss_bytes"), self.growth("gpu_bytes")
        first, last = windows[0]["p99_ms"], windows[-1]["p99_ms"]
        drift = None if not first or last is None else (last - first) / first
        return {"capacity_rps": round(self.capacity_rps, 2), "offered_rps": round(self.offered_rps, 2),
                "arrivals": self.arrivals,
                "sent": len(self.outcomes), "failed": failed, "timed_out": timed_out,
                "started_at": datetime.fromtimestamp(self.started_at).astimezone().isoformat(timespec="seconds"),
                "wall_seconds": round(self.wall_seconds, 1), "first_p99_ms": first, "last_p99_ms": last,
                "client_lag_max_ms": _ms(max((late for _, late in self.loop_lag), default=None)),
                "client_gc_max_ms": _ms(max((paused for _, paused in self.client_gc), default=0.0)),
                "p99_drift": None if drift is None else round(drift, 4),
                "rss_growth": None if rss is None else round(rss, 5),
                "gpu_growth": None if gpu is None else round(gpu, 5),
                "rss_bytes_first_last": ([self.samples[0].rss_bytes, self.samples[-1].rss_bytes] if self.samples
                                         else None),
                "passed": failed == 0 and rss is not None and rss < MAX_MEMORY_GROWTH and
                          (gpu is None or gpu < MAX_MEMORY_GROWTH) and drift is not None and drift <= MAX_P99_DRIFT}


def _busy_cores(samples: list[ReplicaSample]) -> float | None:
    """The cores the replicas kept busy between the first of ``samples`` and the last (None with fewer than two, or
    with other replicas at the last than at the first: one gone or restarted between them took its CPU time along)."""
    if len(samples) < 2 or samples[-1].pids != samples[0].pids:
        return None
    return round((samples[-1].cpu_seconds - samples[0].cpu_seconds) / (samples[-1].at - samples[0].at), 2)


def write_report(report: SoakReport, path: Path) -> None:
    """The windows' rows, the replica samples and the summary, a JSON line each."""
    with open(path, "w") as log:
        for row in report.windows():
            log.write(json.dumps(row) + "\n")
        for m in report.samples:
            log.write(json.dumps({"memory_at_s": round(m.at, 1), "rss_bytes": m.rss_bytes,
                                  "gpu_bytes": m.gpu_bytes, "cpu_seconds": round(m.cpu_seconds, 2)}) + "\n")
        log.write(json.dumps({"summary": report.summary()}) + "\n")


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


async def soak(url: str, body: dict, pids, load: float = LOAD, seconds: float = 600.0, window_s: float = 60.0,
               sample_every_s: float = 5.0, clients: int = 8, capacity_seconds: float = 10.0, timeout: float = 30.0,
               seed: int = 0, arrivals: str = "paced") -> SoakReport:
    """Measure capacity, then send requests at ``load`` x capacity for ``seconds`` (``arrivals``: at even intervals,
    or Poisson's), sampling the memory of the processes ``pids()`` names; a line of progress per window on stderr.

    The client's heap is frozen first (``loadgen.ClientPauses``), as a replica's is: a full collection of a process
    that has started Ray and imported torch walks some 280,000 objects, 0.13-0.25 s on two cores, and the client
    stops sending and reading answers meanwhile, which a soak would charge to the server's p99. Its collections are
    recorded, from the capacity measurement on."""
    check_arrivals(arrivals)  # before minutes of measuring capacity
    with ClientPauses() as pauses:
        async with client_at_capacity(url, body, clients, capacity_seconds, timeout) as (http, measured):
            report = SoakReport(measured[0], load * measured[0], window_s, arrivals)
            print(f"soak: capacity {report.capacity_rps:.1f} requests/s; {report.offered_rps:.1f}/s ({arrivals}) "
                  f"for {seconds:g} s", file=sys.stderr, flush=True)
            started, report.started_at = time.perf_counter(), time.time()
            await _soak(report, http, body, pids, started, seconds, sample_every_s, timeout, seed)
    report.client_gc = pauses.since(started)
    return report


async def _soak(report: SoakReport, http: httpx.AsyncClient, body: dict, pids, started: float, seconds: float,
                sample_every_s: float, timeout: float, seed: int) -> None:
    """The soak's sends, answers and replica samples, from ``started`` for ``seconds``, into ``report``."""

    async def sent(at: float, k: int) -> None:
        report.outcomes.append((at, await one_request(http, {**body, "seed": k}, timeout)))

    watchers = [asyncio.create_task(report.sample_replicas(pids, started, sample_every_s)),
                asyncio.create_task(report.watch_loop(started))]
    # The tasks in flight only: a list of every one sent would keep tens of thousands for the collector to walk. A
    # task that raised (not an HTTP failure: one_request answers those) is kept to raise at the end, never dropped.
    in_flight: set[asyncio.Task] = set()
    raised: list[BaseException] = []

    def settled(task: asyncio.Task) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            raised.append(task.exception())

    window_s, window = report.window_s, 0
    for k, offset in enumerate(send_offsets(report.offered_rps, seconds, report.arrivals, seed)):
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        at = time.perf_counter() - started
        if at >= (window + 1) * window_s:
            window += 1
            report.window_ended(at, k, seconds)
        task = asyncio.create_task(sent(at, k))
        in_flight.add(task)
        task.add_done_callback(settled)
    await asyncio.gather(*in_flight, return_exceptions=True)  # what they raised is in ``raised``
    report.wall_seconds = time.perf_counter() - started
    for watcher in watchers:
        watcher.cancel()
    for failed in await asyncio.gather(*watchers, return_exceptions=True):
        if isinstance(failed, Exception):  # not the CancelledError of a watcher stopped here
            raise failed  # a sampler that died: its memory figures would stop without a word
    if raised:
        raise raised[0]
    report.samples.append(await asyncio.to_thread(replica_sample, pids, report.wall_seconds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--app", default="dit", help="the Ray Serve application the model's deployment belongs to")
    ap.add_argument("--model", default="digits-s")
    ap.add_argument("--steps", type=int, help="num_inference_steps of every request (default: the model's)")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--load", type=float, default=LOAD, help="offered load / measured capacity")
    ap.add_argument("--arrivals", choices=ARRIVALS, default="paced",
                    help="paced: at even intervals (every window offered alike); poisson: exponential intervals")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--window", type=float, default=60.0, help="seconds per reported window")
    ap.add_argument("--sample-every", type=float, default=5.0,
                    help="seconds between samples of the replicas' memory and CPU time")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients while measuring capacity")
    ap.add_argument("--capacity-seconds", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    body = {"model": a.model, "prompt": "3", "n": a.n, **({"num_inference_steps": a.steps} if a.steps else {})}
    deployment = model_deployment_name(a.model)
    if not replica_pids(a.app, deployment):
        raise SystemExit(f"no replica process of {a.app}:{deployment} on this host (ps shows them as "
                         f"ray::ServeReplica:{a.app}:{deployment}): run the soak on the server's host")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(a.url, body, lambda: replica_pids(a.app, deployment), a.load, a.seconds, a.window,
                              a.sample_every, a.clients, a.capacity_seconds, a.timeout, arrivals=a.arrivals))
    summary = report.summary()
    write_report(report, out / "soak.jsonl")
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1
