"""The engine on one GPU against diffusers' DiT at the same dimensions, on the same inputs, in one process.

    python -m benchmarks engine --models dit-10l --batches 64 256 --rounds 5 --setups ours diffusers-compile

Parts (``--parts``; forward, latency and load by default):
  forward   image-steps/s and MFU of one denoising step at each batch size
  latency   one guided image (a batch of 2 rows), 50 DDIM steps, end to end, at each ``--caches`` preset
  load      the engine under Poisson arrivals with mixed step counts: step-level vs request-level batching vs one
            request at a time, and each ``--load-caches`` mix of feature-cache presets ("half": every other
            request balanced, the rest off) (images/s, p50/p99 latency per preset, ``OUT/load.png``)
  accuracy  one forward's relative error against fp32 in fp16, bf16, fp8 and fp8 with fc1's block scales (fp8 at
            every size), on random non-zero weights
  decode-overlap
            a 4-step student with sd-vae-ft-ema's decoder under paced or Poisson requests: whether the decodes
            running beside the steps hold them up, and whether encoding the answers as a replica does
  students  a few-step student (the same model with a guidance embedding, random weights) beside its guided
            teacher: one guided image at each ``--student-steps`` count (one row a step) against the teacher's
            ``--teacher-steps`` DDIM steps (two rows), and images/s with a full batch of ``--batches``' largest
            rows (``--student-images`` images through each, all submitted at once); the student of each of the
            ``ours`` and ``baseline`` setups given (ours alone by default; ``ours-nosplitk``: without split-K), the
            teacher ours; and where a lone 4-step request's time goes, from a torch.profiler trace
            (``OUT/one-image-<setup>.trace.json.gz``), with the kernels that took the most GPU time

Setups (``--setups``):
  diffusers-eager, diffusers-compile   diffusers' DiTTransformer2DModel in fp16, eager or torch.compile'd; timed
                                       per forward with CUDA events on random inputs
  diffusers-compile-torchao-fp8        the same in bf16 with torchao's float8 (dynamic per-row activations, per-row
                                       weights) on the blocks' attention and MLP linears, compiled: the FP8 recipe
                                       a diffusers user can build today
  ours-eager                           our DiTModel's forward in fp16, eager, the same way
  ours[-fp8[-blocks]][-nofuse][-nocache][-dynamic][-autotune]
                                       the engine (fp16, compiled, CUDA graphs, the fast paths): a full batch of
                                       never-finishing requests, timed over its steady steps; -fp8 runs it in
                                       precision fp8 with per-row scales and a GELU pass (-blocks: fc1's output
                                       in 1x128 block scales from its own GEMM, fast_paths.fp8_blocks, the
                                       engine's default for fp8), -nofuse leaves out the GELU epilogue,
                                       -nocache keeps no feature cache (one step function instead of three),
                                       -dynamic compiles one program with a symbolic batch size, -autotune uses
                                       inductor's max_autotune GEMM search (minutes per bucket)
  baseline[-...]                       the same, for the dit_runtime of another checkout (``--baseline DIR``),
                                       imported under another name: two versions of the engine, side by side

Every setup is built (compiled, warmed up) first; then, batch size by batch size, the setups are timed in turn,
``--rounds`` times over, so a clock that drifts during the run (power, heat) weighs on each alike. nvidia-smi samples
the SM clock, power and the driver's clock-event reasons beside the run (``OUT/smi.csv``); each timed row carries
what it ran at. Each row is appended to ``OUT/bench.jsonl`` the moment it is measured; at the end ``OUT/bench.json``
and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from dit_runtime.engine import freeze_startup_heap
from dit_runtime.model import DiTModel, get_preset
from dit_runtime.sizing import forward_flops

from .baselines import POLICIES, use_policy
from .gpu_clock import GpuClock
from .stats import percentile

DEFAULT_SETUPS = ("diffusers-eager", "diffusers-compile", "ours-eager", "ours")
BASELINE_PACKAGE = "baseline_dit_runtime"


class Recorder:
    """Appends each result row to a JSONL file as soon as it exists, and keeps them for the summary."""

    def __init__(self, out: Path, meta: dict, name: str = "bench.jsonl"):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / name
        self.rows: list[dict] = []
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


# Kinds of GPU kernel by name, first match wins: where a step's time goes, whichever library named its kernels.
KERNEL_KINDS = (("ours (Triton)", r"^_(fp8_gemm|gelu_quant)"),
                ("GEMM (cuBLAS, CUTLASS)", r"gemm|xmma|nvjet|cutlass|scaled_mm"),
                ("attention", r"flash|fmha|attention|sdpa"),
                ("fused elementwise and reductions (inductor)", r"^triton_"),
                ("copies", r"memcpy|memset|copy"))


def kernel_kind(name: str, kinds: tuple[tuple[str, str], ...] = KERNEL_KINDS) -> str:
    """The kind (of ``kinds``) of a kernel, by its name; ``other`` when none matches."""
    return next((kind for kind, pattern in kinds if re.search(pattern, name, re.IGNORECASE)), "other")


@dataclasses.dataclass
class KernelTime:
    """One kernel name's GPU time over a profile, and how many launches it was: inductor gives one name to every
    call site of a kernel it generated once, so a name's time can be several layers'."""

    us: float = 0.0
    launches: int = 0


def kernel_times(run) -> dict[str, KernelTime]:
    """GPU time and launches per kernel name over one call of ``run``, from torch.profiler (the time the GPU was idle
    in between is in no kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(KernelTime)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name].us += event.device_time
            per_kernel[event.name].launches += 1
    return per_kernel


