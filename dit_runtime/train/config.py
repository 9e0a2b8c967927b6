"""The training config: five typed sections, loaded from YAML and overridden with ``--section.key value``.

Every field is checked once, here, against its type and allowed values, and an error names the field and what
it accepts. A field's ``help`` says why its default is what it is.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..contract import STUDENT_STEP_COUNTS
from ..model import DiTConfig, get_preset


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what it accepts."""


def _f(default: Any, help: str, *, low: float | None = None, high: float | None = None,
       high_open: bool = False) -> Any:
    """A documented field with an optional numeric range [low, high] (or [low, high) with ``high_open``)."""
    meta = {"help": help, "low": low, "high": high, "high_open": high_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """Which DiT to train: a preset, with any explicit dimension overriding the preset's."""

    preset: str | None = _f("dit-digits-s", "a name from dit_runtime.model.PRESETS; null to give every dimension")
    hidden_dim: int | None = _f(None, "token width; overrides the preset", low=4)
    num_layers: int | None = _f(None, "transformer blocks", low=1)
    num_heads: int | None = _f(None, "attention heads; must divide hidden_dim", low=1)
    ffn_dim: int | None = _f(None, "MLP inner width (4 x hidden_dim in the paper)", low=1)
    input_size: int | None = _f(None, "pixel or latent side length the model sees", low=1)
    patch_size: int | None = _f(None, "patch side; tokens = (input_size / patch_size) ** 2", low=1)
    in_channels: int | None = _f(None, "1 grey, 3 RGB, 4 SD-VAE latents", low=1)
    num_classes: int | None = _f(None, "class count; image_folder data sets it from its sub-folders", low=1)
    learn_sigma: bool | None = _f(None, "also learn the variance (adds the vb loss); off for the digit presets")
    class_dropout_prob: float | None = _f(None, "label dropout for classifier-free guidance (0.1 in the paper)",
                                          low=0.0, high=1.0, high_open=True)

    def to_dit_config(self, num_classes: int | None = None) -> DiTConfig:
        """The DiTConfig: the preset's values, overridden by every dimension given here."""
        base = get_preset(self.preset).to_dict() if self.preset else {}
        given = {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}
        if num_classes is not None and self.num_classes is None:
            given["num_classes"] = num_classes
        values = {**base, **given}
        if not self.preset:
            required = ("hidden_dim", "num_layers", "num_heads", "ffn_dim", "input_size", "patch_size",
                        "in_channels", "num_classes")
            missing = [k for k in required if k not in values]
            if missing:
                raise ConfigError(f"model.preset is null, so model.{', model.'.join(missing)} must be given")
        try:
            return DiTConfig(**values)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class DataSection:
    """Where the training images come from."""

    kind: Literal["digits", "image_folder", "latents"] = _f(
        "digits", "digits: the built-in scikit-learn scans; image_folder: one sub-folder per class; "
                  "latents: a file written by dit-encode-latents")
    path: str | None = _f(None, "the image folder or the latent file (not used by digits)")
    image_size: int | None = _f(None, "side length images are resized and centre-cropped to; "
                                      "default: model.input_size", low=1)


@dataclass
class DiffusionSection:
    """The noise schedule trained on, and the sampler settings the checkpoint recommends for serving."""

    num_timesteps: int = _f(1000, "training timesteps of the linear schedule (the paper's 1000)", low=2)
    loss_weighting: Literal["uniform", "min_snr"] = _f(
        "uniform", "uniform: the paper's noise MSE; min_snr: weight each timestep by min(SNR, gamma) / SNR "
                   "(Hang et al. 2023), which takes weight off nearly-clean timesteps")
    min_snr_gamma: float = _f(5.0, "gamma of min_snr weighting (5 in the paper)", low=0.0)
    sampler: Literal["ddpm", "ddim", "dpm-solver++"] = _f(
        "dpm-solver++", "default sampler stored in the checkpoint: DPM-Solver++(2M) is good in 20-25 steps")
    num_inference_steps: int = _f(25, "default sampling steps stored in the checkpoint", low=1, high=1000)
    guidance_scale: float = _f(2.0, "default classifier-free guidance stored in the checkpoint (1 = none)",
                               low=1.0, high=20.0)


@dataclass
class TrainerSection:
    """Optimisation: batch, precision, learning rate, EMA and how long to train."""

    per_device_train_batch_size: int = _f(64, "images per device per micro-batch", low=1)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step; global batch = "
                                             "per_device_train_batch_size x this x world size", low=1)
    bf16: bool = _f(False, "bf16 autocast for forward and backward; weights and optimiser stay fp32")
    gradient_checkpointing: bool = _f(False, "recompute each block in backward: less memory, ~30% more compute")
    learning_rate: float = _f(1e-4, "AdamW peak learning rate (the paper's 1e-4)", low=0.0, high=1.0)
    warmup_steps: int = _f(0, "linear learning-rate warm-up from 0, in optimiser steps", low=0)
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "after warm-up: constant (the paper) or cosine "
                                                                "decay to 10% at the last step")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (the paper uses 0)", low=0.0, high=1.0)
    label_embedding_lr_scale: float = _f(1.0, "learning-rate multiplier for the class-label embedding table; "
                                              "short runs learn class conditioning sooner with > 1", low=0.0)
    adam_beta2: float = _f(0.999, "AdamW beta2", low=0.0, high=1.0, high_open=True)
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping", low=0.0)
    ema_decay: float = _f(0.9999, "EMA of weights, served instead of the raw weights. 0.9999 (the paper) "
                                  "averages ~10k steps: right for 400k-step runs; a few-thousand-step run "
                                  "needs ~0.999 or its EMA is still mostly the initial weights",
                          low=0.0, high=1.0, high_open=True)
    ema_warmup: bool = _f(True, "use min(ema_decay, (1 + step) / (10 + step)) as the decay, so the EMA of a short "
                                "run is not mostly its initial weights; false = the paper's fixed decay")
    seed: int = _f(0, "seeds weights, data order, timesteps and noise; rank r adds r to it", low=0)
    max_steps: int = _f(0, "optimiser steps to train; 0 = use epochs", low=0)
    epochs: float = _f(0.0, "passes over the data when max_steps is 0", low=0.0)
    log_every: int = _f(20, "optimiser steps between log lines and JSONL records", low=1)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available (one GPU per rank)")


