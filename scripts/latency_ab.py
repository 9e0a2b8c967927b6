"""Before/after measurements of the engine's small-batch fast paths on one GPU, in one run.

    python scripts/latency_ab.py --out OUT [--preset dit-10l]

1. ``gemm``: each of the block's four GEMM shapes at several token-row counts, plain (cuBLAS through F.linear)
   against split-K (``split_k_linear``) with 2, 4 and 8 chunks; each timed as a CUDA graph of 20 calls, so launch
   gaps do not count.
2. ``latency``: one image, 50 DDIM steps, guidance 4.0 (two rows), through the compiled, graph-captured engine,
   for each variant of (fused adaLN, split-K chunks); also the largest difference of the final latent from the
   baseline variant's, same seed.
3. ``forward``: per-step throughput at batch 16, 64 and 256 for the baseline and the chosen variant, to show the
   large batches do not lose.
4. ``graphs``: per bucket of ``--graph-buckets``, for each of ``--variants``: the step replayed as a CUDA graph
   against the same compiled step launched kernel by kernel, each with the GPU time summed over its kernels.
5. ``profile``: GPU time per kernel of one step (torch.profiler) at ``--profile-bucket`` rows (2 by default), for
   the baseline and the chosen variant, or ``--profile-variants``.

The steps that parts 3-5 time compute on dit-bench's random inputs (``--state zeros``: every slot the same image,
as before session 6). Without a GPU only ``--parts latency`` runs (``--preset dit-tiny``: a smoke run of its plumbing, in fp32).

Every row goes to ``OUT/latency_ab.jsonl`` as soon as it is measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_runtime.cli.bench import (Recorder, _bench_info, cuda_time, fill_rows, inputs, kernel_time,  # noqa: E402
                                   matmul_peak, random_dit)
from dit_runtime.cli.gpu_clock import GpuClock  # noqa: E402
from dit_runtime.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from dit_runtime.engine.runner import ModelRunner  # noqa: E402
from dit_runtime.model import get_preset, split_k_linear  # noqa: E402
from dit_runtime.sizing import forward_flops  # noqa: E402

BASELINE = {"fused_adaln": False, "split_k": 1, "split_k_max_rows": 0}


def model_for(preset: str):
    """dit-bench's random model, with the output layer drawn too, so the final latents differ between variants."""
    return random_dit(preset, torch.float16 if torch.cuda.is_available() else torch.float32, random_final_layer=True)


