"""Where the serving processes' Python time goes under load: py-spy samples of the thread holding the GIL, by part.

``benchmarks serve --profile`` records each replica and Ray proxy process during every load phase (``py-spy record
--gil``: only samples where a thread holds the GIL, so time spent in torch's kernels, zlib or a socket wait with the
GIL released is not counted; a GPU's time never is). Each sample goes to the part of the stack its innermost
recognised frame belongs to (``PARTS``): the denoising step's Python (eager on a CPU), the engine's scheduling,
image encoding, base64, JSON, pydantic, the ASGI stack, Ray Serve, asyncio and so on. Divided by the requests
answered in the phase, that is each part's milliseconds of GIL time per request: on a replica whose GIL is busy,
every millisecond of it delays the engine loop's next step.

The raw stacks stay beside the results (``profile-<phase>-<process>.txt``, py-spy's collapsed format, one stack and
its sample count per line; ``flamegraph.pl`` draws them) and the table goes to ``profile.jsonl``.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SAMPLES_PER_S = 200
# Ordered: a frame (``function (file:line)``) is matched against each in turn; the innermost frame that matches any
# names the part.
PARTS: tuple[tuple[str, str], ...] = (
    # The denoising step itself: on a GPU compiled and replayed as CUDA graphs, so nearly none of it runs there.
    ("denoising step (eager)", r"ModelRunner\.(_step|_full|_embedded|_final|_denoise|_layout|_timesteps)\b"
                               r"|FeatureCache\.|dit_runtime/(model|diffusion)\.py"
                               r"|dit_runtime/engine/(fast_paths|fp8)\.py"),
    ("engine (scheduling, batching, results)", r"dit_runtime/engine/"),
    ("image encoding", r"dit_runtime/(images|decoders)\.py|(^|[(/])(PIL|numpy)/"),
    ("model server", r"serving/(model_server|backend)\.py"),
    ("frontend (our API)", r"serving/(frontend|protocol|errors|gateway|metrics|autoscaling)\.py"),
    ("base64", r"(^|[(/])base64\.py"),
    ("JSON", r"(^|[(/])json/|(^|[(/])orjson"),
    ("pydantic", r"(^|[(/])pydantic"),
    ("ASGI (FastAPI, Starlette, uvicorn)", r"(^|[(/])(fastapi|starlette|uvicorn|h11|httptools|anyio)/"),
    ("Ray Serve", r"(^|[(/])ray/serve/"),
    ("Ray core", r"(^|[(/])ray/"),
    ("prometheus-client", r"(^|[(/])prometheus_client/"),
    ("torch (its Python)", r"(^|[(/])torch/"),
    ("asyncio event loop", r"(^|[(/])asyncio/|(^|[(/])uvloop"),
    ("threads and futures", r"(^|[(/])(threading|queue)\.py|(^|[(/])concurrent/"),
)
_PATTERNS = [(name, re.compile(pattern)) for name, pattern in PARTS]


def py_spy() -> str:
    """The py-spy executable, or a SystemExit saying how to get it."""
    path = shutil.which("py-spy")
    if path is None:
        raise SystemExit("--profile needs py-spy on PATH: pip install -e '.[profile]'")
    return path


@dataclass
class Recording:
    """One py-spy process sampling one serving process for one phase."""

    role: str
    path: Path
    process: subprocess.Popen

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


def record(pids: dict[int, str], seconds: float, out: Path, phase: str) -> list[Recording]:
    """Start py-spy on each pid (its role names the file) for ``seconds``; it samples without stopping the process."""
    exe = py_spy()
    recordings = []
    for pid, role in pids.items():
        path = out / f"profile-{phase}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', role)}-{pid}.txt"
        process = subprocess.Popen([exe, "record", "--pid", str(pid), "--gil", "--nonblocking", "--format", "raw",
                                    "--rate", str(SAMPLES_PER_S), "--duration", str(max(1, round(seconds))),
                                    "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recordings.append(Recording(role, path, process))
    return recordings


def part_of(stack: str) -> str:
    """The part of the serving stack a collapsed stack (outermost frame first, ``;``-separated) belongs to."""
    for frame in reversed(stack.split(";")):
        for name, pattern in _PATTERNS:
            if pattern.search(frame):
                return name
    return "other"


def ms_per_request(path: Path, requests: int) -> dict[str, float]:
    """A recording's GIL time per answered request, in milliseconds, by part (largest first)."""
    samples: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[part_of(stack)] += int(count)
    scale = 1000 / SAMPLES_PER_S / max(requests, 1)
    return {part: round(n * scale, 3) for part, n in samples.most_common()}
