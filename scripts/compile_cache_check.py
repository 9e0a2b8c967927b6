#!/usr/bin/env python3
"""Does a restart reuse the compile cache? Builds a compiled engine twice, each in a fresh process, on one cache
directory, and prints each one's start-up time and the FX-graph and AOTAutograd cache counters.

    .venv/bin/python scripts/compile_cache_check.py [--preset dit-tiny] [--device cpu] [--dynamic] [--out FILE]

The first process should miss (and save) one graph per bucket, the second hit every one of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from torch._dynamo.utils import counters

    from dit_runtime.engine import Engine, EngineConfig

    start = time.perf_counter()
    config = EngineConfig(device=args.device, dtype="float16" if args.device == "cuda" else "float32",
                          max_batch_size=args.max_batch_size, compile=True, cuda_graphs=args.device == "cuda",
                          compile_cache_dir=args.cache_dir, compile_dynamic=args.dynamic)
    engine = Engine.random_weights(args.preset, config)
    print(json.dumps({"preset": args.preset, "device": args.device, "compile_dynamic": args.dynamic,
                      "buckets": list(config.buckets), "startup_s": round(time.perf_counter() - start, 1),
                      "per_bucket_s": {b: round(s, 1) for b, s in engine.warmup_seconds.items()},
                      "fx_graph_cache": {k: v for k, v in counters["inductor"].items() if "fxgraph_cache" in k},
                      "aot_autograd_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--dynamic", action="store_true", help="one program with a symbolic batch size")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="dit-compile-cache-") as cache:
        rows = []
        for run in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--child", "--cache-dir", cache, "--preset", args.preset,
                   "--device", args.device, "--max-batch-size", str(args.max_batch_size)]
            out = subprocess.run(cmd + (["--dynamic"] if args.dynamic else []), check=True, text=True,
                                 stdout=subprocess.PIPE).stdout
            row = {"run": run, **json.loads(out.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