def graph_time(fn, calls: int = 20) -> float:
    """Seconds per call of ``fn``, replaying a CUDA graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time(graph.replay, iters=20) / calls


def bench_gemm(rec: Recorder, cfg, rows_list: list[int]) -> None:
    d, ffn = cfg.hidden_dim, cfg.ffn_dim
    shapes = {"qkv": (3 * d, d), "proj": (d, d), "fc1": (ffn, d), "fc2": (d, ffn)}
    for rows in rows_list:
        for name, (n, k) in shapes.items():
            layer = torch.nn.Linear(k, n, device="cuda", dtype=torch.float16)
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            row = {"part": "gemm", "shape": name, "rows": rows, "n": n, "k": k}
            with torch.inference_mode():
                plain = graph_time(lambda: F.linear(x, layer.weight, layer.bias))
                row["plain_us"] = round(plain * 1e6, 2)
                for s in (2, 4, 8):
                    row[f"split{s}_us"] = round(graph_time(lambda: split_k_linear(x, layer, s)) * 1e6, 2)
            row["tflops_plain"] = round(2 * rows * n * k / plain / 1e12, 1)
            rec.add(row)


def make_config(variant: dict, max_batch: int, buckets=None) -> EngineConfig:
    """The engine config of a variant; a variant's own ``batch_buckets`` (e.g. ``[2]``: compile only the guided
    one-image bucket, half the start-up of a slow compile option) wins over ``buckets``."""
    variant = dict(variant)
    buckets = variant.pop("batch_buckets", buckets)
    if not torch.cuda.is_available():  # a smoke run of the script's plumbing on a CPU machine (--preset dit-tiny)
        return EngineConfig(device="cpu", max_batch_size=max_batch, batch_buckets=buckets, **variant)
    return EngineConfig(device="cuda", dtype="float16", max_batch_size=max_batch, batch_buckets=buckets,
                        compile=True, cuda_graphs=True, **variant)


def bench_latency(rec: Recorder, preset: str, variants: list[dict], steps: int = 50) -> None:
    reference = None
    for variant in variants:
        try:
            start = time.perf_counter()
            engine = Engine(model_for(preset), _bench_info(preset), make_config(variant, 2)).start()
            startup = time.perf_counter() - start
            request = GenerationRequest(class_labels=[1], num_images=1, seed=0, num_inference_steps=steps,
                                        sampler="ddim", guidance_scale=4.0)
            for _ in range(3):
                engine.submit(request).result(timeout=60)
            times, image = [], None
            for _ in range(10):
                t0 = time.perf_counter()
                image = engine.submit(request).result(timeout=60)
                times.append(time.perf_counter() - t0)
            latent = torch.as_tensor(image.latents if image.latents is not None else image.images).float()
            diff = None
            if reference is None:
                reference = latent
            else:
                diff = round(((latent - reference).abs().max() / reference.abs().max()).item(), 6)
            rec.add({"part": "latency", "model": preset, **variant, "steps": steps,
                     "ms_median": round(statistics.median(times) * 1e3, 2), "ms_min": round(min(times) * 1e3, 2),
                     "max_rel_diff_vs_baseline": diff, "startup_s": round(startup, 1)})
            engine.stop()
        except Exception as e:  # one variant failing must not lose the others
            rec.add({"part": "latency", "model": preset, **variant, "error": repr(e)[:500]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# What the timed steps compute on: dit-bench's random inputs (the default since session 6), or "zeros" (every
# slot the same image, as runs 5-19 had it; see docs/benchmarks.md, runs 17-19).
STATE = "inputs"
CLOCK: GpuClock | None = None  # main() starts one: the SM clock beside each timing of the graphs part


def fill(runner: ModelRunner, preset: str, rows: int) -> None:
    fill_rows(runner, rows, inputs(preset, rows, torch.float16) if STATE == "inputs" else None)


def runner_for(preset: str, variant: dict, batches: list[int]) -> ModelRunner:
    runner = ModelRunner(model_for(preset), make_config(variant, max(batches), tuple(batches)),
                         clip_denoised=False)
    runner.warm_up()
    runner.layout.zero_()
    fill(runner, preset, max(batches))
    return runner


def bench_forward(rec: Recorder, preset: str, variants: list[dict], batches: list[int], peak: float) -> None:
    flops = forward_flops(get_preset(preset))["total"]
    for variant in variants:
        try:
            runner = runner_for(preset, variant, batches)
            for b in batches:
                seconds = cuda_time(lambda: runner.execute(b), iters=max(5, min(100, int(2000 / b))))
                rec.add({"part": "forward", "model": preset, **variant, "batch": b,
                         "ms_per_step": round(seconds * 1e3, 3), "image_steps_per_s": round(b / seconds, 1),
                         "mfu": round(b / seconds * flops / peak, 4)})
            runner = None  # free its buffers and graphs before the next variant
        except Exception as e:
            rec.add({"part": "forward", "model": preset, **variant, "error": repr(e)[:500]})
        torch.cuda.empty_cache()


def profile_step(rec: Recorder, preset: str, variant: dict, bucket: int = 2) -> None:
    from torch.profiler import ProfilerActivity, profile

    try:
        runner = runner_for(preset, variant, [bucket])
        runner._graphs.clear()  # profile the compiled step itself: kernels are named, not one graph launch
        with torch.inference_mode():
            for _ in range(5):
                runner.execute(bucket)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    runner.execute(bucket)
                torch.cuda.synchronize()
        per_kernel = collections.defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name][0] += event.device_time / 10
                per_kernel[event.name][1] += 1 / 10
        total = sum(t for t, _ in per_kernel.values())
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
        rec.add({"part": "profile", "model": preset, **variant, "bucket": bucket,
                 "kernel_us_per_step": round(total, 1), "kernels_per_step": round(sum(n for _, n in per_kernel.values())),
                 "top": [{"kernel": name[:120], "us": round(t, 1), "calls": round(n)} for name, (t, n) in top]})
    except Exception as e:
        rec.add({"part": "profile", "model": preset, **variant, "error": repr(e)[:500]})


def bench_graphs(rec: Recorder, preset: str, variants: list[dict], buckets: list[int], peak: float) -> None:
    """Per bucket, in one process: the step replayed as its CUDA graph against the same compiled step launched
    kernel by kernel, and the GPU time the profiler sums over each one's kernels (the gap is idle time)."""
    flops = forward_flops(get_preset(preset))["total"]
    for variant in variants:
        try:
            runner = runner_for(preset, variant, buckets)
            graphs = dict(runner._graphs)
            for b in buckets:
                fill(runner, preset, b)
                row = {"part": "graphs", "model": preset, **variant, "bucket": b}
                with torch.inference_mode():
                    for mode in ("graph", "launched"):
                        runner._graphs = graphs if mode == "graph" else {}
                        call = lambda: runner.execute(b)  # noqa: E731
                        t0 = time.time()
                        seconds = cuda_time(call, iters=max(10, min(100, int(2000 / b))))
                        seen = CLOCK.window(t0, time.time()) if CLOCK else {}
                        row.update({f"{mode}_{k}": v for k, v in seen.items()})
                        kernels, count, top = kernel_time(call)
                        row.update({f"{mode}_ms": round(seconds * 1e3, 3), f"{mode}_kernel_ms": round(kernels / 1e3, 3),
                                    f"{mode}_kernels": count, f"{mode}_mfu": round(b / seconds * flops / peak, 4),
                                    f"{mode}_top": top})
                rec.add(row)
            runner = graphs = None  # free the buffers and graphs before the next variant
        except Exception as e:
            rec.add({"part": "graphs", "model": preset, **variant, "error": repr(e)[:500]})
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="dit-10l")
    parser.add_argument("--parts", nargs="+", default=["gemm", "latency", "forward", "profile"],
                        choices=["gemm", "latency", "forward", "graphs", "profile"])
    parser.add_argument("--variants", default='[{}, {"fused_adaln": true}, {"split_k": 4, "split_k_max_rows": 1024}, '
                        '{"fused_adaln": true, "split_k": 4, "split_k_max_rows": 1024}, '
                        '{"fused_adaln": true, "split_k": 2, "split_k_max_rows": 1024}, '
                        '{"fused_adaln": true, "split_k": 8, "split_k_max_rows": 1024}]',
                        help="JSON list of EngineConfig overrides on top of the baseline (all fast paths off)")
    parser.add_argument("--chosen", default='{"fused_adaln": true, "split_k": 4, "split_k_max_rows": 512}',
                        help="the variant the forward and profile parts compare with the baseline (the defaults)")
    parser.add_argument("--profile-variants", default=None,
                        help="JSON list of the variants to profile (default: the baseline and --chosen)")
    parser.add_argument("--profile-bucket", type=int, default=2, help="the forward's rows in the profile part")
    parser.add_argument("--state", choices=["inputs", "zeros"], default="inputs",
                        help="what the timed steps of forward/graphs/profile compute on: dit-bench's random inputs, "
                             "or zeros (every slot the same image, as before session 6)")
    parser.add_argument("--graph-buckets", type=int, nargs="+", default=[2, 64, 256],
                        help="the buckets the graphs part compares, for each of --variants")
    parser.add_argument("--tf32", action="store_true",
                        help="set torch.backends.cuda.matmul.allow_tf32 as dit-bench does (an A/B of the two "
                             "processes)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    global STATE, CLOCK
    STATE = args.state
    args.out.mkdir(parents=True, exist_ok=True)
    CLOCK = GpuClock(args.out / "smi.csv")  # the SM clock beside each timing of the graphs part
    variants = [{**BASELINE, **v} for v in json.loads(args.variants)]
    chosen = {**BASELINE, **json.loads(args.chosen)}
    if not torch.cuda.is_available() and set(args.parts) - {"latency"}:
        parser.error("without a CUDA GPU only --parts latency runs (the others time CUDA kernels)")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rec = Recorder(args.out, {"gpu": gpu, "torch": torch.__version__, "preset": args.preset}, name="latency_ab.jsonl")
    peak = matmul_peak() if torch.cuda.is_available() else None
    if peak is not None:
        rec.add({"part": "peak", "fp16_tflops": round(peak / 1e12, 1)})
    cfg = get_preset(args.preset)
    if "gemm" in args.parts:
        bench_gemm(rec, cfg, [256, 512, 1024, 2048, 4096])
    if "latency" in args.parts:
        bench_latency(rec, args.preset, variants)
    if "forward" in args.parts:
        bench_forward(rec, args.preset, [BASELINE, chosen], [16, 64, 256], peak)
    if "graphs" in args.parts:
        bench_graphs(rec, args.preset, variants, args.graph_buckets, peak)
    if "profile" in args.parts:
        profiled = [{**BASELINE, **v} for v in json.loads(args.profile_variants)] if args.profile_variants else \
            [BASELINE, chosen]
        for variant in profiled:
            profile_step(rec, args.preset, variant, args.profile_bucket)
    CLOCK.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