def kernels_by_kind(per_kernel: dict[str, KernelTime], count: int, unit: str, kinds=KERNEL_KINDS,
                    top: int = 8) -> dict:
    """``kernel_times``' microseconds over ``count`` units of work (steps, images) as milliseconds per ``unit``: in
    all (``kernel_ms_per_<unit>``), by kind, and the top kernels with their launches over the whole profile."""
    by_kind = collections.defaultdict(float)
    for name, t in per_kernel.items():
        by_kind[kernel_kind(name, kinds)] += t.us
    ms = lambda us: round(us / count / 1e3, 4)  # noqa: E731
    return {f"kernel_ms_per_{unit}": ms(sum(t.us for t in per_kernel.values())),
            "kernel_ms_by_kind": {kind: ms(us) for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"kernel": name[:90], f"ms_per_{unit}": ms(t.us), "launches": t.launches}
                            for name, t in sorted(per_kernel.items(), key=lambda kv: -kv[1].us)[:top]]}


def kernel_profile(timer: "EngineSteps", steps: int = 10) -> dict:
    """The GPU time of one engine step summed over the kernels the profiler saw (the rest of a step is the GPU
    idle), kernels per step, that time by kind of kernel, and the top kernels by time, over every step ``timer`` ran
    for ``steps`` timed ones."""
    per_kernel = kernel_times(lambda: timer(steps))
    return {"profiled_steps": timer.steps_run, **kernels_by_kind(per_kernel, timer.steps_run, "step")}


def matmul_peak(dtype=torch.float16, n: int = 8192) -> float:
    """Measured dense matmul rate of this GPU (FLOP/s), the MFU denominator."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n ** 3 / cuda_time(lambda: a @ b, iters=10)


def load_baseline(checkout: str):
    """``checkout``'s dit_runtime package, imported as ``baseline_dit_runtime`` (its imports are relative), so two
    versions of the engine run in one process."""
    package = Path(checkout) / "dit_runtime"
    spec = importlib.util.spec_from_file_location(BASELINE_PACKAGE, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def runtime(setup: str):
    """The dit_runtime package a setup runs: this one, or the baseline checkout's."""
    return sys.modules[BASELINE_PACKAGE] if setup.startswith("baseline") else sys.modules["dit_runtime"]


def engine_request(package, class_id: int, seed: int, steps: int, sampler: str, guidance: float,
                   cache: str = "off"):
    """One image's request in ``package``'s own API (a baseline from before GenerationRequest.of takes keywords;
    one from before feature caching takes no ``cache``)."""
    requests = importlib.import_module(package.__name__ + ".engine")
    if hasattr(requests.GenerationRequest, "of"):
        extra = {"cache": cache} if cache != "off" else {}
        return requests.GenerationRequest.of(class_id, seed=seed, num_inference_steps=steps, sampler=sampler,
                                             guidance_scale=guidance, **extra)
    return requests.GenerationRequest(class_labels=[class_id], num_images=1, seed=seed, num_inference_steps=steps,
                                      sampler=sampler, guidance_scale=guidance)


def engine_for(setup: str, preset: str, buckets: tuple[int, ...], max_queue: int = 0):
    """A started engine of ``setup`` (ours[-flags] or baseline[-flags]) over random weights of ``preset``."""
    package = runtime(setup)
    engine = importlib.import_module(package.__name__ + ".engine")
    flags = setup.split("-")[1:]
    options = {"max_autotune": True} if "autotune" in flags else None
    extra = {}
    if "nofuse" in flags or "fp8" in flags:
        fast = importlib.import_module(package.__name__ + ".engine.fast_paths")
        paths = {"gelu_epilogue": "nofuse" not in flags}
        if "fp8_blocks" in fast.FastPaths.__dataclass_fields__:  # a baseline from before it has no such field
            paths["fp8_blocks"] = "blocks" in flags
        extra["fast_paths"] = fast.FastPaths(**paths)
    if "nocache" in flags:
        extra["feature_cache_rows"] = 0
    if "precision" in engine.EngineConfig.__dataclass_fields__:
        extra["precision"] = "fp8" if "fp8" in flags else "fp16"
    else:  # a baseline from before precision took dtype's place
        extra["dtype"] = "float16"
    config = engine.EngineConfig(device="cuda", max_batch_size=max(buckets), batch_buckets=buckets,
                                 compile=True, cuda_graphs=True, compile_dynamic="dynamic" in flags,
                                 compile_options=options, max_queue_size=max(max_queue, 2 * max(buckets)), **extra)
    if hasattr(engine, "configure_compile"):  # a baseline from before it: its runner sets the process up itself
        engine.configure_compile(config)
    return engine.Engine.random_weights(preset, config).start()


