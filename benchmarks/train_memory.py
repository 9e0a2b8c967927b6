"""Measure training memory and throughput on a GPU next to ``dit-verify``'s estimate.

For each preset x per-device batch x gradient checkpointing (off/on): a few real training steps (bf16 autocast over
fp32 weights, the hybrid MSE + VB loss, AdamW, fp32 EMA update), then ``torch.cuda.max_memory_allocated`` and
samples/s. One JSON line per configuration is appended to ``$OUT/train_mem.jsonl`` as soon as it is measured.
Needs only torch (runs from a checkout; no install):

    python -m benchmarks train-memory                          # dit-10l, dit-8l at 8/16/32, ckpt off/on
    python -m benchmarks train-memory --presets dit-tiny --batch-sizes 2 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from dit_runtime.diffusion import NoiseSchedule, q_sample, training_losses
from dit_runtime.model import DiTModel, get_preset
from dit_runtime.sizing import TrainingSetup, training_memory

EMA_DECAY = 0.9999
GIB = 2**30


def measure(preset: str, batch_size: int, checkpointing: bool, steps: int, warmup: int, device: torch.device) -> dict:
    """Train ``warmup + steps`` steps on random latents; peak memory covers the whole run, throughput the last steps."""
    config = get_preset(preset)
    cuda = device.type == "cuda"
    gc.collect()  # the previous configuration's tensors are gone before the peak counter restarts
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with device:  # initialise on the device: fast, and no CPU copy
        model = DiTModel.from_config(config).train()
    model.gradient_checkpointing = checkpointing
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    schedule = NoiseSchedule.linear(device=device)
    shape = (batch_size, config.in_channels, config.input_size, config.input_size)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU smoke runs stay in fp32

    def step() -> torch.Tensor:
        x0 = torch.randn(shape, device=device)
        y = torch.randint(0, config.num_classes, (batch_size,), device=device)
        t = torch.randint(0, schedule.num_timesteps, (batch_size,), device=device)
        noise = torch.randn(shape, device=device)
        x_t = q_sample(schedule, x0, t, noise)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            out = model(x_t, t, y)
        loss = training_losses(schedule, out, x0, x_t, t, noise, config.learn_sigma)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - EMA_DECAY)
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)  # one host sync, after the timed loop's work is queued
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    estimate = training_memory(config, TrainingSetup(batch_size, checkpointing))
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    record = {
        "preset": preset, "batch_size_per_gpu": batch_size, "gradient_checkpointing": checkpointing,
        "precision": "bf16 autocast" if cuda else "fp32", "steps_timed": steps,
        "samples_per_s": round(steps * batch_size / seconds, 2), "step_ms": round(1000 * seconds / steps, 2),
        "measured_peak_bytes": peak, "estimated_peak_bytes": estimate["peak"],
        "estimate_over_measured": round(estimate["peak"] / peak, 3) if peak else None,
        "final_loss": round(final_loss, 4),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["dit-10l", "dit-8l"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (AdamW allocates its state)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("train-memory: no CUDA device; pass --device cpu for a smoke run")
    torch.backends.cuda.matmul.allow_tf32 = True
    out_path = Path(os.environ.get("OUT", ".")) / "train_mem.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    rows = []
    started = time.perf_counter()
    with out_path.open("a") as out:
        for preset in args.presets:
            for batch_size in args.batch_sizes:
                for checkpointing in (False, True):
                    try:
                        record = measure(preset, batch_size, checkpointing, args.steps, args.warmup, device)
                    except torch.cuda.OutOfMemoryError as e:
                        record = {"preset": preset, "batch_size_per_gpu": batch_size,
                                  "gradient_checkpointing": checkpointing, "error": f"out of memory: {e}"[:300]}
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    rows.append(record)
                    print(f"[{time.perf_counter() - started:6.1f} s] {json.dumps(record)}", flush=True)

    print(f"\n{'preset':<10} {'batch':>5} {'ckpt':>5} {'measured GiB':>12} {'estimate GiB':>12} {'est/meas':>8} "
          f"{'samples/s':>10} {'step ms':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<10} {r['batch_size_per_gpu']:>5} {str(r['gradient_checkpointing']):>5}  "
                  f"{r['error'][:60]}")
            continue
        measured = f"{r['measured_peak_bytes'] / GIB:.2f}" if r["measured_peak_bytes"] else "-"
        print(f"{r['preset']:<10} {r['batch_size_per_gpu']:>5} {str(r['gradient_checkpointing']):>5} {measured:>12} "
              f"{r['estimated_peak_bytes'] / GIB:>12.2f} {str(r['estimate_over_measured'] or '-'):>8} "
              f"{r['samples_per_s']:>10} {r['step_ms']:>8}")
    print(f"\n{len(rows)} configurations in {time.perf_counter() - started:.0f} s -> {out_path}")
    return 0

