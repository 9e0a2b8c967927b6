"""What it costs to wake a process or a thread that has been idle, on this host.

A served request crosses several processes and threads: the client, HAProxy, the replica's event loop, the engine's
thread and the PNG encoder's. Each one sleeps while the GPU works and is woken when the answer comes back. Run 24
found that a Ray Serve route which waits 16 ms before it answers costs about 1.1 ms more than one that answers at
once, with none of our code in it (docs/benchmarks.md). This probe measures the part of that the operating system
(and a hypervisor under it) can explain: the round trip of one byte between two processes over TCP loopback, and of
one wake-up between two threads, after the pair has been idle for a given gap.

Each case is timed with the waiting side either blocked in the kernel (as every process on the serving path is) or
spinning on a non-blocking socket (as HAProxy's ``busy-polling`` does). If a round trip after 16 ms idle costs much
more than one back to back, and spinning takes the difference away, the waiting floor is wake-up latency.

    python3 scripts/wake_probe.py --out OUT                 # one JSON row per case in OUT/wake_probe.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

GAPS_MS = (0.0, 0.2, 1.0, 4.0, 16.0)


def _recv_exact(sock: socket.socket, spin: bool) -> None:
    if not spin:
        if not sock.recv(1):
            raise EOFError
        return
    while True:
        try:
            if not sock.recv(1):
                raise EOFError
            return
        except BlockingIOError:
            pass


def _echo(port: int, spin: bool, ready) -> None:
    """The responder: answers every byte with one byte, blocked in recv or spinning on it."""
    srv = socket.create_server(("127.0.0.1", port))
    ready.set()
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(not spin)
    try:
        while True:
            _recv_exact(conn, spin)
            conn.sendall(b"x")
    except (EOFError, ConnectionError):
        pass
    finally:
        conn.close()
        srv.close()


def _wait_gap(gap_s: float, spin: bool) -> None:
    if gap_s <= 0:
        return
    if spin:
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(gap_s)


def tcp_round_trips(gap_ms: float, server_spin: bool, client_spin: bool, n: int, port: int) -> list[float]:
    ready = mp.Event()
    proc = mp.Process(target=_echo, args=(port, server_spin, ready), daemon=True)
    proc.start()
    ready.wait(10)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(not client_spin)
    times = []
    try:
        for i in range(n + 20):
            _wait_gap(gap_ms / 1000, client_spin)
            t0 = time.perf_counter()
            sock.sendall(b"x")
            _recv_exact(sock, client_spin)
            if i >= 20:
                times.append(time.perf_counter() - t0)
    finally:
        sock.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return times


def thread_wakes(gap_ms: float, n: int) -> list[float]:
    """A worker blocked on a threading.Event, set by this thread after the gap: the time until the worker runs."""
    go, done = threading.Event(), threading.Event()
    woke: list[float] = []

    def worker():
        for _ in range(n + 20):
            go.wait()
            woke.append(time.perf_counter())
            go.clear()
            done.set()

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    sent = []
    for _ in range(n + 20):
        _wait_gap(gap_ms / 1000, spin=False)
        done.clear()
        sent.append(time.perf_counter())
        go.set()
        done.wait()
    t.join(5)
    return [w - s for w, s in zip(woke[20:], sent[20:])]


def loop_wakes(gap_ms: float, n: int, poke_ahead_ms: float = 0.0) -> list[float]:
    """An asyncio loop on its own thread awaits a future that this thread settles with ``call_soon_threadsafe``
    after the gap, as the engine's thread settles a request's answer: the time until the awaiting coroutine runs.
    With ``poke_ahead_ms``, the loop is first woken by a no-op callback that long before the answer."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    ready, done = threading.Event(), threading.Event()
    box: dict = {}
    woke: list[float] = []

    async def waiter():
        for _ in range(n + 20):
            box["future"] = loop.create_future()
            ready.set()
            await box["future"]
            woke.append(time.perf_counter())
            done.set()

    asyncio.run_coroutine_threadsafe(waiter(), loop)
    sent = []
    for _ in range(n + 20):
        ready.wait()
        ready.clear()
        done.clear()
        if poke_ahead_ms:
            _wait_gap((gap_ms - poke_ahead_ms) / 1000, spin=False)
            loop.call_soon_threadsafe(lambda: None)
            _wait_gap(poke_ahead_ms / 1000, spin=True)  # the engine's thread is busy (or spinning on the GPU) then
        else:
            _wait_gap(gap_ms / 1000, spin=False)
        sent.append(time.perf_counter())
        loop.call_soon_threadsafe(box["future"].set_result, None)
        done.wait()
    loop.call_soon_threadsafe(loop.stop)
    return [w - s for w, s in zip(woke[20:], sent[20:])]


def host_facts() -> dict:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None
    cpuinfo = read("/proc/cpuinfo") or ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), None)
    return {"cpus": os.cpu_count(), "cpu_model": model, "hypervisor": " hypervisor" in cpuinfo,
            "kernel": platform.release(),
            "cpuidle_driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
            "cpufreq_governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200, help="round trips per case (after 20 warm-ups)")
    ap.add_argument("--port", type=int, default=47311)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "wake_probe.jsonl"
    facts = host_facts()
    print(json.dumps(facts), flush=True)

    def write(row: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps({**row, **facts}) + "\n")
        print(f"{row['case']:<38} gap {row['gap_ms']:>5} ms: p50 {row['p50_us']:8.1f} us  "
              f"p90 {row['p90_us']:8.1f} us", flush=True)

    def summarise(case: str, gap: float, xs: list[float]) -> dict:
        us = sorted(1e6 * x for x in xs)
        return {"case": case, "gap_ms": gap, "n": len(us), "p50_us": statistics.median(us),
                "p90_us": us[int(0.9 * (len(us) - 1))], "min_us": us[0]}

    port = a.port
    for server_spin, client_spin in ((False, False), (True, False), (False, True), (True, True)):
        case = f"tcp server {'spins' if server_spin else 'blocks'}, client {'spins' if client_spin else 'blocks'}"
        for gap in GAPS_MS:
            port += 1
            write(summarise(case, gap, tcp_round_trips(gap, server_spin, client_spin, a.n, port)))
    for gap in GAPS_MS:
        write(summarise("thread wake (threading.Event)", gap, thread_wakes(gap, a.n)))
    for gap in GAPS_MS:
        write(summarise("asyncio loop wake (call_soon_threadsafe)", gap, loop_wakes(gap, a.n)))
    for ahead in (0.2, 0.5, 1.0):
        write(summarise(f"asyncio loop wake, poked {ahead} ms before", 16.0, loop_wakes(16.0, a.n, ahead)))


if __name__ == "__main__":
    main()
