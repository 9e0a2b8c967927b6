"""dit-bench: our engine against diffusers' DiT on one GPU, same dimensions, same inputs, one run.

Parts (all on by default):
  forward  per-step forward throughput (image-steps/s) and MFU at several batch sizes, for
           diffusers eager fp16 / diffusers + torch.compile / ours eager fp16 / ours compiled + CUDA graphs
  latency  one image, 50 steps, guidance 4.0 (a batch of 2 with the null half), end to end
  load     the engine under Poisson arrivals with mixed step counts: step-level vs request-level batching vs
           one request at a time (images/s, p50/p99 latency)

Setups: diffusers-eager, diffusers-compile, ours-eager, ours-compiled-graphs; the last takes suffixes that combine,
e.g. ours-compiled-graphs-dynamic-autotune:
  -nofuse    no bias + GELU epilogue in the fc1 GEMM
  -dynamic   one compiled program with a symbolic batch size (the default is one per batch size; -static names it)
  -autotune  inductor's max_autotune GEMM search (minutes per bucket)
  -zeros     the step's slots hold zeros instead of the diffusers setups' random inputs (dit-bench before session 6)
  -randfinal the model's final layer is drawn at random too, as in scripts/latency_ab.py (it predicts zeros otherwise)

The forward part builds every setup first, then times them in turn, ``--rounds`` times over per batch size, so a
clock that drifts during the run weighs on each alike. nvidia-smi samples the SM clock, power and the driver's
clock-event reasons every 50 ms beside the run (``OUT/smi.csv``); each timed row carries what it ran at.

Every result row is appended to ``OUT/bench.jsonl`` the moment it is measured, so a run cut short keeps what it
measured. At the end: ``OUT/bench.json``, ``OUT/load.png`` (latency vs load) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from ..diffusion import DDIM
from ..model import DiTModel, get_preset
from ..sizing import forward_flops
from .gpu_clock import GpuClock

DIFFUSERS_NAMES = ("diffusers-eager", "diffusers-compile", "ours-eager", "ours-compiled-graphs")


class Recorder:
    """Appends each result row to a JSONL file as soon as it exists, and keeps them for the summary."""

    def __init__(self, out: Path, meta: dict, name: str = "bench.jsonl"):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / name
        self.rows: list[dict] = []
        self.meta = meta
        self.add({"part": "meta", **meta})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` over ``iters`` calls, timed with CUDA events after a warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def kernel_time(fn, steps: int = 10) -> tuple[float, int, list[dict]]:
    """GPU time per call of ``fn`` summed over the kernels the profiler saw, kernels per call, and the top ones."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name][0] += event.device_time / steps
            per_kernel[event.name][1] += 1 / steps
    total = sum(t for t, _ in per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:8]
    return total, round(sum(n for _, n in per_kernel.values())), [
        {"kernel": name[:90], "us": round(t, 1), "calls": round(n)} for name, (t, n) in top]


