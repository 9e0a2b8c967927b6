"""A latent model's VAE decoder alone, per image, at the batch sizes the engine decodes: diffusers' eager
``AutoencoderKL`` (the anchor) beside the engine's ``VAEDecoder`` in each setup, on the same latents.

    python -m benchmarks decode [--batches 1 16 64] [--setups diffusers-eager eager compiled ...] [--vae PATH]

Weights: random, of stabilityai/sd-vae-ft-ema's configuration (``SD_VAE_CONFIG``: 4x32x32 latents -> 256x256 RGB),
unless ``--vae`` names a local AutoencoderKL folder; ``--config tiny`` is a small one for the CPU tests.
Setups (each in the device's half precision, fp16 unless named; fp32 on a CPU):

- ``diffusers-eager``: ``vae.decode(z).sample`` as diffusers runs it, NCHW (the anchor);
- ``eager``: the engine's decoder, channels-last, with diffusers' modules as they are (``norms_by_channels`` and
  ``fold_upsampling`` off);
- ``compiled`` / ``compiled-bf16``: the same under torch.compile (inductor fuses each GroupNorm with its SiLU);
- ``-channels`` after a setup of the engine's decoder (``eager``, ``compiled``, ``tuned``, ``engine-graphs``), on a
  GPU: each GroupNorm and its SiLU from each channel's moments (``norms_by_channels``,
  ``decoders.group_norm_by_channels``), torch ops that inductor fuses with their neighbours;
- ``-folded`` after a setup of ours: each upsampler's nearest upsampling + 3x3 convolution as one transposed
  convolution of 4/9 of its arithmetic (``fold_upsampling``, ``decoders.FoldedUpsample``). The engine's decoder is
  ``-channels-folded``;
- ``graphs``: compiled with inductor's CUDA graphs (``mode="reduce-overhead"``), to see what launch overhead is left;
- ``compiled-cudnn-bench`` / ``graphs-cudnn-bench``: the same with ``torch.backends.cudnn.benchmark`` on during their
  calls (cuDNN times its convolution algorithms for each new shape and keeps the fastest);
- ``autotune``: ``mode="max-autotune-no-cudagraphs"`` at a static batch (inductor times its Triton convolution and
  GEMM templates against cuDNN's for each convolution, and tunes its own kernels' launch settings; slow to compile);
- ``tuned``: compiled as the engine does (a symbolic batch size), with inductor's coordinate-descent tuning of its own
  kernels' launch settings: the part of ``autotune`` that sped up the GroupNorm passes, without the template search;
- ``engine-graphs``: the engine's decoder with ``decoder_cuda_graphs``: its symbolic-batch program captured as CUDA
  graphs at ``decoders.graph_batches`` of the largest ``--batches``, each batch padded to the next;
  ``engine-graphs-tuned``: the same with ``tuned``'s options (the served decoder with ``DECODER_OPTIONS``).

Each row: milliseconds per image (median over ``--rounds`` calls, the setups timed in turn, CUDA events on a GPU),
the first call's seconds at that batch (a compile, where one is due), and the error against the fp32 eager decode
of the same latents: relative L2 of the float images and the largest difference in uint8 levels. The anchor's own
fp16 error is the tolerance. On a GPU each row also has the decoder's rate (``tflops``: its FLOPs per image, counted
once by ``decode_flops``, the folded decoder's for ``-folded`` setups, over the time) against the card's measured
fp16 matmul rate, and with ``--profile-kernels`` its kernels' time per image by kind (``DECODER_KERNEL_KINDS``) with
the convolutions' own rate: whether a faster decode is ours to win or cuDNN's convolution kernels' to give. The top
kernels carry their launches over the profile's ``profiled_decodes``: one name of inductor's can be several layers'
kernel. Rows go to ``OUT/decode.jsonl`` as they are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dit_runtime.decoders import VAEDecoder, fold_upsampling_convs, load_vae, quantize

from .engine import KERNEL_KINDS, kernel_times, kernels_by_kind, matmul_peak

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=4)
# Setups: a base, then for our decoder's bases ``-channels``, then ``-folded``.
_OURS = ("eager", "compiled", "tuned", "engine-graphs", "engine-graphs-tuned")
SETUPS = (("diffusers-eager", "compiled-bf16", "graphs", "compiled-cudnn-bench", "graphs-cudnn-bench", "autotune")
          + tuple(f"{base}{norms}" for base in _OURS for norms in ("", "-channels")))
SETUPS += tuple(f"{name}-folded" for name in SETUPS if name.startswith(_OURS + ("graphs", "autotune"))
                and "bf16" not in name and "cudnn" not in name)
CUDA_ONLY = tuple(name for name in SETUPS if name.startswith(("graphs", "autotune", "tuned", "engine-graphs"))
                  or "-channels" in name)
TUNED = {"coordinate_descent_tuning": True}  # inductor's options for ``tuned`` setups
# A decoder's kernels by kind. Inductor's fused kernels first: it names them after the ops they fuse
# (``triton_poi_fused_convolution_native_group_norm_0`` is a GroupNorm pass, not a convolution); cuDNN's
# convolutions are implicit GEMMs, named for it, so they come before the GEMMs' rule.
CONVOLUTIONS = "convolutions (cuDNN, inductor templates)"
_KINDS = dict(KERNEL_KINDS)
DECODER_KERNEL_KINDS = (("fused elementwise and reductions (inductor)", r"^triton_(poi|per|red)_"),
                        ("attention", _KINDS["attention"]), (CONVOLUTIONS, r"conv|fprop|implicit|nhwc"),
                        ("GEMM (cuBLAS, CUTLASS)", _KINDS["GEMM (cuBLAS, CUTLASS)"]), ("copies", _KINDS["copies"]))


def decode_flops(vae: torch.nn.Module, latent_shape: tuple[int, ...]) -> tuple[int, int]:
    """FLOPs of decoding one latent of ``latent_shape`` (channels, h, w), in all and in convolutions, counted by
    torch's FlopCounterMode on a copy of ``vae`` on the meta device (no arithmetic is done)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(vae).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta.decode(torch.empty(1, *latent_shape, device="meta"))
    counts = counter.get_flop_counts()["Global"]
    return counter.get_total_flops(), int(counts.get(torch.ops.aten.convolution, 0))


