"""Does half precision (and compilation) keep a digit model's quality? dit-eval's accuracy through the engine.

For each engine variant (precision x compiled) the same 500 requests (50 per digit, fixed seeds, the checkpoint's
default sampling) are generated and scored by dit-eval's classifier; one JSON line per variant, printed and appended
to OUT/eval_precision.jsonl as soon as it is measured.

    python scripts/eval_precision.py checkpoints/digits-m.safetensors --device cuda     # GPU: all variants
    python scripts/eval_precision.py checkpoints/digits-m.safetensors --device cpu      # CPU: fp32 only
    python scripts/eval_precision.py CKPT --variants bfloat16:compiled --compile-cache-dir /tmp/cache  # one variant

With ``--compile-cache-dir``, a second run in a new process shows how quickly a restart with a warm compile cache
starts (``warmup_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dit_runtime.engine import Engine, EngineConfig, GenerationRequest
from dit_runtime.evaluation import score_samples, train_digit_classifier

PER_CLASS = 50


def run_variant(checkpoint: str, config: EngineConfig, classifier) -> dict:
    start = time.perf_counter()
    engine = Engine.from_checkpoint(checkpoint, config).start()
    warm = time.perf_counter() - start
    sampling = engine.info.default_sampling
    handles, labels = [], []
    for c in range(10):
        for r in range(PER_CLASS // 10):
            handles.append(engine.submit(GenerationRequest(
                class_labels=[c], num_images=10, seed=1000 * c + r, sampler=sampling["sampler"],
                num_inference_steps=sampling["num_inference_steps"], guidance_scale=sampling["guidance_scale"])))
            labels += [c] * 10
    images = torch.cat([torch.from_numpy(h.result(timeout=600).images) for h in handles])  # (N, H, W, 1) uint8
    engine.stop()
    samples = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # back to [-1, 1]
    result = score_samples(samples, torch.tensor(labels), classifier, source=checkpoint, samples_per_class=PER_CLASS,
                           sampling=sampling)
    return {"device": config.device, "dtype": config.dtype, "compiled": config.compile, "accuracy": result.accuracy,
            "diversity_ratio": round(result.diversity_ratio, 3), "warmup_s": round(warm, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--variants", nargs="+", metavar="DTYPE[:compiled]",
                   help="default: float32 on the CPU; float32, float16, bfloat16 eager and compiled on the GPU")
    p.add_argument("--compile-cache-dir", help="inductor's cache (EngineConfig.compile_cache_dir)")
    args = p.parse_args()
    classifier = train_digit_classifier()
    if args.variants:
        variants = [(v.split(":")[0], v.endswith(":compiled")) for v in args.variants]
    else:
        variants = [("float32", False)]
        if args.device == "cuda":
            variants += [("float16", False), ("bfloat16", False), ("float16", True), ("bfloat16", True)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dtype, compiled in variants:
        config = EngineConfig(device=args.device, dtype=dtype, compile=compiled, cuda_graphs=compiled,
                              max_batch_size=256, max_queue_size=1024, max_images_per_request=10,
                              compile_cache_dir=args.compile_cache_dir)
        row = {"checkpoint": args.checkpoint, "compile_cache_dir": args.compile_cache_dir,
               **run_variant(args.checkpoint, config, classifier)}
        print(json.dumps(row), flush=True)
        with open(out / "eval_precision.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
