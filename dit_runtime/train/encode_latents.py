"""``dit-encode-latents``: encode an image folder (one sub-folder per class) with a local diffusers VAE, once.

Training a latent-space DiT then reads the latent file (``data.kind: latents``) instead of running the VAE every
step. The stored latents are the posterior means times LATENT_SCALE (the fast-DiT practice; the paper's loop
samples the posterior each step, a difference far below the diffusion noise).

    dit-encode-latents --images data/train --vae /models/sd-vae-ft-ema --out data/train-latents.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import LATENT_SCALE
from .data import load_image_folder, save_latents
from .report import format_duration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dit-encode-latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image folder with one sub-folder per class")
    p.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL (config.json + weights)")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=256, help="resize + centre-crop side (default 256 -> 32x32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


@torch.no_grad()
def encode(images: torch.Tensor, vae, batch_size: int, device: torch.device) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> scaled latent means (N, C, H/f, W/f), with a progress line per batch."""
    out = []
    start = time.perf_counter()
    for i in range(0, images.shape[0], batch_size):
        batch = images[i:i + batch_size].to(device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.mean.float().cpu() * LATENT_SCALE)  # (B, C, h, w)
        done = min(i + batch_size, images.shape[0])
        rate = done / (time.perf_counter() - start)
        print(f"\rencoded {done}/{images.shape[0]} images, {rate:.1f} images/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        print("dit-encode-latents: needs diffusers (pip install diffusers)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    start = time.perf_counter()
    try:
        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        print(f"dit-encode-latents: cannot load a diffusers AutoencoderKL from --vae {args.vae}: {e}",
              file=sys.stderr)
        return 2
    try:
        data = load_image_folder(args.images, args.image_size, channels=3)
    except (FileNotFoundError, ValueError) as e:
        print(f"dit-encode-latents: {e}", file=sys.stderr)
        return 2
    latents = encode(data.x, vae, args.batch_size, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_latents(out, latents, data.y, data.class_names, vae=str(args.vae))
    print(f"dit-encode-latents: {latents.shape[0]} images of {len(data.class_names)} classes -> latents "
          f"{tuple(latents.shape[1:])} in {format_duration(time.perf_counter() - start)}; wrote {out} "
          f"({out.stat().st_size / 2**20:.1f} MB). Train with data.kind latents, data.path {out}, "
          f"model.input_size {latents.shape[-1]}, model.in_channels {latents.shape[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
