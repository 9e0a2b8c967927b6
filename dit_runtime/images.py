"""Model outputs to image files: [-1, 1] tensors -> uint8 arrays -> PNGs and grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) or (C, H, W) -> uint8 (N, H, W, C) or (H, W, C); values outside are clipped."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()  # channels last


def to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 (H, W, C) image with 1 or 3 channels -> a PIL image (grey or RGB)."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1) or (H, W, 3) uint8 image, got shape {image.shape}")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, near-square by default."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = padding + (k // ncols) * (h + padding), padding + (k % ncols) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, ncols: int | None = None, upscale: int = 1) -> Path:
    """Save uint8 images (N, H, W, C) as one PNG grid; ``upscale`` enlarges it by an integer factor (nearest)."""
    grid = make_grid(images, ncols)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(path)
    return path