def matmul_peak(dtype=torch.float16, n: int = 8192) -> float:
    """Measured dense matmul rate of this GPU (FLOP/s), the MFU denominator."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    seconds = cuda_time(lambda: a @ b, iters=10)
    return 2 * n ** 3 / seconds


def fill_rows(runner, rows: int, inputs: tuple | None = None) -> None:
    """Lay out ``rows`` images in slots 0..rows-1, one row each, that never finish: every step does real work.

    ``inputs`` (x, t, y), as ``inputs()`` draws them for the diffusers setups, become the slots' latents, timesteps
    and labels, so both models run on the same data (without it the slots hold zeros at timestep 999, label 0).

    With a million steps a row stays at its timestep for a thousand steps, so each step's "previous" timestep is
    its own. The rows sample with DDIM at eta 0, where such a step gives back the same latent whatever the model
    predicts: the data stay the inputs. (Before session 7 they used DDPM, whose learned-variance term is infinite
    there as soon as the model predicts a variance value below -1: the latents turned to NaN within steps, and a
    GPU under its power cap clocks higher on NaN data; docs/benchmarks.md, runs 21-26.)"""
    for i in (0, 1, 3, 4):  # image_slot, row_image, cond_row, uncond_row
        runner.layout[i, :rows] = torch.arange(rows)
    steps = 10 ** 6
    runner.num_steps.fill_(steps)
    runner.sampler[:rows] = DDIM
    runner.eta[:rows] = 0.0
    if inputs is not None:
        x, t, y = inputs
        runner.x[:rows] = x.float()
        runner.layout[2, :rows] = y  # row_label
        # trailing spacing: step i of S is timestep round(T - i T / S) - 1, so t needs i = (T - 1 - t) S / T
        T = runner.schedule.num_timesteps
        runner.step_index[:rows] = (T - 1 - t.to(torch.int64)) * (steps // T)


def random_dit(preset: str, dtype, random_final_layer: bool = False) -> DiTModel:
    """A DiT at ``preset``'s dimensions with random blocks. Its final layer keeps adaLN-Zero's zeros (the model
    predicts zeros), unless ``random_final_layer``: then it is drawn too, as latency_ab.py's model has it."""
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU: smoke runs only
        model = DiTModel.from_config(get_preset(preset))
    for block in model.blocks:  # adaLN-Zero init is the identity; make every block do real work
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    if random_final_layer:
        gen = torch.Generator(device=model.pos_embed.device).manual_seed(1)
        with torch.no_grad():
            for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, device=layer.weight.device) * 0.02)
    return model.to(dtype).eval().requires_grad_(False)


def diffusers_dit(preset: str, dtype):
    """diffusers' DiTTransformer2DModel at the same dimensions (FFN is 4 x hidden there, as in our presets)."""
    from diffusers import DiTTransformer2DModel

    cfg = get_preset(preset)
    if cfg.ffn_dim != 4 * cfg.hidden_dim:
        raise ValueError(f"{preset}: diffusers' DiT fixes FFN at 4 x hidden")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_dim // cfg.num_heads,
                                  in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
                                  sample_size=cfg.input_size, patch_size=cfg.patch_size,
                                  num_embeds_ada_norm=cfg.num_classes, norm_eps=1e-6)
    return model.to("cuda", dtype).eval().requires_grad_(False)


def inputs(preset: str, batch: int, dtype):
    cfg = get_preset(preset)
    g = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda", dtype=dtype, generator=g)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda", generator=g)
    return x, t, y


# ---- part 1: forward throughput -------------------------------------------------------------------------------
def build_setup(rec: Recorder, preset: str, setup: str, batches: list[int]):
    """``make(batch)`` for one setup: a call that runs one forward step of that setup at that batch size."""
    from ..engine.runner import ModelRunner
    from ..engine.types import EngineConfig

    dtype = torch.float16
    if setup.startswith("diffusers"):
        model = diffusers_dit(preset, dtype)
        fn = torch.compile(model) if setup == "diffusers-compile" else model
        return lambda b: (lambda x=inputs(preset, b, dtype): fn(*x, return_dict=False))
    if setup == "ours-eager":
        model = random_dit(preset, dtype)
        return lambda b: (lambda x=inputs(preset, b, dtype): model(*x))
    # ours-compiled-graphs[-nofuse][-dynamic][-autotune][-zeros][-randfinal]: the engine's step (model + guidance +
    # sampler), graphed. -dynamic: one program with a symbolic batch size instead of one per batch size.
    flags = setup.split("-")[3:]
    # -autotune: inductor's max_autotune, which times Triton GEMM templates (with fused epilogues) against cuBLAS
    # per shape at compile time: minutes per bucket.
    options = {"max_autotune": True} if "autotune" in flags else None
    config = EngineConfig(device="cuda", dtype="float16", max_batch_size=max(batches), batch_buckets=tuple(batches),
                          compile=True, cuda_graphs=True, fused_mlp_epilogue="nofuse" not in flags,
                          compile_dynamic="dynamic" in flags, compile_options=options)
    start = time.perf_counter()
    runner = ModelRunner(random_dit(preset, dtype, random_final_layer="randfinal" in flags), config,
                         clip_denoised=False)
    per_bucket = runner.warm_up()
    rec.add({"part": "compile", "model": preset, "setup": setup, "buckets": list(config.buckets),
             "seconds": round(time.perf_counter() - start, 1),
             "per_bucket_s": {b: round(t, 1) for b, t in per_bucket.items()}})
    runner.layout.zero_()

    def make(b, zeros="zeros" in flags):
        fill_rows(runner, b, None if zeros else inputs(preset, b, dtype))
        call = lambda: runner.execute(b)  # noqa: E731
        call.latents = runner.x[:b]  # the rows' state, to check after timing that it stayed finite
        return call
    return make


