"""Feature caching's quality on the shipped digit checkpoints: dit-eval's measures at every ``cache`` preset, through
the engine, from the same seeds, and one picture of each preset's samples beside ``off``'s.

    python -m benchmarks cache-quality --checkpoints checkpoints/digits-s.safetensors checkpoints/digits-m.safetensors

Each checkpoint samples with its recorded default sampling (as a server does); rows go to ``OUT/cache-quality.jsonl``
as they are measured, with the accuracy and diversity ratio against ``off`` and the blocks' share of steps. The
picture (``OUT/<checkpoint>-cache-presets.png``) has one row per digit and, per preset, its first samples.
Runs on the CPU in a few minutes per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dit_runtime.checkpoint import load_model
from dit_runtime.evaluation import eval_engine, evaluate, save_sample_grid, train_digit_classifier
from dit_runtime.request import CACHE_POLICIES

COLUMNS_PER_PRESET = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks cache-quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="digit checkpoints (.safetensors)")
    p.add_argument("--presets", nargs="+", default=list(CACHE_POLICIES), choices=list(CACHE_POLICIES))
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--steps", type=int, help="num_inference_steps; default: each checkpoint's recorded default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    a = p.parse_args(argv)
    presets = ["off"] + [name for name in a.presets if name != "off"]
    a.out.mkdir(parents=True, exist_ok=True)
    rows_path = a.out / "cache-quality.jsonl"
    classifier = train_digit_classifier(seed=a.seed)
    k = a.samples_per_class
    for checkpoint in a.checkpoints:
        model, info = load_model(checkpoint)
        engine = eval_engine(model, info, k)
        samples, baseline = {}, None
        for preset in presets:
            sampling = engine.spec.sampling(num_inference_steps=a.steps, cache=preset, seed=a.seed)
            start = time.perf_counter()
            result, samples[preset] = evaluate(engine, classifier, source=checkpoint, samples_per_class=k,
                                               sampling=sampling)
            baseline = baseline or result
            row = {"checkpoint": Path(checkpoint).name, "cache": preset, **result.sampling,
                   "samples_per_class": k, "accuracy": round(result.accuracy, 4),
                   "accuracy_minus_off": round(result.accuracy - baseline.accuracy, 4),
                   "diversity": round(result.diversity, 3),
                   "diversity_vs_off": round(result.diversity / baseline.diversity, 4),
                   "cpu_seconds": round(time.perf_counter() - start, 1)}
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        # One row per digit: each preset's first samples side by side, off first.
        per_class = [torch.cat([samples[name][d * k:d * k + COLUMNS_PER_PRESET] for name in presets])
                     for d in range(10)]
        grid = save_sample_grid(torch.cat(per_class), rows=10, columns=COLUMNS_PER_PRESET * len(presets),
                                path=a.out / f"{Path(checkpoint).stem}-cache-presets.png")
        print(f"{checkpoint}: presets {', '.join(presets)}, {COLUMNS_PER_PRESET} samples each per row: {grid}",
              file=sys.stderr)
    return 0
