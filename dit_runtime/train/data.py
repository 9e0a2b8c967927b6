"""Training data: the built-in digits, an image folder, or a latent file; and deterministic per-rank batches.

Every data set is held in memory as one tensor of model inputs in the model's value range ([-1, 1] pixels, or
VAE latents already multiplied by LATENT_SCALE) plus a label tensor: the sets this trainer is for are small
enough, and it makes the data position a pair of integers that a checkpoint can store exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import LATENT_SCALE

# scikit-learn's digit scans hold 0..16 ink levels on an 8x8 grid.
DIGITS_MAX_INK = 16.0
DIGITS_SIDE = 8
DIGIT_CLASS_NAMES = [str(i) for i in range(10)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
LATENT_FORMAT = "dit-serve-latents/1"


@dataclass
class TensorDataset:
    """Model inputs (N, C, H, W) in the model's value range, labels (N,) int64, and one name per class."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    space: str = "pixel"  # "pixel" or "latent"

    def __len__(self) -> int:
        return self.x.shape[0]


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 raw 8x8 scans (uint8, 0..16) and their labels, as scikit-learn ships them."""
    with resources.files("dit_runtime.train").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


def digits_to_model_space(images: np.ndarray | torch.Tensor, side: int) -> torch.Tensor:
    """8x8 ink levels (N, 8, 8) -> (N, 1, side, side) in [-1, 1], upsampled bilinearly.

    Why upsample: at 8x8 a patch-2 DiT sees only 16 tokens, and the served images would be too small to look at;
    16x16 gives 64 tokens (the same patch-2 design as the paper) and bilinear interpolation adds no detail that
    is not in the scan, so 2x2 average pooling brings a sample back to the classifier's 8x8 grid.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_INK  # (N, 1, 8, 8)
    if side != DIGITS_SIDE:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)  # (N, 1, side, side)
    return (x * 2 - 1).clamp(-1, 1)


def model_space_to_digits(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, 64) ink levels 0..16 on the scans' 8x8 grid (area downsampling)."""
    x = F.adaptive_avg_pool2d(x.float().clamp(-1, 1), DIGITS_SIDE)  # (N, 1, 8, 8)
    return ((x + 1) / 2 * DIGITS_MAX_INK).reshape(x.shape[0], -1)


def load_digits(image_size: int) -> TensorDataset:
    images, labels = load_digit_scans()
    return TensorDataset(digits_to_model_space(images, image_size), torch.as_tensor(labels, dtype=torch.int64),
                         list(DIGIT_CLASS_NAMES))


def load_image_folder(root: str | Path, image_size: int, channels: int) -> TensorDataset:
    """One sub-folder per class (sorted names = class ids); each image resized (short side) and centre-cropped."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"data.path: {root} has no sub-folders; put each class's images in its own sub-folder")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"image_folder data needs model.in_channels 1 or 3, got {channels}")
    xs, ys = [], []
    for cid, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"data.path: class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            with Image.open(p) as im:
                xs.append(np.asarray(resize_center_crop(im.convert(mode), image_size)))
            ys.append(cid)
    x = torch.from_numpy(np.stack(xs)).float() / 127.5 - 1  # (N, H, W[, C])
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    return TensorDataset(x.contiguous(), torch.tensor(ys, dtype=torch.int64), [d.name for d in class_dirs])


def resize_center_crop(image, size: int):
    """Resize so the short side is ``size`` (bicubic), then crop the centre ``size`` x ``size``."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_latents(path: str | Path, latents: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 vae: str) -> None:
    """Write a latent file: latents (N, C, h, w) already multiplied by LATENT_SCALE, labels, class names."""
    from safetensors.torch import save_file

    meta = {"format": LATENT_FORMAT, "class_names": json.dumps(class_names), "latent_scale": repr(LATENT_SCALE),
            "vae": vae}
    save_file({"latents": latents.float().contiguous(), "labels": labels.to(torch.int64).contiguous()},
              str(path), metadata=meta)


def load_latents(path: str | Path) -> TensorDataset:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: latent file not found: {path}; write one with dit-encode-latents")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != LATENT_FORMAT:
            raise ValueError(f"data.path: {path} is not a latent file from dit-encode-latents "
                             f"(format {meta.get('format')!r})")
        return TensorDataset(f.get_tensor("latents"), f.get_tensor("labels"), json.loads(meta["class_names"]),
                             space="latent")


def load_dataset(kind: str, path: str | None, image_size: int, channels: int) -> TensorDataset:
    """The data set a config names, as model-ready tensors."""
    if kind == "digits":
        if channels != 1:
            raise ValueError(f"digits are grey: model.in_channels must be 1, got {channels}")
        return load_digits(image_size)
    if kind == "image_folder":
        return load_image_folder(path, image_size, channels)
    if kind == "latents":
        return load_latents(path)
    raise ValueError(f"unknown data.kind {kind!r}; choose digits, image_folder or latents")


class ShardedBatches:
    """Micro-batches of indices for one rank: each epoch a seeded permutation, split round-robin across ranks.

    Like DistributedSampler with drop_last, every rank gets the same number of equal-size micro-batches, so
    collective ops line up; the position (epoch, batch_index) is all a checkpoint needs to resume mid-epoch.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = (num_items // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_items} items are too few for per_device_train_batch_size {batch_size} "
                             f"on {world_size} rank(s); lower the batch size")
        self.epoch, self.batch_index = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_items, generator=g)
        per_rank = self.num_items // self.world_size
        return perm[self.rank::self.world_size][:per_rank]

    def next(self) -> torch.Tensor:
        """The next micro-batch's indices (batch_size,)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._order = None
        if self._order is None:
            self._order = self._epoch_order()
        start = self.batch_index * self.batch_size
        self.batch_index += 1
        return self._order[start:start + self.batch_size]

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self._order = None
