"""The engine benchmark's plumbing that runs without a GPU: two versions of the engine side by side, and the steady
steps of a full batch timed through the engine's public API."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks.engine import BASELINE_PACKAGE, EngineSteps, engine_request, load_baseline

import dit_runtime

REPO = Path(__file__).resolve().parents[1]


def test_another_checkout_runs_beside_this_one_and_its_steps_are_timed(tmp_path):
    shutil.copytree(REPO / "dit_runtime", tmp_path / "dit_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    baseline = load_baseline(str(tmp_path))
    try:
        from baseline_dit_runtime.engine import Engine, EngineConfig

        import dit_runtime.engine
        assert Engine is not dit_runtime.engine.Engine  # its own classes, from its own files
        assert Path(sys.modules["baseline_dit_runtime.engine.runner"].__file__).is_relative_to(tmp_path)
        engine = Engine.random_weights("dit-tiny", EngineConfig(max_batch_size=16)).start()
        try:
            seconds = EngineSteps("baseline", engine, rows=4)(steps=3)
            assert 0 < seconds < 5
            assert engine.stats().running_requests == 0  # left idle for the next setup
        finally:
            engine.stop()
    finally:
        for name in [n for n in sys.modules if n == BASELINE_PACKAGE or n.startswith(BASELINE_PACKAGE + ".")]:
            del sys.modules[name]
    assert baseline.__name__ == BASELINE_PACKAGE


def test_a_benchmark_request_is_one_unguided_image_of_the_asked_steps():
    request = engine_request(dit_runtime, 5, seed=3, steps=1000, sampler="ddim", guidance=1.0)
    assert request.class_ids == (5,) and request.rows == 1 and request.sampling.num_inference_steps == 1000