class EngineSteps:
    """An engine's steady step time with ``rows`` never-finishing one-row requests: a full batch of real work
    (DDIM at 1000 steps moves every latent each step). Between timings the engine is left idle, so the setups timed
    in turn never share the GPU."""

    def __init__(self, setup: str, engine, rows: int):
        self.setup, self.engine, self.rows = setup, engine, rows
        self.steps_run = 0  # by the last call, warm-up steps included

    def __call__(self, steps: int) -> float:
        package, engine = runtime(self.setup), self.engine
        classes = engine.info.config.num_classes
        handles = [engine.submit(engine_request(package, i % classes, i, 1000, "ddim", 1.0), progress=False)
                   for i in range(self.rows)]
        start_steps = engine.stats().steps_done
        while engine.stats().steps_done < start_steps + 5:  # admitted, and the graphs replaying
            time.sleep(0.001)
        s0, t0 = engine.stats().steps_done, time.perf_counter()
        while engine.stats().steps_done < s0 + steps:
            time.sleep(0.0005)
        s1, t1 = engine.stats().steps_done, time.perf_counter()
        for h in handles:
            h.cancel()
        while engine.stats().running_requests or engine.stats().waiting_requests:
            time.sleep(0.001)
        self.steps_run = engine.stats().steps_done - start_steps
        return (t1 - t0) / (s1 - s0)


def random_dit(preset: str, dtype) -> DiTModel:
    """Our DiT at ``preset``'s dimensions with random blocks (adaLN-Zero's init would make them the identity)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiTModel.from_config(get_preset(preset))
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return model.to(dtype).eval().requires_grad_(False)


def diffusers_dit_arguments(preset: str) -> dict:
    """diffusers' DiTTransformer2DModel arguments at a preset's dimensions (FFN is 4 x hidden there, as in our
    presets; the null class is ``num_embeds_ada_norm``, the class count)."""
    cfg = get_preset(preset)
    if cfg.ffn_dim != 4 * cfg.hidden_dim:
        raise ValueError(f"{preset}: diffusers' DiT fixes FFN at 4 x hidden")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_dim // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
                sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
                norm_eps=1e-6)


def diffusers_dit(preset: str, dtype):
    """diffusers' DiTTransformer2DModel at the same dimensions, random weights, on the GPU."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**diffusers_dit_arguments(preset))
    return model.to("cuda", dtype).eval().requires_grad_(False)


def torchao_fp8(model):
    """torchao's float8 on the attention and MLP linears of diffusers' blocks (the adaLN and embedder linears stay
    16-bit, as ours do): dynamic per-row activation scales, per-row weight scales."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def blocks_linears(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.") and \
            (".attn1." in fqn or ".ff." in fqn)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=blocks_linears)
    return model


def inputs(preset: str, batch: int, dtype):
    cfg = get_preset(preset)
    g = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda", dtype=dtype, generator=g)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda", generator=g)
    return x, t, y


# ---- part 1: forward throughput -------------------------------------------------------------------------------
def build_setup(rec: Recorder, preset: str, setup: str, batches: list[int]):
    """``(make, engine)``: ``make(batch)`` is a timer, whose ``timer(iters)`` is the median seconds of one step of
    that setup at that batch; ``engine`` is the setup's started engine (None for a bare model), to stop at the end."""
    dtype = torch.bfloat16 if setup.endswith("fp8") else torch.float16
    if setup.startswith("diffusers") or setup == "ours-eager":
        model = diffusers_dit(preset, dtype) if setup.startswith("diffusers") else random_dit(preset, dtype)
        if setup.endswith("torchao-fp8"):
            model = torchao_fp8(model)
        fn = torch.compile(model) if setup.startswith("diffusers-compile") else model
        kwargs = {"return_dict": False} if setup.startswith("diffusers") else {}

        def make(b):
            x = inputs(preset, b, dtype)
            return lambda iters: cuda_time(lambda: fn(*x, **kwargs), iters=iters)
        return make, None
    start = time.perf_counter()
    engine = engine_for(setup, preset, tuple(batches))
    rec.add({"part": "compile", "model": preset, "setup": setup, "buckets": list(engine.config.buckets),
             "seconds": round(time.perf_counter() - start, 1),
             "per_bucket_s": {b: round(t, 1) for b, t in engine.warmup_seconds.items()}})
    return (lambda b: EngineSteps(setup, engine, b)), engine


def bench_forward(rec: Recorder, preset: str, batches: list[int], setups: list[str], peak: float, rounds: int,
                  clock: GpuClock | None, profile_kernels: bool = False) -> None:
    """Build every setup, then time them in turn at each batch size, ``rounds`` times over; a setup's figure is the
    median of its rounds, and each round is a row of its own with the SM clock it ran at."""
    flops = forward_flops(get_preset(preset))["total"]
    built, engines = {}, []
    for setup in setups:
        try:
            built[setup], engine = build_setup(rec, preset, setup, batches)
            engines += [engine] if engine is not None else []
        except Exception as e:  # one setup failing must not lose the others
            rec.add({"part": "forward", "model": preset, "setup": setup, "error": repr(e)[:500]})
    freeze_startup_heap()
    for b in batches:
        timers, per_round, clocks = {}, collections.defaultdict(list), collections.defaultdict(list)
        for setup, make in built.items():
            try:
                timers[setup] = make(b)
            except Exception as e:
                rec.add({"part": "forward", "model": preset, "setup": setup, "batch": b, "error": repr(e)[:500]})
        iters = max(20, min(100, int(4000 / b)))
        for r in range(rounds):
            for setup, timer in list(timers.items()):
                try:
                    t0 = time.time()
                    seconds = timer(iters)
                    seen = clock.window(t0, time.time()) if clock else {}
                    per_round[setup].append(seconds)
                    if "sm_mhz_median" in seen:
                        clocks[setup].append(seen["sm_mhz_median"])
                    rec.add({"part": "forward-round", "model": preset, "setup": setup, "batch": b, "round": r,
                             "ms_per_step": round(seconds * 1e3, 3), **seen})
                except Exception as e:
                    rec.add({"part": "forward", "model": preset, "setup": setup, "batch": b, "error": repr(e)[:500]})
                    del timers[setup]
        for setup in timers:
            seconds = statistics.median(per_round[setup])
            rate = b / seconds
            row = {"part": "forward", "model": preset, "setup": setup, "batch": b, "rounds": len(per_round[setup]),
                   "ms_per_step": round(seconds * 1e3, 3), "ms_per_step_min": round(min(per_round[setup]) * 1e3, 3),
                   "image_steps_per_s": round(rate, 1), "mfu": round(rate * flops / peak, 4)}
            if clocks[setup]:
                row["sm_mhz_median"] = statistics.median(clocks[setup])
            if profile_kernels and isinstance(timers[setup], EngineSteps):
                row.update(kernel_profile(timers[setup]))
            rec.add(row)
    for engine in engines:
        engine.stop()
    torch.cuda.empty_cache()


