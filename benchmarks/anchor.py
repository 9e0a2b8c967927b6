"""The served latent student's anchor: what a diffusers user gets in one process from the same DiT and decoder.

    python -m benchmarks anchor [--steps 4] [--batches 16 64 128] [--rounds 5]   # on a GPU host, diffusers installed

For each batch of B images, from random latents: ``--steps`` guided DDIM steps of diffusers' ``DiTTransformer2DModel``
at ``dit-10l``'s dimensions (random weights, fp16, torch.compile; 2B rows a forward, the class and the null class),
then diffusers' ``AutoencoderKL`` decoder of sd-vae-ft-ema's configuration (random weights, fp16, torch.compile,
channels-last) to 256x256 images, then uint8 and Pillow's PNG (its default compression, as ``Image.save`` writes it)
on a thread pool of the host's cores. Issue 29 holds the served student (HTTP, encoded) to 1.3x the best batch's
images/s here. Each row: images/s (median over ``--rounds``), and the milliseconds per batch of the DiT steps, the
decode with the copy to the host, and the encoding (the stages are timed apart, a synchronisation between them), so
the decoder's share of an image's GPU time reads off the row. ``--config tiny`` is a small DiT and VAE for the CPU
tests. Rows go to ``OUT/anchor.jsonl`` as they are measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .decode import SD_VAE_CONFIG, TINY_VAE_CONFIG, random_vae
from .engine import diffusers_dit_arguments

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)  # for the CPU tests


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class Anchor:
    """diffusers' DiT, its DDIM scheduler and a VAE decoder, guided, as one batch call."""

    def __init__(self, config: str, steps: int, guidance: float, device: torch.device, compile: bool):
        from diffusers import DDIMScheduler, DiTTransformer2DModel

        self.device, self.guidance = device, guidance
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        arguments = TINY_DIT if config == "tiny" else diffusers_dit_arguments(config)
        self.null_class = arguments["num_embeds_ada_norm"]  # diffusers' DiT: the class count is the null label
        dit = DiTTransformer2DModel(**arguments).to(device, self.dtype).eval().requires_grad_(False)
        vae = random_vae(SD_VAE_CONFIG if config != "tiny" else TINY_VAE_CONFIG).to(device, self.dtype)
        vae = vae.to(memory_format=torch.channels_last).requires_grad_(False)
        self.channels, self.side = dit.config.in_channels, dit.config.sample_size
        self.dit = torch.compile(dit) if compile else dit
        self.decoder = torch.compile(lambda z: vae.decode(z).sample) if compile else (lambda z: vae.decode(z).sample)
        self.scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
        self.scheduler.set_timesteps(steps)
        self.scale = vae.config.scaling_factor
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1)  # Pillow's encoder lets go of the GIL

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def __call__(self, batch: int, seed: int) -> tuple[list[bytes], dict[str, float]]:
        """``batch`` PNG files, and the seconds of each stage."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(batch, self.channels, self.side, self.side, generator=g, device=self.device, dtype=self.dtype)
        labels = torch.randint(0, self.null_class, (batch,), generator=g, device=self.device)
        y = torch.cat([labels, torch.full_like(labels, self.null_class)])
        times, start = {}, time.perf_counter()
        for t in self.scheduler.timesteps:
            out = self.dit(torch.cat([x, x]), t.expand(2 * batch).to(self.device), y, return_dict=False)[0]
            cond, uncond = out[:, :self.channels].chunk(2)
            x = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        self.sync()
        times["dit_ms"], start = 1000 * (time.perf_counter() - start), time.perf_counter()
        images = self.decoder((x / self.scale).contiguous(memory_format=torch.channels_last))
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        times["decode_ms"], start = 1000 * (time.perf_counter() - start), time.perf_counter()
        files = list(self.pool.map(png, pixels))
        times["encode_ms"] = 1000 * (time.perf_counter() - start)
        return files, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks anchor", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["dit-10l", "tiny"], default="dit-10l")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="eager (the CPU tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    anchor = Anchor(a.config, a.steps, a.guidance, torch.device(a.device), compile=not a.no_compile)
    for batch in a.batches:
        start = time.perf_counter()
        anchor(batch, seed=0)  # compiles this batch's programs
        first = time.perf_counter() - start
        rounds = [anchor(batch, seed=i + 1) for i in range(a.rounds)]
        totals = [sum(times.values()) for _, times in rounds]
        files = rounds[-1][0]
        row = {"part": "anchor", "config": a.config, "device": a.device, "steps": a.steps, "guidance": a.guidance,
               "batch": batch, "images_per_s": round(1000 * batch / statistics.median(totals), 1),
               **{k: round(statistics.median(t[k] for _, t in rounds), 3) for k in rounds[0][1]},
               "first_call_s": round(first, 1), "png_bytes_mean": int(np.mean([len(f) for f in files])),
               "image_shape": list(Image.open(io.BytesIO(files[0])).size), "rounds": a.rounds}
        with open(a.out / "anchor.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0
