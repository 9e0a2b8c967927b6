"""``dit-sample``: generate class-conditional images from a checkpoint into PNG files or a grid.

Examples::

    dit-sample checkpoints/digits.safetensors --classes 0 3 7 -n 4 --grid digits.png
    dit-sample checkpoints/dit-xl-2-256.safetensors --classes "golden retriever" --vae ./sd-vae-ft-ema --out samples/

Each class is one request of n images to the serving engine (its offline loop, ``Engine.generate``), with the same
seed: ``dit-sample --classes 3 -n 2 --seed 1`` draws the images the API answers ``{"prompt": "3", "n": 2,
"seed": 1}`` with (up to the rounding of sums at other batch sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError, load_model
from ..decoders import load_vae
from . import add_checkpoint_argument, denoising_progress
from ..engine import Engine, EngineConfig, InvalidRequestError, RequestLimits
from ..images import save_grid, to_pil
from ..request import NUM_TRAIN_TIMESTEPS, SAMPLERS, rows_per_image


def vae_of(folder: str | None, checkpoint: str) -> torch.nn.Module:
    """The VAE of this latent-space checkpoint, with errors saying what is missing."""
    if folder is None:
        raise SystemExit(f"dit-sample: {checkpoint} denoises VAE latents (space=latent), so it needs a decoder: pass "
                         "--vae PATH to a local diffusers AutoencoderKL folder (config.json + weights, e.g. a "
                         "download of stabilityai/sd-vae-ft-ema)")
    try:
        return load_vae(folder)
    except ValueError as e:
        raise SystemExit(f"dit-sample: --vae {e}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Examples"):])
    add_checkpoint_argument(parser, "a DiT Serve .safetensors checkpoint")
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
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (at least -n)")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "upscale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    start = time.perf_counter()
    try:
        model, info = load_model(args.checkpoint, device=args.device)
    except CheckpointError as e:
        sys.exit(f"dit-sample: {e}")
    classes = args.classes or [str(c) for c in range(min(info.config.num_classes, 10))]
    rows = max(args.batch_size, args.num_images) * rows_per_image(null_row=True)  # fits them guided or not
    config = EngineConfig(device=args.device, max_batch_size=rows, max_queue_size=len(classes) * args.num_images,
                          limits=RequestLimits(max_images_per_request=args.num_images,
                                               max_inference_steps=NUM_TRAIN_TIMESTEPS))
    vae = vae_of(args.vae, args.checkpoint) if info.space == "latent" else None
    engine = Engine(model, info, config, vae=vae)
    try:  # the checkpoint's measured defaults fill in what was not given, as for a request to the server
        requests = [engine.spec.build_request(prompt=c, n=args.num_images, num_inference_steps=args.steps,
                                              sampler=args.sampler, guidance_scale=args.guidance, eta=args.eta,
                                              seed=args.seed) for c in classes]
    except InvalidRequestError as e:
        parser.error(str(e))
    sampling = requests[0].sampling
    engine.on_step = denoising_progress(len(requests) * args.num_images * sampling.num_inference_steps)
    denoise_start = time.perf_counter()
    results = engine.generate(requests)
    print(file=sys.stderr)
    denoise_seconds = time.perf_counter() - denoise_start
    labels = [c for r in requests for c in r.class_ids]
    images = np.concatenate([r.images for r in results])  # (N, H, W, C)
    if args.grid:
        rows_per_class = len(classes) > 1 and args.num_images > 1
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
    print(f"{len(images)} images ({images.shape[2]}x{images.shape[1]}) of {len(classes)} classes, "
          f"{sampling.num_inference_steps} {sampling.sampler} steps, guidance {sampling.guidance_scale:g}: "
          f"{len(images) / denoise_seconds:.2f} images/s "
          f"({denoise_seconds:.1f} s sampling, {time.perf_counter() - start:.1f} s total{memory}) -> {where}")


if __name__ == "__main__":
    main()