# ---- accuracy ------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_accuracy(rec: Recorder, preset: str, batch: int = 16) -> None:
    """One forward's relative L2 error against fp32, per precision, through the engine's forward (fast paths and
    all), with every weight drawn at random (a trained model's adaLN-Zero layers are not zero either)."""
    import copy

    from dit_runtime.engine.fast_paths import FastPaths, apply_fast_paths
    from dit_runtime.engine.runner import COMPUTE_DTYPES

    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = DiTModel.from_config(get_preset(preset)).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = inputs(preset, batch, torch.float32)
    expected = apply_fast_paths(copy.deepcopy(reference), FastPaths(), cuda=True)(x, t, y).float()
    # fp8 at every size (fp8_min_rows 0: at this batch an fp8 engine would run the blocks in bf16), per-row and with
    # fc1's output in 1x128 blocks
    paths = {"fp16": FastPaths(), "bf16": FastPaths(), "fp8": FastPaths(fp8_min_rows=0, fp8_blocks=False),
             "fp8-blocks": FastPaths(fp8_min_rows=0, fp8_blocks=True)}
    for precision, options in paths.items():
        dtype = COMPUTE_DTYPES[precision.split("-")[0]]
        model = copy.deepcopy(reference).to(dtype)
        model.pos_embed = model.pos_embed.float()
        forward = apply_fast_paths(model, options, cuda=True, fp8=precision.startswith("fp8"))
        out = forward(x.to(dtype), t, y).float()
        rec.add({"part": "accuracy", "model": preset, "precision": precision, "batch": batch,
                 "relative_error": round(((out - expected).norm() / expected.norm()).item(), 5)})
        del model, forward
    torch.cuda.empty_cache()


# ---- part 2: single-image latency -----------------------------------------------------------------------------
def bench_latency(rec: Recorder, preset: str, setups: list[str], steps: int = 50, guidance: float = 4.0,
                  rounds: int = 3, clock: GpuClock | None = None, caches: tuple[str, ...] = ("off",)) -> None:
    """One guided image of ``steps`` DDIM steps, end to end, each setup (and each of the engine's ``caches``
    presets) timed in turn ``rounds`` x 5 times."""
    dtype = torch.float16
    calls, engines = {}, []
    for setup in setups:
        if setup == "ours-eager":
            continue
        try:
            if setup.startswith("diffusers"):
                calls[(setup, "off")] = _diffusers_one_image(preset, setup, steps, guidance, dtype)
            else:
                engine = engine_for(setup, preset, (2,))
                engines.append(engine)
                package = runtime(setup)
                for cache in caches if "nocache" not in setup else ("off",):
                    def one_image(engine=engine, package=package, cache=cache):
                        request = engine_request(package, 1, 0, steps, "ddim", guidance, cache)
                        engine.submit(request, progress=False).result(timeout=60)
                    calls[(setup, cache)] = one_image
            for key in [k for k in calls if k[0] == setup]:
                for _ in range(3):
                    calls[key]()
        except Exception as e:
            rec.add({"part": "latency", "model": preset, "setup": setup, "error": repr(e)[:500]})
            for key in [k for k in calls if k[0] == setup]:
                calls.pop(key)
    freeze_startup_heap()
    times = collections.defaultdict(list)
    t0 = time.time()
    for _ in range(rounds):
        for setup, call in calls.items():
            for _ in range(5):
                start = time.perf_counter()
                call()
                times[setup].append(time.perf_counter() - start)
    seen = clock.window(t0, time.time()) if clock else {}
    for (setup, cache), ts in times.items():
        rec.add({"part": "latency", "model": preset, "setup": setup, "cache": cache, "steps": steps,
                 "guidance": guidance,
                 "runs": len(ts), "ms_median": round(statistics.median(ts) * 1e3, 2), "ms_min": round(min(ts) * 1e3, 2),
                 **seen})
    for engine in engines:
        engine.stop()
    torch.cuda.empty_cache()


def _diffusers_one_image(preset: str, setup: str, steps: int, guidance: float, dtype):
    from diffusers import DDIMScheduler

    cfg = get_preset(preset)
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
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        torch.cuda.synchronize()
    return one_image


