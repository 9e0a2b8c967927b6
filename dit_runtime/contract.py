"""The sampling contract: how a checkpoint's model must be sampled, recorded in the checkpoint by its trainer.

One typed record says what the weights alone cannot: the noise schedule the model was trained on, what its output
predicts, which samplers and step counts it supports, how guidance is applied (a null-class row beside each image,
or an input of the model) and over which range, the settings it recommends, and for a distilled student, its
teacher. ``dit-train`` and ``dit-distill`` write it; the runner builds its schedule from it and ``ModelSpec`` holds
requests to it. A deployment's own defaults are merged over it in one place, ``with_overrides``.

Checkpoints written before the record existed still load: ``SamplingContract.derive`` reads theirs from the training
config they recorded. No torch here: the API's processes import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

from .request import (CACHE_POLICIES, MAX_GUIDANCE_SCALE, NUM_TRAIN_TIMESTEPS, SAMPLERS, InvalidRequestError,
                      SamplingParams, check_guidance)

# What the model's output is: "epsilon" the noise (the paper's DiT); "consistency" a student's output read through the
# boundary-condition form x0 = c_skip(t) x + c_out(t) F (diffusion.consistency_x0), sampled with the "consistency"
# sampler.
Prediction = Literal["epsilon", "consistency"]
# "null-row": classifier-free guidance from a conditional and a null-class row per image (two rows); "embedded": the
# scale is an input of the model (one row); "none": the model has no null class and takes no guidance.
GuidanceMode = Literal["null-row", "embedded", "none"]
GUIDANCE_MODES = ("null-row", "embedded", "none")
Schedule = Literal["linear"]
# Samplers of a model that predicts noise; a student has its own (request.SAMPLERS lists every one).
EPSILON_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
# Step counts a consistency student is trained to be sampled at (its segments) and those it is measured at.
STUDENT_STEP_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Teacher:
    """Where a distilled student came from."""

    checkpoint: str  # the teacher's file name as given to dit-distill
    sha256: str
    method: str  # e.g. "multistep-consistency"
    segments: int  # the consistency segments trained (the step count the student is best at)


@dataclass(frozen=True)
class SamplingContract:
    """How a model is sampled: its schedule, output, samplers, step counts, guidance and recommended settings."""

    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS  # length of the linear beta schedule trained on
    schedule: Schedule = "linear"
    prediction: Prediction = "epsilon"
    samplers: tuple[str, ...] = EPSILON_SAMPLERS
    step_counts: tuple[int, ...] | None = None  # None: any count in [1, num_train_timesteps]
    guidance: GuidanceMode = "null-row"
    max_guidance_scale: float = MAX_GUIDANCE_SCALE  # guidance_scale runs over [1, this]; 1 for "none"
    feature_cache: bool = True  # whether the `cache` presets other than "off" apply (they skip steps of many)
    defaults: SamplingParams = SamplingParams()  # recommended settings (measured with dit-eval)
    teacher: Teacher | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            problems.append(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.schedule != "linear":
            problems.append(f"schedule must be 'linear', got {self.schedule!r}")
        if self.prediction not in ("epsilon", "consistency"):
            problems.append(f"prediction must be epsilon or consistency, got {self.prediction!r}")
        if not self.samplers or any(s not in SAMPLERS for s in self.samplers):
            problems.append(f"samplers must be some of {', '.join(SAMPLERS)}, got {self.samplers!r}")
        if self.guidance not in GUIDANCE_MODES:
            problems.append(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.guidance!r}")
        top = 1.0 if self.guidance == "none" else MAX_GUIDANCE_SCALE
        if not isinstance(self.max_guidance_scale, (int, float)) or not 1.0 <= self.max_guidance_scale <= top:
            problems.append(f"max_guidance_scale must be in [1, {top:g}] with guidance {self.guidance}, got "
                            f"{self.max_guidance_scale!r}")
        if self.step_counts is not None and (not self.step_counts or any(
                not isinstance(n, int) or not 1 <= n <= self.num_train_timesteps for n in self.step_counts)):
            problems.append(f"step_counts must be step counts in [1, {self.num_train_timesteps}], got "
                            f"{self.step_counts!r}")
        if problems:
            raise ValueError("invalid sampling contract: " + "; ".join(problems))
        try:
            self.check(self.defaults)
        except InvalidRequestError as e:
            raise ValueError(f"invalid sampling contract: its default {e.field} is outside it: {e}") from None

    @property
    def max_inference_steps(self) -> int:
        return max(self.step_counts) if self.step_counts else self.num_train_timesteps

    @property
    def cache_presets(self) -> tuple[str, ...]:
        return tuple(CACHE_POLICIES) if self.feature_cache else ("off",)

    def check(self, sampling: SamplingParams, max_steps: int | None = None,
              max_guidance_scale: float | None = None) -> None:
        """Raise ``InvalidRequestError`` naming the field when ``sampling`` asks what this model does not support;
        ``max_steps`` and ``max_guidance_scale`` are a deployment's tighter limits."""
        steps = sampling.num_inference_steps
        if self.step_counts is not None:
            allowed = [n for n in self.step_counts if max_steps is None or n <= max_steps]
            if steps not in allowed:
                raise InvalidRequestError("num_inference_steps", f"num_inference_steps must be one of "
                                                                 f"{', '.join(map(str, allowed))} for this model "
                                                                 f"(a distilled student), got {steps!r}")
        else:
            high = min(self.num_train_timesteps, max_steps or self.num_train_timesteps)
            if steps > high:
                raise InvalidRequestError("num_inference_steps", f"num_inference_steps must be an integer in "
                                                                 f"[1, {high}], got {steps!r}")
        if sampling.sampler not in self.samplers:
            kind = "a distilled student" if self.teacher is not None else "a model that predicts noise"
            raise InvalidRequestError("sampler", f"sampler must be one of {', '.join(self.samplers)} for this model "
                                                 f"({kind}), got {sampling.sampler!r}")
        if self.guidance == "none" and sampling.guidance_scale != 1.0:
            raise InvalidRequestError("guidance_scale", "this model was trained without label dropout, so it has "
                                                        "no null class: guidance_scale must be 1")
        high = self.max_guidance_scale if max_guidance_scale is None else min(self.max_guidance_scale,
                                                                                max_guidance_scale)
        check_guidance(sampling.guidance_scale, high)
        if sampling.cache not in self.cache_presets:
            raise InvalidRequestError("cache", f"cache must be one of {', '.join(self.cache_presets)} for this model "
                                               f"(a few-step student runs every step), got {sampling.cache!r}")

    def with_overrides(self, **defaults) -> "SamplingContract":
        """This contract with a deployment's default settings (``SamplingParams`` fields; None: keep the model's)
        merged over its recommended ones: the one place a served model's defaults are resolved, checked against
        the contract (a ValueError names the field)."""
        given = {k: v for k, v in defaults.items() if v is not None}
        return replace(self, defaults=replace(self.defaults, **given))

    # ---- the checkpoint's metadata --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SamplingContract":
        values = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling contract keys {unknown}; allowed: {sorted(known)}")
        for key in ("samplers", "step_counts"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if "defaults" in values:
            values["defaults"] = SamplingParams(**values["defaults"])
        if values.get("teacher") is not None:
            values["teacher"] = Teacher(**values["teacher"])
        return cls(**values)

    @property
    def null_row(self) -> bool:
        """Whether a guided image of this model takes a null-class row beside its own (``rows_per_image``)."""
        return self.guidance == "null-row"

    @classmethod
    def of_teacher(cls, num_train_timesteps: int, defaults: SamplingParams,
                   supports_guidance: bool) -> "SamplingContract":
        """The contract of a model trained by dit-train: noise prediction on a linear schedule of
        ``num_train_timesteps``, guided by a null-class row when it has a null class (else unguided)."""
        if not supports_guidance:
            defaults = replace(defaults, guidance_scale=1.0)
        return cls(num_train_timesteps=num_train_timesteps, defaults=defaults,
                   guidance="null-row" if supports_guidance else "none",
                   max_guidance_scale=MAX_GUIDANCE_SCALE if supports_guidance else 1.0)

    @classmethod
    def derive(cls, training: dict, supports_guidance: bool) -> "SamplingContract":
        """The contract of a checkpoint written before contracts were recorded: the schedule length from its
        training config, its measured defaults from ``default_sampling``, guidance from its null class."""
        steps = (training.get("config") or {}).get("diffusion", {}).get("num_timesteps", NUM_TRAIN_TIMESTEPS)
        recorded = {k: v for k, v in (training.get("default_sampling") or {}).items()
                    if k in ("sampler", "num_inference_steps", "guidance_scale")}
        return cls.of_teacher(steps, SamplingParams(**recorded), supports_guidance)

def student_contract(teacher: SamplingContract, source: Teacher, max_guidance_scale: float,
                     guidance_scale: float, step_counts: tuple[int, ...] | None = None) -> SamplingContract:
    """The contract of a consistency student of ``teacher``: its schedule, the student sampler at its step counts
    (``step_counts``: those it was trained for with the count as an input; default STUDENT_STEP_COUNTS), guidance as
    an input over ``[1, max_guidance_scale]``, no feature cache, and ``source.segments`` steps at ``guidance_scale``
    as the default."""
    return SamplingContract(num_train_timesteps=teacher.num_train_timesteps, prediction="consistency",
                            samplers=("consistency",), step_counts=step_counts or STUDENT_STEP_COUNTS,
                            guidance="embedded",
                            max_guidance_scale=max_guidance_scale, feature_cache=False,
                            defaults=SamplingParams(num_inference_steps=source.segments, sampler="consistency",
                                                    guidance_scale=guidance_scale),
                            teacher=source)


def random_student_contract() -> SamplingContract:
    """What a random-weight model is served under to time a 4-step student (benchmarks, a config's
    ``random_weights_as: student``): a student of a default teacher, guidance up to 8, 4 steps at 4 by default."""
    return student_contract(SamplingContract(), Teacher(checkpoint="random weights", sha256="", segments=4,
                                                        method="multistep-consistency"),
                            max_guidance_scale=8.0, guidance_scale=4.0)


def recorded_contract(path) -> SamplingContract | None:
    """The contract recorded in a checkpoint's header, read without torch (the serving config sizes a model's
    batches by it before a replica loads the weights). None where none can be read: a file from before contracts (a
    teacher's), or one the replica will report as unreadable when it loads it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            recorded = (f.metadata() or {}).get("sampling")
        return SamplingContract.from_json(recorded) if recorded is not None else None
    except Exception:  # noqa: BLE001 -- sizing falls back to a teacher's; loading names the problem
        return None
