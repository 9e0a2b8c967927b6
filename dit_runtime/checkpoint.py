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
- ``sampling``: the ``SamplingContract`` as JSON (contract.py): schedule, prediction, samplers, step counts, guidance,
  recommended settings, teacher; derived from ``training`` for files written before it was recorded
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .contract import SamplingContract
from .model import PRESETS, DiTConfig, DiTModel
from .request import Space, lookup_class

FORMAT = "dit-serve/1"
# Scale of Stable Diffusion's VAE latents, which DiT was trained on (latents are multiplied by it).
LATENT_SCALE = 0.18215
RAW_PREFIX = "raw."


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
    sampling: SamplingContract | None = None  # None: derived from ``training`` (a file from before contracts)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.config.num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.config.num_classes} classes")
        if self.sampling is None:
            self.sampling = SamplingContract.derive(self.training, self.config.supports_guidance)
        if (self.sampling.guidance == "embedded") != self.config.guidance_embed:
            raise ValueError(f"the sampling contract's guidance is {self.sampling.guidance!r}, but the model "
                             f"{'has' if self.config.guidance_embed else 'has no'} guidance embedding")

    def class_id(self, name_or_id: str | int) -> int:
        """Map a class name (case-insensitive) or a class id, as text or int, to an id."""
        return lookup_class(self.class_names, name_or_id)

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model_config": json.dumps(self.config.to_dict()),
            "class_names": json.dumps(self.class_names),
            "space": self.space,
            "latent_scale": repr(self.latent_scale),
            "weights": self.weights,
            "training": json.dumps(self.training),
            "sampling": self.sampling.to_json(),
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
                       weights=meta.get("weights", "ema"), training=json.loads(meta.get("training", "{}")),
                       sampling=SamplingContract.from_json(meta["sampling"]) if "sampling" in meta else None)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata: {e}") from None


def default_class_names(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: CheckpointInfo,
                    raw_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a servable checkpoint atomically (see ``atomic_save``)."""
    tensors = dict(state_dict)
    if raw_state_dict is not None:
        tensors.update({RAW_PREFIX + k: v for k, v in raw_state_dict.items()})
    return atomic_save(path, tensors, info.to_metadata())


def atomic_save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                before_rename: Callable[[Path], None] | None = None) -> Path:
    """safetensors written to a temporary file in the same folder, fsynced, then renamed over ``path`` (and the
    folder fsynced): a crash at any moment leaves either the old file or the new one, never a torn one.
    ``before_rename`` (tests) runs with the finished temporary file just before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _fsync(tmp)
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename survives a crash), to disk."""
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
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupted") \
            from None


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
    model = DiTModel.on_meta(config)
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


# --------------------------------------------------------------------------------------------------------------
# Imports of other layouts: the paper repository's ``.pt`` state dicts and diffusers' DiTTransformer2DModel.


@dataclass
class ImportedWeights:
    """Weights in our layout plus the config inferred for them, and notes a user should read."""

    state_dict: dict[str, torch.Tensor]
    config: DiTConfig
    notes: list[str] = field(default_factory=list)


def _infer_config(state: dict[str, torch.Tensor], source: str, num_heads: int | None,
                  input_size: int | None) -> tuple[DiTConfig, list[str]]:
    """A DiTConfig from weight shapes in our (= the paper's) layout. Heads are not in the shapes: take them from
    ``num_heads`` or from the one preset whose shapes match; the null class is inferred from the table size."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: no tensor {key!r}; this is not a DiT state dict "
                                  f"(found e.g. {_few(sorted(state), 4)})")
        return tuple(state[key].shape)

    hidden_dim, in_channels, patch_size, _ = shape("x_embedder.proj.weight")
    num_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    ffn_dim = shape("blocks.0.mlp.fc1.weight")[0]
    out_channels = shape("final_layer.linear.weight")[0] // patch_size ** 2
    table_rows = shape("y_embedder.embedding_table.weight")[0]
    notes = []
    if input_size is None:
        if "pos_embed" not in state:
            raise CheckpointError(f"{source}: has no pos_embed, so the input size is unknown; pass --input-size")
        input_size = math.isqrt(shape("pos_embed")[1]) * patch_size
    if num_heads is None:
        matches = {c.num_heads for c in PRESETS.values()
                   if (c.hidden_dim, c.num_layers, c.ffn_dim) == (hidden_dim, num_layers, ffn_dim)}
        if len(matches) != 1:
            raise CheckpointError(f"{source}: the number of attention heads cannot be read from the weights and no "
                                  f"single preset has hidden_dim={hidden_dim}, num_layers={num_layers}, "
                                  f"ffn_dim={ffn_dim}; pass --num-heads")
        num_heads = matches.pop()
        notes.append(f"num_heads={num_heads} taken from the preset with the same shapes")
    # The paper's tables have one extra row, the null class, when trained with label dropout.
    num_classes = table_rows - 1 if table_rows > 1 else table_rows
    notes.append(f"label table of {table_rows} rows read as {num_classes} classes + the null class")
    try:
        config = DiTConfig(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                           input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels,
                           class_dropout_prob=0.1 if table_rows > 1 else 0.0)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config, notes