def bench_forward(rec: Recorder, preset: str, batches: list[int], setups: list[str], peak: float,
                  profile_kernels: bool = False, rounds: int = 3, clock: GpuClock | None = None) -> None:
    """Every setup is built (compiled, warmed up) first; then, batch size by batch size, the setups are timed in
    turn, ``rounds`` times over (A B A B ...), so a clock that drifts during the run (power, heat) weighs on
    each setup alike. A setup's figure is the median over its rounds; each round is also a row of its own, with
    the SM clock it ran at when ``clock`` samples one."""
    flops = forward_flops(get_preset(preset))["total"]
    built = {}
    for setup in setups:
        try:
            built[setup] = build_setup(rec, preset, setup, batches)
        except Exception as e:  # one setup failing must not lose the others
            rec.add({"part": "forward", "model": preset, "setup": setup, "error": repr(e)[:500]})
    for b in batches:
        calls, per_round, clocks = {}, collections.defaultdict(list), collections.defaultdict(list)
        for setup, make in built.items():
            try:
                calls[setup] = make(b)
            except Exception as e:
                rec.add({"part": "forward", "model": preset, "setup": setup, "batch": b, "error": repr(e)[:500]})
        iters = max(5, min(100, int(2000 / b)))
        for r in range(rounds):
            for setup, call in list(calls.items()):
                try:
                    t0 = time.time()
                    seconds = cuda_time(call, iters=iters)
                    seen = clock.window(t0, time.time()) if clock else {}
                    per_round[setup].append(seconds)
                    if "sm_mhz_median" in seen:
                        clocks[setup].append(seen["sm_mhz_median"])
                    rec.add({"part": "forward-round", "model": preset, "setup": setup, "batch": b, "round": r,
                             "ms_per_step": round(seconds * 1e3, 3), **seen})
                except Exception as e:
                    rec.add({"part": "forward", "model": preset, "setup": setup, "batch": b, "error": repr(e)[:500]})
                    del calls[setup]
        for setup, call in calls.items():
            seconds = statistics.median(per_round[setup])
            rate = b / seconds
            row = {"part": "forward", "model": preset, "setup": setup, "batch": b, "rounds": len(per_round[setup]),
                   "ms_per_step": round(seconds * 1e3, 3), "ms_per_step_min": round(min(per_round[setup]) * 1e3, 3),
                   "image_steps_per_s": round(rate, 1), "mfu": round(rate * flops / peak, 4)}
            if hasattr(call, "latents"):  # NaN data draw less power, and a power-capped GPU then clocks higher
                row["finite_latent_rows"] = torch.isfinite(call.latents).flatten(1).all(1).float().mean().item()
            if clocks[setup]:  # the SM clock the rounds ran at (median of their medians)
                row["sm_mhz_median"] = statistics.median(clocks[setup])
            if profile_kernels:  # the GPU time its kernels take, summed by the profiler (the rest is idle)
                kernels, count, top = kernel_time(call)
                row.update({"kernel_ms_per_step": round(kernels / 1e3, 3), "kernels_per_step": count,
                            "top_kernels": top[:4]})
            rec.add(row)
    built = calls = None
    torch.cuda.empty_cache()


