"""The numerical tests hold on any x86-64 CPU: rerun under every vector-kernel level this CPU can execute.

CI may land on another CPU than a developer's (Intel or AMD, AVX2 or AVX-512, any core count), and torch picks its
vectorised kernels by the CPU unless ``ATEN_CPU_CAPABILITY`` names a level; MKL, its BLAS, picks its code path
unless ``MKL_CBWR`` names one. So the tests marked ``numerics`` (the model, the samplers, the noise, and the engine's
exactness claims) run here once per level at or below this CPU's own at 1 thread, and once at 2 threads with torch
and MKL on their most portable paths (the suite itself runs them at the native level on every core): the machines
they imitate are the ones that would otherwise break CI. A level above the CPU's cannot run here (its instructions
fault), so an AVX-512 machine covers more than an AVX2 one.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("default", "avx2", "avx512")  # torch's x86 kernel levels (ATEN_CPU_CAPABILITY), lowest first
NUMERIC_FILES = ("tests/test_model.py", "tests/test_fast_paths.py", "tests/test_diffusion.py", "tests/test_engine.py")


def runnable_levels() -> tuple[str, ...]:
    """The levels up to the one torch chose for this CPU (its name is upper case: 'AVX2', 'AVX512', 'DEFAULT')."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    return LEVELS[:LEVELS.index(native) + 1] if native in LEVELS else ("default",)


def variants() -> list[tuple[str, int, str]]:
    """(ATEN_CPU_CAPABILITY, threads, MKL_CBWR) to run: every runnable level at 1 thread, and torch's and MKL's most
    portable kernels at 2 threads, which split the matrix products another way (MKL's COMPATIBLE path is SSE2 code
    that every x86-64 CPU runs)."""
    return [(level, 1, "") for level in runnable_levels()] + [("default", 2, "COMPATIBLE")]


def run_numeric_tests(level: str, threads: int, cbwr: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "OMP_NUM_THREADS": str(threads), "MKL_CBWR": cbwr}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "numerics", *NUMERIC_FILES]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_numeric_tests_pass_under_every_runnable_kernel_level_and_thread_count():
    chosen = variants()
    # All at once: each is mostly start-up (importing diffusers, the tests' reference) and one core's work.
    with concurrent.futures.ThreadPoolExecutor(len(chosen)) as pool:
        runs = list(pool.map(lambda v: run_numeric_tests(*v), chosen))
    failures = []
    for (level, threads, cbwr), run in zip(chosen, runs):
        # The header proves the variant ran as asked (a level torch could not use would show another name).
        header = f"torch CPU capability: {level.upper()}, threads: {threads}, MKL_CBWR: {cbwr or 'unset'}"
        if run.returncode != 0 or header not in run.stdout:
            failures.append(f"--- ATEN_CPU_CAPABILITY={level} OMP_NUM_THREADS={threads} MKL_CBWR={cbwr or 'unset'}: "
                            f"exit {run.returncode}\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
