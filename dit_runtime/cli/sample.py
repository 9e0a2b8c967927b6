"""``dit-sample``: generate class-conditional images from a checkpoint into PNG files or a grid.

Examples::

    dit-sample checkpoints/digits.safetensors --classes 0 3 7 -n 4 --grid digits.png
    dit-sample checkpoints/dit-xl-2-256.safetensors --classes "golden retriever" --vae ./sd-vae-ft-ema --out samples/

Image k of a run gets the noise stream ``noise_key(seed, k)`` (initial noise at counter -1, step j's noise at
counter j), the serving engine's convention, so a request with the same labels, seed and settings gives the same
images there (up to floating-point rounding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError, load_model
from ..diffusion import (SAMPLER_IDS, SAMPLERS, NoiseSchedule, check_num_steps, counter_noise, noise_key,
                         sampler_step, timestep_at)
from ..images import save_grid, to_pil, to_uint8
from ..model import DiTModel
from ..vae import LatentDecoder

INITIAL_NOISE_COUNTER = -1  # the engine's convention: x_T at counter -1, step j's noise at counter j


def load_vae(folder: str | None, checkpoint: str, latent_scale: float, device: str) -> LatentDecoder:
    """The decoder of this latent-space checkpoint, with errors saying what is missing."""
    if folder is None:
        raise SystemExit(f"dit-sample: {checkpoint} denoises VAE latents (space=latent), so it needs a decoder: pass "
                         "--vae PATH to a local diffusers AutoencoderKL folder (config.json + weights, e.g. a "
                         "download of stabilityai/sd-vae-ft-ema)")
    try:
        return LatentDecoder.load(folder, latent_scale, device)
    except ValueError as e:
        raise SystemExit(f"dit-sample: --vae {e}") from None


@torch.no_grad()
def sample(model: DiTModel, labels: list[int], seed: int, num_steps: int, sampler: str, guidance_scale: float,
           eta: float = 0.0, clip_denoised: bool = False, first_index: int = 0, progress=None) -> torch.Tensor:
    """Denoise one batch (N images, image k of the run at ``first_index + k``) -> (N, C, H, W) samples in fp32."""
    cfg = model.config
    device = next(model.parameters()).device
    n = len(labels)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    schedule = NoiseSchedule.linear(device=device)
    key = torch.tensor([noise_key(seed, first_index + k) for k in range(n)], dtype=torch.int64, device=device)
    y = torch.tensor(labels, dtype=torch.int64, device=device)
    full = lambda v, dtype=torch.int64: torch.full((n,), v, dtype=dtype, device=device)  # noqa: E731
    num_steps_t, sampler_t = full(num_steps), full(SAMPLER_IDS[sampler])
    eta_t, guidance_t = full(eta, torch.float32), full(guidance_scale, torch.float32)
    guided = cfg.supports_guidance and guidance_scale != 1.0
    x = counter_noise(key, full(INITIAL_NOISE_COUNTER), shape)  # (N, C, H, W)
    prev_x0 = torch.zeros_like(x)
    for step in range(num_steps):
        i = full(step)
        t = timestep_at(i, num_steps_t, schedule.num_timesteps)  # (N,)
        out = model.forward_with_cfg(x, t, y, guidance_t) if guided else model(x, t, y)  # (N, C_out, H, W)
        result = sampler_step(schedule, out, x, i, num_steps_t, sampler_t, eta_t, prev_x0,
                              counter_noise(key, i, shape), learn_sigma=cfg.learn_sigma, clip_denoised=clip_denoised)
        x, prev_x0 = result.x, result.x0
        if progress:
            progress(step + 1)
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Examples"):])
    parser.add_argument("checkpoint", help="a DiT Serve .safetensors checkpoint")
    parser.add_argument("--classes", nargs="+", metavar="CLASS",
                        help="class ids or names (default: the first 10 classes)")
    parser.add_argument("-n", "--num-images", type=int, default=1, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="number of inference steps (default: the checkpoint's)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the checkpoint's")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale, 1 = none (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--out", default="samples", help="folder for one PNG per image")
    parser.add_argument("--grid", help="write one grid PNG here instead of one file per image")
    parser.add_argument("--upscale", type=int, default=1, help="enlarge the grid by this factor (small models)")
    parser.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent-space checkpoints)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised together")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "upscale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    start = time.perf_counter()
    try:
        model, info = load_model(args.checkpoint, device=args.device)
    except CheckpointError as e:
        sys.exit(f"dit-sample: {e}")
    defaults = info.default_sampling  # what dit-eval measured for this checkpoint
    args.steps = defaults["num_inference_steps"] if args.steps is None else args.steps
    args.sampler = defaults["sampler"] if args.sampler is None else args.sampler
    args.guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    try:
        check_num_steps(args.steps)
    except ValueError as e:
        parser.error(str(e))
    vae = load_vae(args.vae, args.checkpoint, info.latent_scale, args.device) if info.space == "latent" else None
    try:
        class_ids = ([info.class_id(c) for c in args.classes] if args.classes
                     else list(range(min(info.config.num_classes, 10))))
    except ValueError as e:
        parser.error(str(e))
    if args.guidance != 1.0 and not info.config.supports_guidance:
        print(f"note: {args.checkpoint} was trained without label dropout; sampling unguided", file=sys.stderr)
    labels = [c for c in class_ids for _ in range(args.num_images)]

    images, done, total_steps = [], 0, len(labels) * args.steps
    denoise_start = time.perf_counter()
    for first in range(0, len(labels), args.batch_size):
        batch = labels[first:first + args.batch_size]

        def progress(step: int) -> None:
            finished = done + step * len(batch)
            print(f"\rdenoising: {finished}/{total_steps} image-steps", end="", file=sys.stderr, flush=True)

        x = sample(model, batch, args.seed, args.steps, args.sampler, args.guidance, eta=args.eta,
                   clip_denoised=info.space == "pixel", first_index=first, progress=progress)
        done += len(batch) * args.steps
        images.append(vae(x) if vae is not None else to_uint8(x))
    print(file=sys.stderr)
    denoise_seconds = time.perf_counter() - denoise_start

    images = np.concatenate(images)  # (N, H, W, C)
    if args.grid:
        rows_per_class = len(class_ids) > 1 and args.num_images > 1
        where = save_grid(images, args.grid, ncols=args.num_images if rows_per_class else None,
                          upscale=args.upscale)
    else:
        where = Path(args.out)
        where.mkdir(parents=True, exist_ok=True)
        for k, (label, image) in enumerate(zip(labels, images)):
            name = info.class_names[label].replace("/", "_").replace(" ", "_")
            to_pil(image).save(where / f"{k:04d}_{label}_{name}.png")
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
              if str(args.device).startswith("cuda") else "")
    print(f"{len(images)} images ({images.shape[2]}x{images.shape[1]}) of {len(class_ids)} classes, {args.steps} "
          f"{args.sampler} steps, guidance {args.guidance}: {len(images) / denoise_seconds:.2f} images/s "
          f"({denoise_seconds:.1f} s sampling, {time.perf_counter() - start:.1f} s total{memory}) -> {where}")


if __name__ == "__main__":
    main()
