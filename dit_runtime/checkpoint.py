"""safetensors checkpoints: our format in and out, with the metadata a server needs to serve them.

A checkpoint is one ``.safetensors`` file. Its tensors are the weights to serve under the model's own parameter
names (the EMA weights when training kept an EMA), optionally followed by ``raw.``-prefixed training weights.
Its header metadata (strings only, as safetensors requires) holds:

- ``format``: ``dit-serve/1``
- ``model_config``: the ``DiTConfig`` as JSON
- ``class_names``: JSON list, one name per class id (so a prompt such as ``"golden retriever"`` maps to a class)
- ``space``: ``pixel`` or ``latent``; ``latent_scale``: the VAE scale factor for latent models
- ``weights``: ``ema`` or ``raw``, which set the unprefixed tensors are
- ``training``: JSON record of how it was made (command, config, steps, seed, wall time, hardware, final loss)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import DiTConfig, DiTModel

FORMAT = "dit-serve/1"
# Scale of Stable Diffusion's VAE latents, which DiT was trained on (latents are multiplied by it).
LATENT_SCALE = 0.18215
RAW_PREFIX = "raw."

Space = Literal["pixel", "latent"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself besides its weights."""

    config: DiTConfig
    class_names: list[str]
    space: Space = "latent"
    latent_scale: float = LATENT_SCALE
    weights: Literal["ema", "raw"] = "ema"
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.config.num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.config.num_classes} classes")

    def class_id(self, name_or_id: str | int) -> int:
        """Map a class name (case-insensitive) or a class id, as text or int, to an id."""
        if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.strip().isdigit()):
            cid = int(name_or_id)
            if 0 <= cid < self.config.num_classes:
                return cid
            raise ValueError(f"class id {cid} is out of range [0, {self.config.num_classes - 1}]")
        wanted = str(name_or_id).strip().casefold()
        for cid, name in enumerate(self.class_names):
            if name.casefold() == wanted:
                return cid
        shown = ", ".join(repr(n) for n in self.class_names[:12]) + (" ..." if len(self.class_names) > 12 else "")
        raise ValueError(f"unknown class {name_or_id!r}; this model knows {shown}")

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model_config": json.dumps(self.config.to_dict()),
            "class_names": json.dumps(self.class_names),
            "space": self.space,
            "latent_scale": repr(self.latent_scale),
            "weights": self.weights,
            "training": json.dumps(self.training),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: str | os.PathLike) -> "CheckpointInfo":
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a DiT Serve checkpoint (metadata format is {meta.get('format')!r}, "
                                  f"expected {FORMAT!r}); convert it first with `dit-convert`")
        try:
            config = DiTConfig.from_dict(json.loads(meta["model_config"]))
            return cls(config=config, class_names=json.loads(meta["class_names"]), space=meta.get("space", "latent"),
                       latent_scale=float(meta.get("latent_scale", LATENT_SCALE)),
                       weights=meta.get("weights", "ema"), training=json.loads(meta.get("training", "{}")))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata: {e}") from None


def default_class_names(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: CheckpointInfo,
                    raw_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically: to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if raw_state_dict is not None:
        tensors.update({RAW_PREFIX + k: v.detach().contiguous().cpu() for k, v in raw_state_dict.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=info.to_metadata())
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the metadata of a checkpoint (no tensors)."""
    with _open(path) as f:
        return CheckpointInfo.from_metadata(f.metadata() or {}, path)


def _open(path: str | os.PathLike, device: str = "cpu"):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of a .safetensors checkpoint file")
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupted") from None


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu",
                    which: Literal["serve", "raw"] = "serve") -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Tensors and metadata of a checkpoint. ``which="raw"`` returns the raw training weights if stored."""
    tensors: dict[str, torch.Tensor] = {}
    with _open(path, device=str(device)) as f:
        info = CheckpointInfo.from_metadata(f.metadata() or {}, path)
        try:
            for key in f.keys():
                is_raw = key.startswith(RAW_PREFIX)
                if which == "raw" and is_raw:
                    tensors[key[len(RAW_PREFIX):]] = f.get_tensor(key)
                elif which == "serve" and not is_raw:
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: reading tensors failed ({e}); the file may be truncated") from None
    if which == "raw" and not tensors:
        raise CheckpointError(f"{path}: holds no raw training weights (only the {info.weights} set)")
    return tensors, info


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model config: " + "; ".join(problems))


def _few(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def build_model(config: DiTConfig, state: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype | None = None) -> DiTModel:
    """Build on the meta device and assign the given tensors: no second copy of the weights is allocated."""
    with torch.device("meta"):
        model = DiTModel.from_config(config)
    check_state_dict(state, model, source)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    if dtype is not None:
        model.pos_embed = model.pos_embed.to(torch.float32)  # kept in fp32; cast at use
    return model.eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               which: Literal["serve", "raw"] = "serve") -> tuple[DiTModel, CheckpointInfo]:
    """Load a checkpoint as a ready-to-run model in eval mode, plus its metadata."""
    state, info = load_state_dict(path, device=device, which=which)
    return build_model(info.config, state, str(path), dtype=dtype), info


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise a CheckpointError when the file's sha256 differs from the one its manifest records."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    actual = sha256_of(path)
    if actual != expected.lower():
        raise CheckpointError(f"{path}: sha256 {actual} does not match the manifest's {expected}; "
                              "the file was changed or damaged")