def import_paper_checkpoint(path: str | os.PathLike, num_heads: int | None = None,
                            input_size: int | None = None) -> ImportedWeights:
    """Read a facebookresearch/DiT ``.pt`` (a state dict, or a training checkpoint's ``ema``/``model`` entry).

    Read with ``weights_only=True``: tensors and plain containers only, never arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: holds a pickled object ({refused.group(1) if refused else 'not a tensor'}) that a weights-only "
            "load refuses, and nothing else is ever unpickled. If you trust the file, save just its state dict "
            "(e.g. torch.save(ckpt['ema'], 'ema.pt')) and convert that") from None
    except (RuntimeError, EOFError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({first_line}); it may be truncated or "
                              "corrupted") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for entry in ("ema", "model"):  # train.py checkpoints: the EMA weights are the ones to serve
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    config, notes = _infer_config(state, str(path), num_heads, input_size)
    if "pos_embed" not in state:
        state["pos_embed"] = DiTModel.on_meta(config).pos_embed
        notes.append("pos_embed was not saved; recomputed (it is fixed, not learned)")
    return ImportedWeights(state, config, notes)


def _same_in_every_block(sd: dict[str, torch.Tensor], name: str, num_layers: int, source: str) -> torch.Tensor:
    """diffusers keeps one timestep/class embedder per block; ours is shared, so all copies must be equal."""
    first = sd[f"transformer_blocks.0.norm1.emb.{name}"]
    for i in range(1, num_layers):
        other = sd[f"transformer_blocks.{i}.norm1.emb.{name}"]
        if other.shape != first.shape or not torch.equal(other, first):
            raise CheckpointError(
                f"{source}: block {i}'s embedder weight norm1.emb.{name} differs from block 0's; DiT shares one "
                "timestep/class embedder across blocks, so this model has no equivalent in the DiT layout")
    return first


def _diffusers_to_ours(sd: dict[str, torch.Tensor], num_layers: int,
                       source: str) -> dict[str, torch.Tensor]:
    """Rename diffusers' DiT tensors to ours (consuming ``sd``); anything left over is an error."""
    new = {"x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
           "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias")}
    emb = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2"}
    for ours, theirs in emb.items():
        for p in ("weight", "bias"):
            new[f"{ours}.{p}"] = _same_in_every_block(sd, f"{theirs}.{p}", num_layers, source)
    new["y_embedder.embedding_table.weight"] = _same_in_every_block(
        sd, "class_embedder.embedding_table.weight", num_layers, source)
    per_block = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
                 "mlp.fc2": "ff.net.2"}
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            for ours, theirs in per_block.items():
                new[f"{dst}{ours}.{p}"] = sd.pop(f"{src}{theirs}.{p}")
            new[f"{dst}attn.qkv.{p}"] = torch.cat([sd.pop(f"{src}attn1.to_{k}.{p}") for k in "qkv"])
        for key in [k for k in sd if k.startswith(f"{src}norm1.emb.")]:
            del sd[key]  # checked equal to block 0's above
    for p in ("weight", "bias"):
        new[f"final_layer.adaLN_modulation.1.{p}"] = sd.pop(f"proj_out_1.{p}")
        new[f"final_layer.linear.{p}"] = sd.pop(f"proj_out_2.{p}")
    sd.pop("pos_embed.pos_embed", None)  # recomputed below; it is fixed
    if sd:
        raise CheckpointError(f"{source}: tensors with no place in the DiT layout: {_few(sorted(sd))}")
    return new


def import_diffusers_folder(folder: str | os.PathLike) -> ImportedWeights:
    """Convert a diffusers ``DiTTransformer2DModel`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{folder}: not a diffusers DiTTransformer2DModel folder ({needed.name} is missing)")
    try:
        dconf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if dconf.get("_class_name", "DiTTransformer2DModel") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise CheckpointError(f"{config_path}: is a {dconf['_class_name']}, expected DiTTransformer2DModel")
    if dconf.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or dconf.get("norm_elementwise_affine"):
        raise CheckpointError(f"{config_path}: norm_type {dconf.get('norm_type')!r} / norm_elementwise_affine "
                              f"{dconf.get('norm_elementwise_affine')!r}; only DiT's ada_norm_zero without affine "
                              "norms converts")
    with _open(weights_path) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    source = str(folder)
    try:
        num_layers = int(dconf["num_layers"])
        new = _diffusers_to_ours(sd, num_layers, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing {e}; not a complete DiTTransformer2DModel") from None
    in_channels = int(dconf["in_channels"])
    table_rows = new["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(dconf["num_embeds_ada_norm"])
    try:
        config = DiTConfig(hidden_dim=int(dconf["num_attention_heads"]) * int(dconf["attention_head_dim"]),
                           num_layers=num_layers, num_heads=int(dconf["num_attention_heads"]),
                           ffn_dim=new["blocks.0.mlp.fc1.weight"].shape[0], input_size=int(dconf["sample_size"]),
                           patch_size=int(dconf["patch_size"]), in_channels=in_channels, num_classes=num_classes,
                           learn_sigma=int(dconf.get("out_channels") or in_channels) == 2 * in_channels,
                           class_dropout_prob=0.1 if table_rows > num_classes else 0.0)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model = DiTModel.on_meta(config)
    new["pos_embed"] = model.pos_embed
    check_state_dict(new, model, source)
    notes = ["converted to the paper's function, which differs from diffusers' in two details: the timestep "
             "frequencies exp(-ln(10000) i/half) (diffusers: i/(half-1), downscale_freq_shift=1) and LayerNorm eps "
             f"1e-6 in every norm (diffusers' norm2 uses norm_eps={dconf.get('norm_eps', 1e-5)})"]
    return ImportedWeights(new, config, notes)