def random_vae(config: dict, seed: int = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL of ``config`` with random weights (fp32, on the CPU)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def write_random_vae(folder: Path, config: dict = SD_VAE_CONFIG) -> Path:
    """A random AutoencoderKL of ``config`` saved as a diffusers folder (``vae:`` of a served benchmark model)."""
    if not (folder / "config.json").is_file():
        random_vae(config).save_pretrained(folder)
    return folder


def first_call(fn, z: torch.Tensor) -> float:
    """Seconds of ``fn``'s first call (a compile), then a second warm call (CUDA graphs record on their second)."""
    sync = torch.cuda.synchronize if z.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(z)
    sync()
    seconds = time.perf_counter() - start
    fn(z)
    return seconds


def one_call(fn, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of one call (CUDA events on a GPU) and its output."""
    if z.device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn(z)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000, out
    start = time.perf_counter()
    out = fn(z)
    return time.perf_counter() - start, out


def with_cudnn_benchmark(fn):
    """``fn`` run with cuDNN's algorithm search on (for its calls only, so the other setups keep the default)."""
    def call(z):
        before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
        try:
            return fn(z)
        finally:
            torch.backends.cudnn.benchmark = before
    return call


def setup(name: str, vae: torch.nn.Module, device: torch.device, half: torch.dtype, latent_shape: tuple[int, ...],
          max_batch: int):
    """The decode function (scaled latents (n, 4, h, w) fp32 -> float images) of one setup, for batches of at most
    ``max_batch`` latents of ``latent_shape``."""
    if name.endswith("-cudnn-bench"):
        return with_cudnn_benchmark(setup(name.removesuffix("-cudnn-bench"), vae, device, half, latent_shape,
                                          max_batch))
    dtype = torch.bfloat16 if name == "compiled-bf16" else half
    module = vae.to(device, dtype)
    if name == "diffusers-eager":
        module = module.to(memory_format=torch.contiguous_format)
        return lambda z: module.decode(z.to(dtype)).sample
    fold = name.endswith("-folded")
    name = name.removesuffix("-folded")
    if name in ("graphs", "autotune"):
        if fold:
            fold_upsampling_convs(module)
        module = module.to(memory_format=torch.channels_last)
        mode = "reduce-overhead" if name == "graphs" else "max-autotune-no-cudagraphs"
        forward = torch.compile(lambda z: module.decode(z).sample, mode=mode, dynamic=False)  # per batch
        return lambda z: forward(z.to(dtype).contiguous(memory_format=torch.channels_last)).clone()
    by_channels = name.endswith("-channels")
    name = name.removesuffix("-channels")
    if name.startswith("engine-graphs"):  # a view of the graph's static output: read before the next call
        decoder = VAEDecoder(module, latent_scale=1.0, max_batch=max_batch, compile=True, cuda_graphs=True,
                             compile_options=TUNED if name.endswith("-tuned") else None,
                             norms_by_channels=by_channels, fold_upsampling=fold)
        decoder.warm_up(latent_shape)
        return lambda z: decoder.decode(z)[0]
    decoder = VAEDecoder(module, latent_scale=1.0, max_batch=1 << 20, compile=name != "eager",
                         compile_options=TUNED if name == "tuned" else None,
                         norms_by_channels=by_channels, fold_upsampling=fold)
    return lambda z: decoder.decode(z)[0]


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--config", choices=["sd-vae-ft-ema", "tiny"], default="sd-vae-ft-ema",
                   help="the random weights' configuration (without --vae)")
    p.add_argument("--vae", help="a local diffusers AutoencoderKL folder instead of random weights")
    p.add_argument("--latent-side", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile-kernels", action="store_true",
                   help="on a GPU, each setup's kernel time per image by kind, from torch.profiler")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    half = torch.float16 if device.type == "cuda" else torch.float32
    config = SD_VAE_CONFIG if a.config == "sd-vae-ft-ema" else TINY_VAE_CONFIG
    fresh_vae = (lambda: load_vae(a.vae)) if a.vae else (lambda: random_vae(config))  # the same weights each call
    reference_vae = fresh_vae().to(device)
    source = a.vae or f"random {a.config}"
    generator = torch.Generator().manual_seed(0)
    latent_shape = (reference_vae.config.latent_channels, a.latent_side, a.latent_side)
    peak = matmul_peak() if device.type == "cuda" else None
    names = [n for n in a.setups if n not in CUDA_ONLY or device.type == "cuda"]
    flop_counts = {False: decode_flops(reference_vae, latent_shape)}
    if any(name.endswith("-folded") for name in names):  # another copy of the weights, only where it is needed
        folded_vae = fresh_vae()
        fold_upsampling_convs(folded_vae)
        flop_counts[True] = decode_flops(folded_vae, latent_shape)
    fns = {name: setup(name, fresh_vae(), device, half, latent_shape, max(a.batches))  # each batch reuses them
           for name in names}
    for batch in a.batches:
        z = torch.randn(batch, reference_vae.config.latent_channels, a.latent_side, a.latent_side,
                        generator=generator).to(device)
        reference = reference_vae.float().decode(z).sample.float()  # fp32 eager: what every setup is held to
        first = {name: first_call(fns[name], z) for name in names}
        times, outputs = {name: [] for name in names}, {}
        for _ in range(a.rounds):  # the setups in turn, so that a drifting clock weighs on each alike
            for name in names:
                seconds, outputs[name] = one_call(fns[name], z)
                times[name].append(seconds)
        for name in names:
            images = outputs[name].float()
            flops, conv_flops = flop_counts[name.endswith("-folded")]
            row = {"setup": name, "vae": source, "batch": batch, "device": str(device),
                   "dtype": str(torch.bfloat16 if name == "compiled-bf16" else half).removeprefix("torch."),
                   "ms_per_image": round(1000 * statistics.median(times[name]) / batch, 4),
                   "first_call_s": round(first[name], 2),
                   "rel_error": float(f"{float((images - reference).norm() / reference.norm()):.3g}"),
                   "max_uint8_diff": int((quantize(images).int() - quantize(reference).int()).abs().max()),
                   "image_shape": list(images.shape[1:]), "gflop_per_image": round(flops / 1e9, 2)}
            if peak:
                row["tflops"] = round(flops / (row["ms_per_image"] / 1e3) / 1e12, 1)
                row["of_matmul_peak"] = round(row["tflops"] * 1e12 / peak, 3)
            if a.profile_kernels and device.type == "cuda":
                calls = 3
                row["profiled_decodes"] = calls  # what top_kernels' launches are over
                row.update(kernels_by_kind(kernel_times(lambda: [fns[name](z) for _ in range(calls)]),
                                           calls * batch, "image", DECODER_KERNEL_KINDS))
                conv_ms = row["kernel_ms_by_kind"].get(CONVOLUTIONS)
                row["conv_tflops"] = round(conv_flops / (conv_ms / 1e3) / 1e12, 1) if conv_ms else None
            with open(a.out / "decode.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        del outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0