@dataclass
class CheckpointingSection:
    """What is written, where and how often."""

    output_dir: str = _f("runs/train", "checkpoints, logs and the loss plot go here")
    save_every: int = _f(500, "optimiser steps between checkpoints (one is always written at the end)", low=1)
    keep_last: int = _f(2, "step checkpoints kept in output_dir/checkpoints; older ones are deleted", low=1)
    save_raw_weights: bool = _f(False, "also store the raw (non-EMA) weights in the servable file, as raw.*")
    final_name: str = _f("model.safetensors", "file name of the final servable checkpoint in output_dir")
    class_names: list[str] | None = _f(None, "one name per class id; default: the data's own names "
                                             "(digits: '0'..'9'; image_folder: the sub-folder names)")


def _check_run(t: TrainerSection, data: DataSection) -> None:
    """The checks every run's config needs: how long it trains, and where its data is."""
    if t.max_steps == 0 and t.epochs == 0:
        raise ConfigError("set trainer.max_steps (optimiser steps) or trainer.epochs (passes over the data); "
                          "both are 0")
    if data.kind != "digits" and not data.path:
        raise ConfigError(f"data.kind is {data.kind!r}, so data.path must name the "
                          f"{'image folder' if data.kind == 'image_folder' else 'latent file'}")


@dataclass
class TrainConfig:
    """The whole training config."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    checkpointing: CheckpointingSection = field(default_factory=CheckpointingSection)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Checks across fields (each field's own type and range were checked when it was set)."""
        _check_run(self.trainer, self.data)
        d = self.diffusion
        if d.num_inference_steps > d.num_timesteps:
            raise ConfigError(f"diffusion.num_inference_steps ({d.num_inference_steps}) must be at most "
                              f"diffusion.num_timesteps ({d.num_timesteps}): a sampler takes at most one step per "
                              "training timestep")
        if self.model.preset is not None:
            try:
                get_preset(self.model.preset)
            except ValueError as e:
                raise ConfigError(f"model.preset: {e}") from None
        if self.model.preset is not None or self.model.num_classes is not None or self.data.kind == "digits":
            config = self.model.to_dit_config(num_classes=10 if self.data.kind == "digits" else None)
            names = self.checkpointing.class_names
            if names is not None and len(names) != config.num_classes:
                raise ConfigError(f"checkpointing.class_names has {len(names)} names for "
                                  f"{config.num_classes} classes")


