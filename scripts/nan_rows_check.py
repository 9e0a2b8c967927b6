"""Which of dit-bench's batch-256 rows turn NaN, eager against compiled (session 7, run 27).

    python scripts/nan_rows_check.py [--steps 30]

Fills the rows as dit-bench does, runs the eager step and then the compiled one, and prints the rows whose latent
stopped being finite, the step it happened at, and their timestep and label. Run 27 (before ``sampler_step``
clamped its variance terms) found 4 rows, compiled only: docs/benchmarks.md, runs 21-26.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_runtime.cli.bench import fill_rows, inputs, random_dit  # noqa: E402
from dit_runtime.engine.runner import ModelRunner  # noqa: E402
from dit_runtime.engine.types import EngineConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="dit-10l")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    b = args.batch
    x, t, y = inputs(args.preset, b, torch.float16)
    print(f"inputs: {int(torch.isfinite(x).flatten(1).all(1).sum())} of {b} rows finite, "
          f"t in [{int(t.min())}, {int(t.max())}], labels in [{int(y.min())}, {int(y.max())}]")
    for compiled in (False, True):
        config = EngineConfig(device="cuda", dtype="float16", max_batch_size=b, batch_buckets=(b,),
                              compile=compiled, cuda_graphs=compiled)
        runner = ModelRunner(random_dit(args.preset, torch.float16), config, clip_denoised=False)
        runner.warm_up()
        runner.layout.zero_()
        fill_rows(runner, b, (x, t, y))
        first_bad: dict[int, int] = {}
        for step in range(args.steps):
            runner.execute(b)
            torch.cuda.synchronize()
            for row in (~torch.isfinite(runner.x[:b]).flatten(1).all(1)).nonzero().flatten().tolist():
                first_bad.setdefault(row, step)
        print(f"{'compiled' if compiled else 'eager'}: rows not finite (row: first step) {first_bad}")
        for row in first_bad:
            print(f"  row {row}: timestep {int(t[row])}, label {int(y[row])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