# ---- part: few-step students --------------------------------------------------------------------------------
def student_engine(setup: str, preset: str, buckets: tuple[int, ...], max_queue: int):
    """A started fp16 engine of ``setup`` (ours or baseline; -nosplitk: without split-K), compiled and
    graph-captured, over a random-weight student of ``preset``."""
    package = runtime(setup)
    contract = importlib.import_module(package.__name__ + ".contract")
    engine = importlib.import_module(package.__name__ + ".engine")
    if hasattr(contract, "random_student_contract"):
        sampling = contract.random_student_contract()
    else:  # a checkout from before it: the same contract, built by hand
        sampling = contract.student_contract(contract.SamplingContract(), contract.Teacher(
            checkpoint="random weights", sha256="", segments=4, method="multistep-consistency"),
            max_guidance_scale=8.0, guidance_scale=4.0)
    extra = {}
    if "nosplitk" in setup.split("-")[1:]:
        extra["fast_paths"] = importlib.import_module(package.__name__ + ".engine.fast_paths").FastPaths(split_k=1)
    config = engine.EngineConfig(device="cuda", precision="fp16", max_batch_size=max(buckets), batch_buckets=buckets,
                                 compile=True, cuda_graphs=True, max_queue_size=max_queue, feature_cache_rows=0,
                                 **extra)
    engine.configure_compile(config)
    return engine.Engine.random_weights(preset, config, sampling=sampling).start()


