"""A few-step student against its teacher on the digits: dit-eval's measures (accuracy, diversity, Frechet distance
to held-apart real digits) of the teacher at its defaults, of the teacher with DPM-Solver++ at each student step
count (what a user gets without distillation), and of the student at each count; one picture of them side by side.

    python -m benchmarks student-quality checkpoints/digits-s-4step.safetensors --steps 1 2 4 8
    python -m benchmarks student-quality checkpoints/digits-m-4step.safetensors --steps 2 4 --guidance 1.25 1.5 2

``--guidance`` adds the student at those scales at each step count: guidance trades diversity (and Frechet distance)
for class fidelity, and a student's best scale need not be its teacher's. The teacher is the one the student's
contract names, found beside the student. Every setting samples the same seeds, ``--samples-per-class`` per digit,
through the engine; rows go to ``OUT/student-quality.jsonl`` as they are measured. The picture
(``OUT/<student>-vs-teacher.png``) has one row per digit and, per setting, its first samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dit_runtime.checkpoint import load_model, sha256_of
from dit_runtime.evaluation import eval_engine, evaluate, save_sample_grid, train_digit_classifier

COLUMNS_PER_SETTING = 3
PICTURED = (("teacher", None, None), ("teacher", 4, None), ("teacher", 2, None), ("student", 4, None),
            ("student", 2, None), ("student", 1, None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks student-quality", description=__doc__.split("\n\n")[0])
    p.add_argument("student", help="a student checkpoint from dit-distill; its teacher is read from beside it")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--guidance", nargs="+", type=float, default=[],
                   help="also the student at these guidance scales (default: only at its recommended one)")
    p.add_argument("--samples-per-class", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    student_model, student_info = load_model(a.student)
    source = student_info.sampling.teacher
    if source is None:
        p.error(f"{a.student} is not a distilled student (its sampling contract names no teacher)")
    teacher = Path(a.student).with_name(source.checkpoint)
    if not teacher.is_file() or sha256_of(teacher) != source.sha256:
        p.error(f"{teacher} is not the teacher {a.student} was distilled from (sha256 {source.sha256[:12]}...)")
    engines = {"student": eval_engine(student_model, student_info, a.samples_per_class),
               "teacher": eval_engine(*load_model(teacher), a.samples_per_class)}
    classifier = train_digit_classifier(seed=a.seed)
    settings = [("teacher", None, None)] + [(who, n, None) for who in ("teacher", "student") for n in a.steps]
    settings += [("student", n, w) for n in a.steps for w in a.guidance]
    samples = {}
    for who, steps, scale in settings:
        engine = engines[who]
        sampler = None if steps is None or who == "student" else "dpm-solver++"
        sampling = engine.spec.sampling(num_inference_steps=steps, sampler=sampler, guidance_scale=scale, seed=a.seed)
        path = teacher if who == "teacher" else Path(a.student)
        result, samples[(who, steps, scale)] = evaluate(engine, classifier, source=str(path),
                                                        samples_per_class=a.samples_per_class, sampling=sampling)
        row = {"model": path.name, "who": who,
               "setting": "defaults" if steps is None else f"{steps} steps", **result.sampling,
               "samples_per_class": a.samples_per_class, "accuracy": round(result.accuracy, 4),
               "diversity_ratio": round(result.diversity_ratio, 3),
               "frechet_distance": round(result.frechet_distance, 2),
               "real_frechet_distance": round(result.real_frechet_distance, 2),
               "sampling_seconds": result.sampling_seconds}
        with open(a.out / "student-quality.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    pictured = [s for s in PICTURED if s in samples]
    k = a.samples_per_class
    per_class = [torch.cat([samples[s][d * k:d * k + COLUMNS_PER_SETTING] for s in pictured]) for d in range(10)]
    grid = save_sample_grid(torch.cat(per_class), rows=10, columns=COLUMNS_PER_SETTING * len(pictured),
                            path=a.out / f"{Path(a.student).stem}-vs-teacher.png")
    names = ", ".join(f"{who} {'defaults' if n is None else f'{n} steps'}" for who, n, _ in pictured)
    print(f"{a.student}: {names}, {COLUMNS_PER_SETTING} samples each per row: {grid}", file=sys.stderr)
    return 0
