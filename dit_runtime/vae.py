"""Latents -> images through a local diffusers ``AutoencoderKL`` (the VAE that DiT's latent models were trained in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .images import to_uint8


class LatentDecoder:
    """Decodes a latent-space checkpoint's samples (n, 4, h, w) into uint8 images (n, 8h, 8w, 3) (SD's VAE)."""

    def __init__(self, vae: torch.nn.Module, latent_scale: float):
        self.vae = vae.eval().requires_grad_(False)
        self.latent_scale = latent_scale

    @property
    def upsampling(self) -> int:
        """Image pixels per latent pixel along a side: 2 per decoder up-block after the first (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.out_channels

    @classmethod
    def load(cls, folder: str | Path, latent_scale: float, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "LatentDecoder":
        """Load from a diffusers model folder; errors say what is missing (folder, config.json, diffusers)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a diffusers AutoencoderKL folder (no config.json); give a local copy "
                             "of the VAE the model was trained with, e.g. stabilityai/sd-vae-ft-ema")
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ValueError("decoding latents needs the optional package diffusers (pip install diffusers)") from None
        return cls(AutoencoderKL.from_pretrained(str(folder)).to(device, dtype), latent_scale)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        param = next(self.vae.parameters())
        z = torch.as_tensor(latents).to(param.device, param.dtype)
        x = self.vae.decode(z / self.latent_scale).sample  # (n, 3, 8h, 8w) in [-1, 1]
        return to_uint8(x)