@dataclass
class DistillSection:
    """The student: how many steps it is trained for, over which guidance, against which teacher step."""

    segments: int = _f(4, "consistency segments: the step count the student is trained for (1, 2, 4 or 8), and "
                          "its default", low=1, high=8)
    segment_counts: list[int] | None = _f(None, "train for each of these step counts at once, the count an input of "
                                                "the student (their boundaries nest on the teacher grid), and serve "
                                                "only these; default: segments alone, served at 1, 2, 4 and 8")
    teacher_steps: int = _f(40, "the teacher's DDIM solver grid, in steps over its schedule: each target is one "
                                "teacher step of num_timesteps / teacher_steps timesteps (25 of 1000; LCM skips 20); "
                                "a multiple of segments, so the segments' boundaries lie on the grid", low=1)
    min_guidance_scale: float = _f(1.0, "lowest guidance scale drawn in training (1 = unguided)", low=1.0, high=20.0)
    max_guidance_scale: float = _f(4.0, "highest guidance scale drawn; the student serves [1, this]", low=1.0,
                                   high=20.0)
    default_guidance_scale: float | None = _f(None, "the student's recommended scale; default: the teacher's, "
                                                    "within [min, max]", low=1.0, high=20.0)
    loss: Literal["pseudo-huber", "l2"] = _f("pseudo-huber", "pseudo-Huber (Song & Dhariwal 2023): L2 near zero, "
                                                             "L1 for outliers; l2: the mean squared error")
    huber_c: float | None = _f(None, "pseudo-Huber's c; default 0.00054 x sqrt(values per image), their choice",
                               low=0.0)
    target_ema_decay: float = _f(0.95, "EMA of the student that makes the targets (LCM's 0.95): slow enough to keep "
                                       "them steady, fast enough to follow the student", low=0.0, high=1.0,
                                 high_open=True)