# ---- part 2: single-image latency -----------------------------------------------------------------------------
def bench_latency(rec: Recorder, preset: str, setups: list[str], steps: int = 50, guidance: float = 4.0,
                  clock: GpuClock | None = None) -> None:
    from ..engine import Engine, EngineConfig, GenerationRequest

    dtype = torch.float16
    cfg = get_preset(preset)
    for setup in setups:
        try:
            if setup.startswith("diffusers"):
                from diffusers import DDIMScheduler

                model = diffusers_dit(preset, dtype)
                fn = torch.compile(model, mode="reduce-overhead") if setup == "diffusers-compile" else model
                sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
                sched.set_timesteps(steps)
                y = torch.tensor([1, cfg.null_class], device="cuda")

                def one_image():
                    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda", dtype=dtype)
                    for t in sched.timesteps:
                        out = fn(torch.cat([x, x]), t.expand(2).to("cuda"), y, return_dict=False)[0]
                        eps_c, eps_u = out[:, :cfg.in_channels].chunk(2)
                        eps = eps_u + guidance * (eps_c - eps_u)
                        x = sched.step(eps, t, x).prev_sample
                    torch.cuda.synchronize()
            else:
                compiled = setup != "ours-eager"
                config = EngineConfig(device="cuda", dtype="float16", max_batch_size=2, compile=compiled,
                                      cuda_graphs=compiled, compile_dynamic="dynamic" in setup.split("-")[3:])
                engine = Engine(random_dit(preset, dtype), _bench_info(preset), config).start()

                def one_image():
                    engine.submit(GenerationRequest(class_labels=[1], num_images=1, seed=0, num_inference_steps=steps,
                                                    sampler="ddim", guidance_scale=guidance)).result(timeout=60)
            for _ in range(3):
                one_image()
            times, t0 = [], time.time()
            for _ in range(10):
                start = time.perf_counter()
                one_image()
                times.append(time.perf_counter() - start)
            rec.add({"part": "latency", "model": preset, "setup": setup, "steps": steps, "guidance": guidance,
                     "ms_median": round(statistics.median(times) * 1e3, 2), "ms_min": round(min(times) * 1e3, 2),
                     **(clock.window(t0, time.time()) if clock else {})})
            if not setup.startswith("diffusers"):
                engine.stop()
        except Exception as e:
            rec.add({"part": "latency", "model": preset, "setup": setup, "error": repr(e)[:500]})
        torch.cuda.empty_cache()


def _bench_info(preset: str):
    from ..checkpoint import CheckpointInfo, default_class_names

    cfg = get_preset(preset)
    return CheckpointInfo(config=cfg, class_names=default_class_names(cfg.num_classes), space="latent")


