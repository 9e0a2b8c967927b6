"""Why does dit-bench's batch-256 step run ~15% faster when the model's final layer is random instead of zero?

Run 24 timed, in one dit-bench process and in turn, the engine's step with the final layer at adaLN-Zero's zeros
(33.2 ms, SM clock about 1,600 MHz) and drawn at random (28.3 ms, about 1,860 MHz), under the same power cap. The
kernels are the same; so is the work, unless the data differ. This looks at the data: for each model, the step's
state after some steps (is the latent finite, did it move), and, on that state, every block's output and the
model's output (finite share, exact zeros, size), with each step's time and the SM clock beside it.

    python scripts/final_layer_check.py --out OUT [--batch 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_runtime.cli.bench import Recorder, cuda_time, fill_rows, inputs, random_dit  # noqa: E402
from dit_runtime.cli.gpu_clock import GpuClock  # noqa: E402
from dit_runtime.engine.runner import ModelRunner  # noqa: E402
from dit_runtime.engine.types import EngineConfig  # noqa: E402


def stats(t: torch.Tensor) -> dict:
    t = t.float()
    finite = torch.isfinite(t)
    f = t[finite]
    return {"finite": round(finite.float().mean().item(), 6), "zeros": round((t == 0).float().mean().item(), 6),
            "abs_mean": round(f.abs().mean().item(), 4) if f.numel() else None,
            "abs_max": round(f.abs().max().item(), 4) if f.numel() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="dit-10l")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__},
                   name="final_layer.jsonl")
    clock = GpuClock(args.out / "smi.csv")
    b = args.batch
    runners = {}
    for name, random_final in (("zero_final", False), ("random_final", True)):
        config = EngineConfig(device="cuda", dtype="float16", max_batch_size=b, batch_buckets=(b,), compile=True,
                              cuda_graphs=True)
        runner = ModelRunner(random_dit(args.preset, torch.float16, random_final_layer=random_final), config,
                             clip_denoised=False)
        runner.warm_up()
        runner.layout.zero_()
        fill_rows(runner, b, inputs(args.preset, b, torch.float16))
        runners[name] = runner
    for name, runner in runners.items():
        x0 = runner.x[:b].clone()
        for _ in range(args.steps):
            runner.execute(b)
        torch.cuda.synchronize()
        row = {"part": "state", "model": name, "steps": args.steps, "x": stats(runner.x[:b]),
               "x_moved_max": round((runner.x[:b] - x0).abs().max().item(), 6)}
        # the model, eagerly, on the step's own inputs: each block's output and the prediction
        model = runner.model
        seen = {}
        hooks = [blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block{k}", stats(o)))
                 for k, blk in enumerate(model.blocks)]
        hooks.append(model.final_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("final_in", stats(i[0]))))
        x, t, y = inputs(args.preset, b, torch.float16)
        with torch.inference_mode():
            out = model(runner.x[:b].half(), t, y)
        for h in hooks:
            h.remove()
        row.update({"blocks": seen, "out": stats(out)})
        rec.add(row)
    for r in range(3):  # in turn, as dit-bench times them
        for name, runner in runners.items():
            t0 = time.time()
            seconds = cuda_time(lambda: runner.execute(b), iters=10)
            rec.add({"part": "time", "model": name, "round": r, "ms_per_step": round(seconds * 1e3, 3),
                     **clock.window(t0, time.time())})
    clock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