@dataclass
class DistillConfig:
    """The whole distillation config: the student's section, then dit-train's data, trainer and checkpointing."""

    distill: DistillSection = field(default_factory=DistillSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    checkpointing: CheckpointingSection = field(default_factory=lambda: CheckpointingSection(
        output_dir="runs/distill"))

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Checks across fields (each field's own type and range were checked when it was set)."""
        _check_run(self.trainer, self.data)
        d = self.distill
        for name, count in [("segments", d.segments)] + [("segment_counts", n) for n in d.segment_counts or []]:
            if count not in STUDENT_STEP_COUNTS:
                raise ConfigError(f"distill.{name} must be one of {', '.join(map(str, STUDENT_STEP_COUNTS))} (the "
                                  f"step counts a student serves), got {count}")
            if d.teacher_steps % count:
                raise ConfigError(f"distill.teacher_steps ({d.teacher_steps}) must be a multiple of distill.{name} "
                                  f"({count}), so every segment boundary is a teacher grid timestep")
        if d.segment_counts is not None:
            if d.segments not in d.segment_counts or len(set(d.segment_counts)) != len(d.segment_counts):
                raise ConfigError(f"distill.segment_counts ({d.segment_counts}) must list distinct counts including "
                                  f"distill.segments ({d.segments}), the default")
        if d.default_guidance_scale is not None and not \
                d.min_guidance_scale <= d.default_guidance_scale <= d.max_guidance_scale:
            raise ConfigError(f"distill.default_guidance_scale ({d.default_guidance_scale:g}) must be within "
                              f"[distill.min_guidance_scale, distill.max_guidance_scale]")
        if d.min_guidance_scale > d.max_guidance_scale:
            raise ConfigError(f"distill.min_guidance_scale ({d.min_guidance_scale:g}) must be <= "
                              f"distill.max_guidance_scale ({d.max_guidance_scale:g})")


def sections(config_type: type) -> dict[str, type]:
    """The sections of a config class (``TrainConfig``, ``distill.DistillConfig``): name -> section class."""
    return {f.name: f.default_factory for f in fields(config_type)}  # type: ignore[misc]




def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_optional(tp):
        return _type_name(_inner(tp)) + " or null"
    if get_origin(tp) is list:
        return "a list of " + _type_name(get_args(tp)[0])
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _inner(tp: Any) -> Any:
    return next(a for a in get_args(tp) if a is not type(None))


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``where`` and what it accepts."""
    bad = ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if _is_optional(tp):
        return None if value is None else _coerce(where, _inner(tp), value)
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if get_origin(tp) is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(f"{where}[{i}]", get_args(tp)[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


def _check_range(where: str, meta: dict, value: Any) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    low, high, high_open = meta.get("low"), meta.get("high"), meta.get("high_open")
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{where}: {value!r} is out of range [{lo}, {hi}{')' if high_open else ']'}")


def set_value(config, dotted: str, value: Any) -> None:
    """Set ``section.key`` of a config to ``value`` (already parsed), checking the key, the type and the range."""
    section_name, _, key = dotted.partition(".")
    names = sections(type(config))
    if section_name not in names or not key:
        raise ConfigError(f"unknown config key {dotted!r}: keys are section.key with section one of "
                          f"{', '.join(names)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    by_name = {f.name: f for f in fields(section)}
    if key not in by_name:
        raise ConfigError(f"unknown config key {dotted!r}; {section_name} has: {', '.join(by_name)}")
    typed = _coerce(dotted, hints[key], value)
    _check_range(dotted, by_name[key].metadata, typed)
    setattr(section, key, typed)


def from_dict(values: dict, config_type: type = TrainConfig):
    """A config from nested ``{section: {key: value}}``, every key and value checked."""
    config = config_type()
    names = sections(config_type)
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping of sections ({', '.join(names)}), got {values!r}")
    for section_name, section_values in values.items():
        if section_name not in names:
            raise ConfigError(f"unknown config section {section_name!r}; sections: {', '.join(names)}")
        if not isinstance(section_values, dict):
            raise ConfigError(f"config section {section_name!r} must be a mapping of key: value")
        for key, value in section_values.items():
            set_value(config, f"{section_name}.{key}", value)
    return config


def parse_override_value(text: str) -> Any:
    """A command-line value parsed as YAML (``40`` -> 40, ``true`` -> True, ``null`` -> None, ``[a, b]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Command-line ``--section.key value`` (or ``--section.key=value``) tokens -> ``(dotted_key, text)`` in order."""
    overrides = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key value "
                              "(e.g. --trainer.max_steps 40)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{token} needs a value")
            value = tokens[i + 1]
            i += 1
        overrides.append((key, value))
        i += 1
    return overrides


def load_config(path: str | Path | None, overrides: list[tuple[str, str]] = (), config_type: type = TrainConfig):
    """Load a YAML config (or the defaults when ``path`` is None), apply ``(dotted_key, text)`` overrides,
    and validate the result."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        config = from_dict(values, config_type)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for dotted, text in overrides:
        set_value(config, dotted, parse_override_value(text))
    config.validate()
    return config


def describe(config_type: type = TrainConfig) -> str:
    """Every key with its type, default and help, for ``--help-config``."""
    lines = []
    for section_name, cls in sections(config_type).items():
        lines.append(f"{section_name}:  # {cls.__doc__}")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {_type_name(hints[f.name])}; {f.metadata.get('help', '')}")
    return "\n".join(lines)