def bench_students(rec: Recorder, preset: str, setups: list[str], student_steps: list[int], teacher_steps: int,
                   max_rows: int, images: int, rounds: int, clock: GpuClock | None = None) -> None:
    """One guided image, and images/s at a full batch, of a student (of each setup: ours, baseline) against our
    guided teacher, in turn."""
    setups = [s for s in setups if s.split("-")[0] in ("ours", "baseline")] or ["ours"]
    teacher = engine_for("ours-nocache", preset, (2, max_rows), max_queue=images)
    students = {setup: student_engine(setup, preset, (1, max_rows), max_queue=images) for setup in setups}
    freeze_startup_heap()  # as a replica does once warm: no collection while timing walks the compiled programs

    def one_image(engine, setup: str, steps: int, sampler: str):
        request = engine_request(runtime(setup), 1, 0, steps, sampler, 4.0)
        return lambda: engine.submit(request, progress=False).result(60)

    calls = {("teacher", "ours", teacher_steps): one_image(teacher, "ours", teacher_steps, "ddim")}
    for setup, student in students.items():
        for steps in student_steps:
            calls[("student", setup, steps)] = one_image(student, setup, steps, "consistency")
    for call in calls.values():  # warm
        for _ in range(3):
            call()
    times = collections.defaultdict(list)
    t0 = time.time()
    for _ in range(rounds):
        for key, call in calls.items():
            for _ in range(10):
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
    seen = clock.window(t0, time.time()) if clock else {}
    for (who, setup, steps), ts in times.items():
        rec.add({"part": "students", "what": "one image", "model": preset, "who": who, "setup": setup,
                 "steps": steps, "guidance": 4.0, "rows_per_image": 1 if who == "student" else 2, "runs": len(ts),
                 "ms_median": round(statistics.median(ts) * 1e3, 3), "ms_min": round(min(ts) * 1e3, 3), **seen})
    for setup in students:
        steps = min(4, max(student_steps))
        rec.add({"part": "students", "what": "one image, where the time goes", "model": preset, "setup": setup,
                 "steps": steps, **one_image_timeline(calls[("student", setup, steps)],
                                                      rec.path.parent / f"one-image-{setup}.trace.json.gz")})

    def throughput(engine, setup: str, steps: int, sampler: str, n: int) -> float:
        package, classes = runtime(setup), engine.info.config.num_classes
        requests = [engine_request(package, i % classes, i, steps, sampler, 4.0) for i in range(n)]  # untimed
        start = time.perf_counter()
        handles = [engine.submit(request, progress=False) for request in requests]
        for handle in handles:
            handle.result(600)
        return n / (time.perf_counter() - start)

    steps = min(4, max(student_steps))
    rates = collections.defaultdict(list)
    t0 = time.time()
    for _ in range(rounds):
        rates[("teacher", "ours")].append(throughput(teacher, "ours", teacher_steps, "ddim", images // 8))
        for setup, student in students.items():
            rates[("student", setup)].append(throughput(student, setup, steps, "consistency", images))
    seen = clock.window(t0, time.time()) if clock else {}
    for (who, setup), values in rates.items():
        rec.add({"part": "students", "what": "images/s", "model": preset, "who": who, "setup": setup,
                 "steps": teacher_steps if who == "teacher" else steps, "max_rows": max_rows,
                 "images_per_s_median": round(statistics.median(values), 1), "runs": len(values),
                 "images_per_s": [round(v, 1) for v in values], **seen})
    for setup in students:
        ratio = statistics.median(rates[("student", setup)]) / statistics.median(rates[("teacher", "ours")])
        rec.add({"part": "students", "what": "images/s ratio", "model": preset, "setup": setup,
                 "student_over_teacher": round(ratio, 2)})
    teacher.stop()
    for student in students.values():
        student.stop()
    torch.cuda.empty_cache()


TOP_KERNELS = 25  # the GPU work of a lone request listed by name, the most time first
LAUNCH_GAP_US = 20.0  # idle GPU time between two kernels up to this: launch latency (a graph's node to node)


def gpu_gaps(kernels: list[tuple[float, float]]) -> dict:
    """Idle time between the GPU work of one request (``(start, end)`` in microseconds, any order), split by
    ``LAUNCH_GAP_US``: the short gaps are kernel launch latency, inside a CUDA graph or between back-to-back launches
    (fewer kernels cut them); the long ones are the GPU waiting for the host (a faster host path cuts them)."""
    short = long = 0.0
    reached = None
    for a, b in sorted(kernels):
        if reached is not None and a > reached:
            if a - reached <= LAUNCH_GAP_US:
                short += a - reached
            else:
                long += a - reached
        reached = b if reached is None else max(reached, b)
    return {"kernels": len(kernels), "launch_gaps_ms": short / 1e3, "host_gaps_ms": long / 1e3}


def one_image_timeline(call, trace: Path, n: int = 20) -> dict:
    """Where a lone request's time goes, from torch.profiler's timeline of ``n`` requests (host and GPU on one clock;
    the trace is written to ``trace``, gzipped, for Perfetto): medians, in ms, of the time from the call to its first
    GPU kernel or copy, from there to its last one's end, the GPU's busy time in between and its idle time split by
    ``gpu_gaps`` (launch latency, or waiting for the host), the kernels per request, and from the last one's end to
    the result in the caller's hands; and the ``TOP_KERNELS`` kernels that took the most GPU time, per request. The
    profiler slows the host, so these add up to more than an untraced call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            with record_function("one_image"):
                call()
    prof.export_chrome_trace(str(trace))  # a .gz name is written compressed
    events = prof.events()
    device = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type == DeviceType.CUDA)
    parts = collections.defaultdict(list)
    by_name = collections.defaultdict(lambda: [0, 0.0])  # kernel name -> [count, microseconds] over all requests
    requests = [e.time_range for e in events if e.name == "one_image"]
    for request in requests:
        named = [(a, b, name) for a, b, name in device if request.start <= a <= request.end]
        if not named:
            return {"error": "no GPU work inside a request in the profile", "trace": trace.name}
        for a, b, name in named:
            by_name[name][0] += 1
            by_name[name][1] += b - a
        mine = [(a, b) for a, b, _ in named]
        first, last = mine[0][0], max(b for _, b in mine)
        parts["to_first_kernel_ms"].append((first - request.start) / 1e3)
        parts["gpu_span_ms"].append((last - first) / 1e3)
        parts["gpu_busy_ms"].append(sum(b - a for a, b in mine) / 1e3)
        for name, value in gpu_gaps(mine).items():
            parts[name].append(value)
        parts["after_last_kernel_ms"].append((request.end - last) / 1e3)
        parts["traced_total_ms"].append((request.end - request.start) / 1e3)
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return {name: round(statistics.median(values), 3) for name, values in parts.items()} | {
        "kernels_by_time": [{"name": name[:100], "per_request": round(count / len(requests), 2),
                             "us_per_request": round(us / len(requests), 1)} for name, (count, us) in top],
        "trace": trace.name}


# ---- part 3: the engine under load ----------------------------------------------------------------------------
def bench_load(rec: Recorder, preset: str, rates: list[float], duration: float, max_batch: int,
               policies: list[str], buckets: tuple[int, ...], caches: tuple[str, ...] = ("off",)) -> None:
    """Poisson arrivals of one-image guided DDIM requests of 20 or 50 steps, per batching policy and cache mix (a
    preset for every request, or "half": every other one balanced): images/s and latency, per preset in the mix."""
    from dit_runtime.engine import QueueFullError

    start = time.perf_counter()
    engine = engine_for("ours", preset, tuple(sorted(set(buckets) | {max_batch})), max_queue=4096)
    rec.add({"part": "compile", "model": preset, "setup": "engine", "buckets": list(engine.config.buckets),
             "seconds": round(time.perf_counter() - start, 1),
             "per_bucket_s": {b: round(t, 1) for b, t in engine.warmup_seconds.items()}})
    for policy in policies:
        # The same compiled engine for every policy; the scheduler is switched while the engine is idle.
        use_policy(engine, policy)
        for mix in caches:
            presets = ("balanced", "off") if mix == "half" else (mix,)
            for rate in rates:
                rng = random.Random(int(rate * 1000))
                handles, rejected = [], 0
                t0 = time.monotonic()
                next_at = t0
                while next_at - t0 < duration:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    cache = presets[len(handles) % len(presets)]
                    request = engine_request(sys.modules["dit_runtime"], rng.randrange(1000), rng.randrange(2 ** 31),
                                             rng.choice([20, 50]), "ddim", 4.0, cache)
                    try:
                        handles.append((time.monotonic(), cache, engine.submit(request, progress=False)))
                    except QueueFullError:
                        rejected += 1
                    next_at += rng.expovariate(rate)
                results = [h.result(timeout=600) for _, _, h in handles]
                end = max(submitted + r.total_seconds for (submitted, _, _), r in zip(handles, results))
                lat = sorted(r.total_seconds for r in results)
                row = {"part": "load", "model": preset, "policy": policy, "cache": mix, "rate": rate,
                       "requests": len(results), "rejected": rejected,
                       "images_per_s": round(len(results) / (end - t0), 2), "p50_s": _pct(lat, 50),
                       "p99_s": _pct(lat, 99),
                       "mean_queue_s": round(statistics.mean(r.queue_seconds for r in results), 4)}
                if len(presets) > 1:
                    for name in presets:
                        mine = sorted(r.total_seconds for (_, c, _), r in zip(handles, results) if c == name)
                        row[f"p50_s_{name}"], row[f"p99_s_{name}"] = _pct(mine, 50), _pct(mine, 99)
                rec.add(row)
    engine.stop()
    torch.cuda.empty_cache()


def bench_decode_overlap(rec: Recorder, preset: str, rate: float, n: int, duration: float,
                         buckets: tuple[int, ...], phases: list[str], arrivals: str = "paced") -> None:
    """A 4-step student with a latent decoder (``decode.SD_VAE_CONFIG``, random weights, compiled, CUDA graphs)
    under requests of ``n`` images at ``rate`` a second (``arrivals``: paced, or Poisson's, whose bursts finish
    many requests in one step and so decode them together): the images of the requests that finish in a step
    decode on the decode stream beside the next steps. One engine, a phase of ``duration`` seconds for each of
    ``phases`` in turn: ``engine`` times each request to its images on the host, as the engine does from its submit;
    ``encode`` also PNG-encodes and base64-es them as a replica does (``encode_base64`` on pools of
    ``encode_threads``), and its latency ends there. Per phase: images/s, the latency's p50 and p99, the steps' p50
    and p99."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from dit_runtime.contract import random_student_contract
    from dit_runtime.engine import Engine, EngineConfig, GenerationRequest, configure_compile
    from dit_runtime.images import encode_base64, encode_threads

    from .decode import SD_VAE_CONFIG, random_vae
    from .loadgen import send_offsets

    steps: list[tuple[float, float]] = []  # (end, seconds) of every step, from the engine's observer
    config = EngineConfig(device="cuda", precision="fp16", max_batch_size=max(buckets), batch_buckets=buckets,
                          compile=True, cuda_graphs=True, max_queue_size=4096, feature_cache_rows=0,
                          compile_decoder=True, decoder_cuda_graphs=True)
    configure_compile(config)
    start = time.perf_counter()
    engine = Engine.random_weights(preset, config, sampling=random_student_contract(), vae=random_vae(SD_VAE_CONFIG),
                                   on_step=lambda s: steps.append((time.monotonic(), s.duration_seconds))).start()
    rec.add({"part": "compile", "model": preset, "setup": "student + decoder", "buckets": list(config.buckets),
             "seconds": round(time.perf_counter() - start, 1)})
    freeze_startup_heap()
    encoder, deflater = ThreadPoolExecutor(encode_threads()), ThreadPoolExecutor(encode_threads())

    def encode(outcome, request: GenerationRequest, answered: Future) -> None:
        """(encoder thread) As a replica answers: the images as base64 PNGs; ``answered`` gets the time, or the
        error."""
        try:
            encode_base64(outcome.images, request.encoding, request.upscale, deflater)
            answered.set_result(time.monotonic())
        except BaseException as e:  # a failed request (its outcome an error) or encode: raised below, not lost
            answered.set_exception(e)

    for index, phase in enumerate(phases):
        rng = random.Random(index)
        classes = engine.info.config.num_classes
        offsets = list(send_offsets(rate, duration, arrivals, seed=index))
        requests = [GenerationRequest.of(rng.randrange(classes), n=n, seed=rng.randrange(2 ** 31),
                                         num_inference_steps=4, sampler="consistency", guidance_scale=4.0)
                    for _ in offsets]  # built before the clock
        sent, handles, answered = [], [], [Future() for _ in requests]
        t0 = time.monotonic()
        for i, request in enumerate(requests):
            delay = t0 + offsets[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent.append(time.monotonic())
            handle = engine.submit(request, progress=False)
            if phase == "encode":
                handle.on_finish(lambda outcome, r=request, a=answered[i]: encoder.submit(encode, outcome, r, a))
            handles.append(handle)
        results = [h.result(timeout=600) for h in handles]
        if phase == "encode":  # to the answer, as a replica's route
            latency = [a.result(timeout=600) - at for a, at in zip(answered, sent)]
        else:  # to the images on the host, as the engine times it from its submit
            latency = [r.total_seconds for r in results]
        end = max(at + seconds for at, seconds in zip(sent, latency))
        lat = sorted(latency)
        mine = sorted(seconds for at, seconds in steps if t0 <= at <= end)
        rec.add({"part": "decode-overlap", "model": preset, "phase": index, "setup": phase, "rate": rate,
                 "arrivals": arrivals, "images_per_request": n, "requests": len(results),
                 "encode_threads": encode_threads(),
                 "images_per_s": round(n * len(results) / (end - t0), 1), "p50_s": _pct(lat, 50),
                 "p99_s": _pct(lat, 99), "max_s": round(lat[-1], 4), "steps": len(mine),
                 "step_p50_ms": round(1e3 * percentile(mine, 50), 2),
                 "step_p99_ms": round(1e3 * percentile(mine, 99), 2)})
    engine.stop()
    encoder.shutdown()
    deflater.shutdown()
    torch.cuda.empty_cache()


def _pct(values: list[float], q: float) -> float | None:
    """``percentile`` rounded to 0.1 ms for a row (None, JSON's null, when there are none)."""
    value = percentile(values, q)
    return None if value is None else round(value, 4)


def plot_load(rows: list[dict], path: Path) -> None:
    """p99 latency against offered load, one line per batching policy, drawn with Pillow."""
    from dit_runtime.plot import line_plot

    series = {}
    for r in rows:
        if r.get("part") == "load" and "p99_s" in r:
            series.setdefault(f"{r['model']} {r['policy']} cache {r.get('cache', 'off')}", []).append(
                (r["rate"], r["p99_s"]))
    if series:
        line_plot(series, path, title="p99 latency vs offered load", xlabel="requests/s", ylabel="p99 latency (s)",
                  log_y=True)


def summary_table(rows: list[dict]) -> str:
    lines = ["| model | setup | batch | ms/step | image-steps/s | MFU | SM MHz |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("part") == "forward" and "mfu" in r:
            lines.append(f"| {r['model']} | {r['setup']} | {r['batch']} | {r['ms_per_step']} | "
                         f"{r['image_steps_per_s']:,} | {r['mfu']:.1%} | {r.get('sm_mhz_median', '')} |")
    lines += ["", "| model | setup | cache | one image, 50 steps, guided (ms, median) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['setup']} | {r.get('cache', 'off')} | {r['ms_median']} |" for r in rows
              if r.get("part") == "latency" and "ms_median" in r]
    lines += ["", "| model | batching | cache | offered req/s | images/s | p50 s | p99 s | rejected |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['policy']} | {r.get('cache', 'off')} | {r['rate']} | {r['images_per_s']} | "
              f"{r['p50_s']} | {r['p99_s']} | {r['rejected']} |" for r in rows if r.get("part") == "load"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .loadgen import ARRIVALS

    p = argparse.ArgumentParser(prog="python -m benchmarks engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit-10l"])
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--setups", nargs="+", default=list(DEFAULT_SETUPS))
    p.add_argument("--parts", nargs="+", default=["forward", "latency", "load"],
                   choices=["forward", "latency", "load", "accuracy", "students", "decode-overlap"])
    p.add_argument("--baseline", help="a checkout whose dit_runtime the baseline[-...] setups run")
    p.add_argument("--rates", nargs="+", type=float, default=[20, 40, 80, 120])
    p.add_argument("--load-seconds", type=float, default=6.0)
    p.add_argument("--load-max-batch", type=int, default=256)
    p.add_argument("--load-buckets", nargs="+", type=int, default=[4, 16, 64, 128, 256])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--caches", nargs="+", default=["off"], help="latency: the feature-cache presets to time")
    p.add_argument("--load-caches", nargs="+", default=["off"],
                   help="load: cache presets (or 'half': every other request balanced) to drive the engine with")
    p.add_argument("--student-steps", nargs="+", type=int, default=[1, 2, 4, 8], help="students: step counts")
    p.add_argument("--teacher-steps", type=int, default=50, help="students: the guided teacher's DDIM steps")
    p.add_argument("--student-images", type=int, default=4096, help="students: images per throughput run")
    p.add_argument("--overlap-rate", type=float, default=53.0, help="decode-overlap: requests a second")
    p.add_argument("--overlap-n", type=int, default=4, help="decode-overlap: images a request")
    p.add_argument("--overlap-seconds", type=float, default=40.0, help="decode-overlap: seconds a phase")
    p.add_argument("--overlap-arrivals", choices=ARRIVALS, default="paced",
                   help="decode-overlap: the requests' arrivals (Poisson's come in bursts)")
    p.add_argument("--overlap-buckets", nargs="+", type=int, default=[8, 64], help="decode-overlap: row buckets")
    p.add_argument("--overlap-phases", nargs="+", default=["engine", "encode"], choices=["engine", "encode"],
                   help="decode-overlap: a phase each, in turn: engine, to the images on the host; encode, to each "
                        "answer PNG-encoded")
    p.add_argument("--rounds", type=int, default=3, help="time the setups in turn this many times over")
    p.add_argument("--profile-kernels", action="store_true",
                   help="forward: also sum the engine setups' kernel times per step with torch.profiler")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the engine benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if any(s.startswith("baseline") for s in args.setups):
        if not args.baseline:
            p.error("the baseline setups need --baseline DIR (a checkout with its own dit_runtime/)")
        load_baseline(args.baseline)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    peak = matmul_peak()
    out.mkdir(parents=True, exist_ok=True)
    clock = GpuClock(out / "smi.csv")  # the SM clock beside every timing (a no-op without nvidia-smi)
    rec = Recorder(out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "python": platform.python_version(), "fp16_matmul_peak_tflops": round(peak / 1e12, 1),
                         "command": "python -m benchmarks engine " + " ".join(argv if argv is not None else
                                                                             sys.argv[2:])})
    for preset in args.models:
        if "accuracy" in args.parts:
            bench_accuracy(rec, preset)
        if "forward" in args.parts:
            bench_forward(rec, preset, args.batches, args.setups, peak, args.rounds, clock, args.profile_kernels)
        if "latency" in args.parts:
            bench_latency(rec, preset, [s for s in args.setups if not s.endswith("-nofuse")], rounds=args.rounds,
                          clock=clock, caches=tuple(args.caches))
        if "students" in args.parts:
            bench_students(rec, preset, args.setups, args.student_steps, args.teacher_steps, max(args.batches),
                           args.student_images, args.rounds, clock)
        if "decode-overlap" in args.parts:
            bench_decode_overlap(rec, preset, args.overlap_rate, args.overlap_n, args.overlap_seconds,
                                 tuple(args.overlap_buckets), args.overlap_phases, args.overlap_arrivals)
        if "load" in args.parts:
            bench_load(rec, preset, args.rates, args.load_seconds, args.load_max_batch, args.policies,
                       tuple(args.load_buckets), tuple(args.load_caches))
    clock.close()
    (out / "bench.json").write_text(json.dumps(rec.rows, indent=1))
    try:
        plot_load(rec.rows, out / "load.png")
    except Exception as e:  # the numbers matter more than the picture
        print(f"plot failed: {e!r}", file=sys.stderr)
    print(summary_table(rec.rows))
    return 0
