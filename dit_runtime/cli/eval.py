"""``dit-eval``: measure a digit checkpoint against real digits (class accuracy and diversity), draw a sample grid.

    dit-eval checkpoints/digits-s.safetensors [--samples-per-class 50] [--json]
    dit-eval checkpoints/digits-m.safetensors --device cuda --precision fp8 --compile --cuda-graphs
    dit-eval checkpoints/digits-m.safetensors --device cuda --precision fp8 --fp8-blocks --fp8-min-rows 0
    dit-eval checkpoints/digits-s.safetensors --cache balanced

The images come from the serving engine (its offline loop), configured as the flags say, so the figures hold for
what a server with that configuration answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..checkpoint import CheckpointError, load_model, load_state_dict, save_checkpoint
from ..engine import Engine, FastPaths, InvalidRequestError, configure_compile
from ..request import CACHE_POLICIES
from ..evaluation import (MIN_CLASSIFIER_ACCURACY, MIN_DIVERSITY_RATIO, MIN_SAMPLE_ACCURACY, eval_config, evaluate,
                          save_sample_grid, train_digit_classifier)
from ..request import SAMPLERS
from . import add_checkpoint_argument, denoising_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dit-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(p, "a digit model's .safetensors checkpoint")
    p.add_argument("--samples-per-class", type=int, default=50, help="images generated per digit (default 50)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the checkpoint's recorded default")
    p.add_argument("--steps", type=int, help="num_inference_steps; default: the checkpoint's recorded default")
    p.add_argument("--guidance", type=float, help="guidance_scale; default: the checkpoint's recorded default")
    p.add_argument("--cache", choices=list(CACHE_POLICIES), default="off",
                   help="feature-caching preset (default off): the steps between full ones forecast the blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (at least one digit's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="the engine's precision (all but fp32 need cuda; fp8 a GPU with FP8 tensor cores)")
    p.add_argument("--fp8-blocks", action=argparse.BooleanOptionalAction,
                   help="precision fp8: fc1's GEMM writes GELU's output as e4m3 in 1x128 blocks, or (--no-fp8-blocks) "
                        "per-row scales and a GELU pass (default: the engine's FastPaths.fp8_blocks, on)")
    p.add_argument("--fp8-min-rows", type=int,
                   help="precision fp8: forwards of fewer token rows run in bf16 (0: fp8 at every size; default: the "
                        "engine's FastPaths.fp8_min_rows)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's step")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the engine's step as CUDA graphs")
    p.add_argument("--grid", help="sample-grid PNG path (default: <checkpoint stem>-samples.png beside it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--record", action="store_true",
                   help="when the bar is met, store these sampling settings as the checkpoint's recommended defaults "
                        "(its sampling contract) and the figures under training.eval (the file is rewritten "
                        "atomically)")
    return p


def format_table(result) -> str:
    d = result.to_dict()
    lines = [f"checkpoint: {result.checkpoint}",
             f"sampling: {result.sampling['sampler']}, {result.sampling['num_inference_steps']} steps, guidance "
             f"{result.sampling['guidance_scale']:g}, seed {result.sampling['seed']}, cache "
             f"{result.sampling['cache']} (blocks run at {result.sampling['full_steps']} of "
             f"{result.sampling['num_inference_steps']} steps); {result.samples_per_class} samples per class in "
             f"{result.sampling_seconds:.1f}s",
             f"classifier (RBF SVM on real digits): held-out accuracy {result.classifier_held_out_accuracy:.1%}",
             "",
             "class  accuracy  diversity  real diversity",
             *(f"{c:>5}  {a:>8.1%}  {dv:>9.2f}  {rd:>14.2f}" for c, (a, dv, rd) in enumerate(
                 zip(result.per_class_accuracy, result.per_class_diversity, result.per_class_real_diversity))),
             f"  all  {result.accuracy:>8.1%}  {result.diversity:>9.2f}  {result.real_diversity:>14.2f}",
             "",
             f"Frechet distance to {result.frechet_reference_size} real digits (8x8 ink levels): "
             f"{result.frechet_distance:.2f} ({10 * result.samples_per_class} samples); real against real "
             f"{result.real_frechet_distance:.2f} ({result.real_frechet_samples} other real digits, the floor)",
             f"accuracy {result.accuracy:.1%} (bar >= {MIN_SAMPLE_ACCURACY:.0%}); diversity {result.diversity:.2f} = "
             f"{d['diversity_ratio']:.2f} x real (bar >= {MIN_DIVERSITY_RATIO:g}): "
             f"{'PASS' if result.passed else 'FAIL'}"]
    return "\n".join(lines)


def record_in_checkpoint(path: Path, result) -> None:
    """Store the measured sampling settings and figures in the checkpoint's training record, atomically."""
    served, info = load_state_dict(path)
    try:
        raw, _ = load_state_dict(path, which="raw")
    except CheckpointError:
        raw = None
    info.sampling = info.sampling.with_overrides(**{k: result.sampling[k] for k in
                                                    ("sampler", "num_inference_steps", "guidance_scale")})
    info.training["eval"] = {k: v for k, v in result.to_dict().items()
                             if k in ("accuracy", "diversity", "real_diversity", "diversity_ratio", "samples_per_class",
                                      "classifier_held_out_accuracy", "frechet_distance", "real_frechet_distance")}
    info.training["eval"]["seed"] = result.sampling["seed"]
    save_checkpoint(path, served, info, raw_state_dict=raw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples_per_class < 2:
        print("dit-eval: --samples-per-class must be at least 2 (diversity needs pairs)", file=sys.stderr)
        return 2
    if args.precision != "fp8" and (args.fp8_blocks is not None or args.fp8_min_rows is not None):
        print(f"dit-eval: --fp8-blocks and --fp8-min-rows apply to --precision fp8 only (given: {args.precision})",
              file=sys.stderr)
        return 2
    try:
        model, info = load_model(args.checkpoint, device=args.device)
        k = args.samples_per_class
        given = {"fp8_blocks": args.fp8_blocks, "fp8_min_rows": args.fp8_min_rows}
        fast_paths = FastPaths(**{name: value for name, value in given.items() if value is not None})
        config = eval_config(k, args.batch_size, device=args.device, precision=args.precision,
                             compile=args.compile, cuda_graphs=args.cuda_graphs, fast_paths=fast_paths)
        configure_compile(config)
        engine = Engine(model, info, config)
        # The checkpoint's measured defaults fill in what was not given, as for a request to the server.
        sampling = engine.spec.sampling(num_inference_steps=args.steps, sampler=args.sampler,
                                        guidance_scale=args.guidance, cache=args.cache, seed=args.seed)
    except (CheckpointError, InvalidRequestError, ValueError) as e:
        print(f"dit-eval: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    classifier = train_digit_classifier(seed=args.seed)
    print(f"dit-eval: classifier trained on real digits in {time.perf_counter() - start:.1f}s, held-out accuracy "
          f"{classifier.held_out_accuracy:.1%} (as scanned: {classifier.held_out_accuracy_raw:.1%})",
          file=sys.stderr)
    if classifier.held_out_accuracy < MIN_CLASSIFIER_ACCURACY:
        print(f"dit-eval: the classifier's held-out accuracy is below {MIN_CLASSIFIER_ACCURACY:.0%}; "
              "its verdicts would not mean much", file=sys.stderr)
        return 1
    engine.on_step = denoising_progress(10 * k * sampling.num_inference_steps)
    try:
        result, samples = evaluate(engine, classifier, source=args.checkpoint, samples_per_class=k,
                                   sampling=sampling)
    except ValueError as e:
        print(f"\ndit-eval: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    ckpt_path = Path(args.checkpoint)
    grid = Path(args.grid) if args.grid else ckpt_path.with_name(f"{ckpt_path.stem}-samples.png")
    save_sample_grid(samples, rows=10, path=grid)
    out = result.to_dict()
    out["grid"] = str(grid)
    if args.record and result.passed:
        record_in_checkpoint(ckpt_path, result)
        out["recorded"] = True
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(result))
        print(f"sample grid (one row per digit): {grid}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