# ---- part 3: the engine under load ----------------------------------------------------------------------------
def bench_load(rec: Recorder, preset: str, rates: list[float], duration: float, max_batch: int,
               policies: list[str], buckets: tuple[int, ...] | None = None) -> None:
    from ..engine import Engine, EngineConfig, GenerationRequest, QueueFullError

    model = random_dit(preset, torch.float16)
    config = EngineConfig(device="cuda", dtype="float16", max_batch_size=max_batch, compile=True, cuda_graphs=True,
                          max_queue_size=4096, batch_buckets=buckets)
    start = time.perf_counter()
    engine = Engine(model, _bench_info(preset), config).start()
    rec.add({"part": "compile", "model": preset, "setup": "engine", "buckets": list(config.buckets),
             "seconds": round(time.perf_counter() - start, 1),
             "per_bucket_s": {b: round(t, 1) for b, t in engine.warmup_seconds.items()}})
    for policy in policies:
        # The same compiled engine for every policy; the scheduler's policy is switched while the engine is idle.
        engine.scheduler.batching = policy
        for rate in rates:
            rng = random.Random(int(rate * 1000))
            handles, rejected = [], 0
            t0 = time.monotonic()
            next_at = t0
            while next_at - t0 < duration:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                request = GenerationRequest(class_labels=[rng.randrange(1000)], num_images=1, seed=rng.randrange(2 ** 31),
                                            num_inference_steps=rng.choice([20, 50]), sampler="ddim", guidance_scale=4.0)
                try:
                    handles.append((time.monotonic(), engine.submit(request)))
                except QueueFullError:
                    rejected += 1
                next_at += rng.expovariate(rate)
            results = [h.result(timeout=600) for _, h in handles]
            # Throughput over the whole run: from the first arrival to the last completion.
            end = max(submitted + r.total_seconds for (submitted, _), r in zip(handles, results))
            lat = sorted(r.total_seconds for r in results)
            rec.add({"part": "load", "model": preset, "policy": policy, "rate": rate, "requests": len(results),
                     "rejected": rejected, "images_per_s": round(len(results) / (end - t0), 2),
                     "p50_s": round(_pct(lat, 50), 4), "p99_s": round(_pct(lat, 99), 4),
                     "mean_queue_s": round(statistics.mean(r.queue_seconds for r in results), 4)})
    engine.stop()
    del model
    torch.cuda.empty_cache()


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def plot_load(rows: list[dict], path: Path) -> None:
    """p99 latency against offered load, one line per batching policy, drawn with Pillow."""
    from ..plot import line_plot

    series = {}
    for r in rows:
        if r.get("part") == "load" and "p99_s" in r:
            series.setdefault(f"{r['model']} {r['policy']}", []).append((r["rate"], r["p99_s"]))
    if series:
        line_plot(series, path, title="p99 latency vs offered load", xlabel="requests/s", ylabel="p99 latency (s)",
                  log_y=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit-10l", "dit-legacy-30l"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--setups", nargs="+", default=list(DIFFUSERS_NAMES) + ["ours-compiled-graphs-nofuse"])
    p.add_argument("--parts", nargs="+", default=["forward", "latency", "load"], choices=["forward", "latency", "load"])
    p.add_argument("--rates", nargs="+", type=float, default=[20, 40, 80, 120])
    p.add_argument("--load-seconds", type=float, default=6.0)
    p.add_argument("--load-max-batch", type=int, default=256)
    p.add_argument("--load-buckets", nargs="+", type=int, default=[4, 16, 64, 128, 256])
    p.add_argument("--load-models", nargs="+", default=["dit-10l"])
    p.add_argument("--policies", nargs="+", default=["step", "request", "single"])
    p.add_argument("--rounds", type=int, default=3,
                   help="forward: time the setups in turn this many times over, per batch size (median of rounds)")
    p.add_argument("--profile-kernels", action="store_true",
                   help="forward: also sum each setup's kernel times with torch.profiler (GPU time against idle)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("dit-bench needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    peak = matmul_peak()
    out.mkdir(parents=True, exist_ok=True)
    clock = GpuClock(out / "smi.csv")  # the SM clock beside every timing (a no-op without nvidia-smi)
    rec = Recorder(out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "python": platform.python_version(), "fp16_matmul_peak_tflops": round(peak / 1e12, 1),
                         "command": "dit-bench " + " ".join(argv if argv is not None else sys.argv[1:])})
    for preset in args.models:
        if "forward" in args.parts:
            bench_forward(rec, preset, args.batches, args.setups, peak, args.profile_kernels, args.rounds, clock)
        if "latency" in args.parts:
            bench_latency(rec, preset, [s for s in args.setups if not s.endswith("-nofuse")], clock=clock)
    if "load" in args.parts:
        for preset in args.load_models:
            bench_load(rec, preset, args.rates, args.load_seconds, args.load_max_batch, args.policies,
                       tuple(args.load_buckets))
    clock.close()
    (out / "bench.json").write_text(json.dumps(rec.rows, indent=1))
    try:
        plot_load(rec.rows, out / "load.png")
    except Exception as e:  # the numbers matter more than the picture
        print(f"plot failed: {e!r}", file=sys.stderr)
    print(summary_table(rec.rows))
    return 0


def summary_table(rows: list[dict]) -> str:
    lines = ["| model | setup | batch | ms/step | image-steps/s | MFU |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("part") == "forward" and "mfu" in r:
            lines.append(f"| {r['model']} | {r['setup']} | {r['batch']} | {r['ms_per_step']} | "
                         f"{r['image_steps_per_s']:,} | {r['mfu']:.1%} |")
    lines += ["", "| model | setup | one image, 50 steps, guided (ms, median) |", "| --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['setup']} | {r['ms_median']} |" for r in rows
              if r.get("part") == "latency" and "ms_median" in r]
    lines += ["", "| model | batching | offered req/s | images/s | p50 s | p99 s | rejected |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['policy']} | {r['rate']} | {r['images_per_s']} | {r['p50_s']} | {r['p99_s']} | "
              f"{r['rejected']} |" for r in rows if r.get("part") == "load"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
