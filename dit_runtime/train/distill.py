"""``dit-distill``: turn a teacher checkpoint into a few-step student with guidance built in.

Multistep consistency distillation (Heek et al. 2024, "Multistep Consistency Models"), with the latent consistency
models' guided teacher step (Luo et al. 2023). The teacher's timesteps are cut into ``segments`` segments; the student
learns to map a noisy sample anywhere in a segment to the sample at the segment's lower boundary, stepping as DDIM
from its own clean-image estimate. Sampled with the ``consistency`` sampler at ``segments`` steps, each step is one
forward of one row per image, since the guidance scale is an input of the student, not a second row. With
``segment_counts`` the student is trained for several step counts at once, the count a further input.

Each training sample: a clean x0 and its class from the data, a guidance scale w over the teacher's useful range, a
timestep t on the teacher's solver grid. One guided DDIM step of the teacher (its conditional and null rows in one
forward) goes from t to the next grid timestep t'; the target is the EMA student's estimate carried from t' to the
segment's boundary (or the teacher's own sample, when t' is the boundary). The loss compares clean-image estimates
(the student's, and the one whose DDIM step from x_t lands on the target), pseudo-Huber as in Song & Dhariwal 2023.
The student starts from the teacher's EMA weights, with a zero-initialised guidance embedding (model.GuidanceEmbedder),
and outputs through the boundary-condition form of ``diffusion.consistency_x0``.

Everything else is ``dit-train``'s: the YAML config style, the progress bar, the loss plot, exact resume and DDP.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..contract import SamplingContract, Teacher, student_contract
from ..diffusion import _bcast, consistency_x0, q_sample, timestep_at
from ..model import DiTConfig, DiTModel
from .config import DistillConfig
from .trainer import Trainer


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """Per sample: sqrt(||d||^2 + c^2) - c over every value of the sample (N, ...) -> (N,)."""
    squared = difference.flatten(1).pow(2).sum(1)
    return torch.sqrt(squared + c * c) - c


def ddim_to(x0: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step from x_t (at alpha_bar ``ab_t``) to alpha_bar ``ab_s`` given the clean estimate
    x0: sqrt(ab_s) x0 + sqrt(1 - ab_s) eps, with eps the noise x0 implies. ab_s = 1 gives x0 itself."""
    eps = (x_t - torch.sqrt(ab_t) * x0) / torch.sqrt(1 - ab_t)
    return torch.sqrt(ab_s) * x0 + torch.sqrt(1 - ab_s) * eps


def x0_landing_on(x_s: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The clean estimate whose DDIM step from x_t lands on x_s (``ddim_to`` solved for x0); needs ab_s > ab_t."""
    ratio = torch.sqrt(1 - ab_s) / torch.sqrt(1 - ab_t)
    return (x_s - ratio * x_t) / (torch.sqrt(ab_s) - ratio * torch.sqrt(ab_t))


class Distiller(Trainer):
    """Trains a consistency student of a teacher checkpoint; ``run()`` returns the student's path."""

    def __init__(self, config: DistillConfig, teacher_path: str | Path, resume: bool = False,
                 command: list[str] | None = None, **kwargs):
        """``teacher_path``: a checkpoint of dit-train with a null class; the rest as ``Trainer``'s."""
        self.teacher_path = Path(teacher_path)
        teacher_state, self.teacher_info = ckpt.load_state_dict(self.teacher_path)
        if self.teacher_info.sampling.prediction != "epsilon":
            raise ValueError(f"{teacher_path} is a distilled student already; distil its teacher instead")
        if self.teacher_info.sampling.guidance != "null-row":
            raise ValueError(f"{teacher_path} has no null class (trained without label dropout), so there is no "
                             "guidance to distil; a student needs a guided teacher")
        self._teacher_state = teacher_state
        super().__init__(config, resume=resume, command=command, **kwargs)
        if len(self.data.class_names) != self.teacher_info.config.num_classes:
            raise ValueError(f"the data has {len(self.data.class_names)} classes but the teacher {teacher_path} has "
                             f"{self.teacher_info.config.num_classes}")

    @property
    def name(self) -> str:
        return f"{self.config.distill.segments}-step student of {self.teacher_path.stem}"

    def _model_config(self, num_classes: int) -> DiTConfig:
        """The teacher's config with a guidance embedding (the data's class count is checked against it once the
        data is loaded)."""
        return replace(self.teacher_info.config, guidance_embed=True,
                       steps_embed=self.config.distill.segment_counts is not None)

    def _build_model(self) -> DiTModel:
        """The teacher's EMA weights, plus a guidance embedding (and a step-count one) that add nothing yet."""
        model = DiTModel.from_config(self.model_config)
        missing, unexpected = model.load_state_dict(self._teacher_state, strict=False)
        if unexpected or any(not k.startswith(("g_embedder.", "s_embedder.")) for k in missing):
            raise ValueError(f"{self.teacher_path}: weights do not fit its own config (missing {missing}, "
                             f"unexpected {unexpected})")
        model.init_student_embedders()
        return model

    def _init_objective(self) -> None:
        d, device = self.config.distill, self.device
        self.teacher = ckpt.build_model(self.teacher_info.config, self._teacher_state, str(self.teacher_path))
        self.teacher = self.teacher.to(device).eval().requires_grad_(False)
        del self._teacher_state
        self.target = DiTModel.from_config(self.model_config).to(device).eval().requires_grad_(False)
        self.target.load_state_dict(self.model.state_dict())
        # The model runs in eval mode: its label dropout would train classes the guided targets never saw.
        self.model.eval()
        self.clip = self.data.space == "pixel"  # as the engine clips a pixel model's x0 (clip_denoised)
        self.grid = timestep_at(torch.arange(d.teacher_steps + 1, device=device),
                                torch.full((d.teacher_steps + 1,), d.teacher_steps, device=device),
                                self.schedule.num_timesteps)  # (N + 1,) grid timesteps, the last -1
        # Per trained step count: grid steps per segment, and the segments' ends as the consistency sampler steps
        # to them at that count (on the grid), padded to the largest count.
        counts = d.segment_counts or [d.segments]
        self.counts = torch.tensor(counts, device=device)
        self.grid_per_segment = torch.tensor([d.teacher_steps // k for k in counts], device=device)
        self.boundaries = torch.full((len(counts), max(counts) + 1), -1, dtype=torch.long, device=device)
        for i, k in enumerate(counts):
            ends = timestep_at(torch.arange(k + 1, device=device), torch.full((k + 1,), k, device=device),
                               self.schedule.num_timesteps)
            if not torch.equal(self.grid[::d.teacher_steps // k], ends):
                raise ValueError(f"with {self.schedule.num_timesteps} timesteps the teacher grid of "
                                 f"distill.teacher_steps {d.teacher_steps} misses the boundaries of {k} segments by "
                                 "rounding; choose another teacher_steps")
            self.boundaries[i, :k + 1] = ends
        values = math.prod(self.data.x.shape[1:])
        self.huber_c = d.huber_c if d.huber_c is not None else 0.00054 * math.sqrt(values)

    def _loss(self, module: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d, n, dev = self.config.distill, x0.shape[0], self.device
        c = x0.shape[1]
        w = d.min_guidance_scale + (d.max_guidance_scale - d.min_guidance_scale) * torch.rand(n, device=dev)
        index = torch.randint(0, d.teacher_steps, (n,), device=dev)  # (N,) grid step of t
        # (N,) the step count each sample trains; one count draws nothing (a single-count run's draws as before)
        which = (torch.randint(0, len(self.counts), (n,), device=dev) if len(self.counts) > 1
                 else torch.zeros(n, dtype=torch.long, device=dev))
        steps = self.counts[which]
        t, t_next = self.grid[index], self.grid[index + 1]
        boundary = self.boundaries[which, index // self.grid_per_segment[which] + 1]  # the end of t's segment
        ab_t, ab_next, ab_s = (_bcast(self.schedule.alpha_bar(v), x0) for v in (t, t_next, boundary))
        x_t = q_sample(self.schedule, x0, t, torch.randn_like(x0))
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.trainer.bf16)
        with torch.no_grad(), autocast:
            eps = self.teacher.forward_with_cfg(x_t, t, y, w)[:, :c].float()  # both rows in one forward
            x0_teacher = self._clipped((x_t - torch.sqrt(1 - ab_t) * eps) / torch.sqrt(ab_t))
            x_next = ddim_to(x0_teacher, x_t, ab_t, ab_next)
            target_out = self.target(x_next, t_next, y, w, steps)[:, :c].float()
            x0_target = self._clipped(consistency_x0(x_next, target_out, ab_next))
            on_boundary = _bcast(t_next == boundary, x0)
            x_s = torch.where(on_boundary, x_next, ddim_to(x0_target, x_next, ab_next, ab_s))
            wanted = x0_landing_on(x_s, x_t, ab_t, ab_s)
        with autocast:
            out = module(x_t, t, y, w, steps)
        x0_student = consistency_x0(x_t, out[:, :c].float(), ab_t)
        if d.loss == "l2":
            return (x0_student - wanted).pow(2).flatten(1).mean(1).mean()
        return pseudo_huber(x0_student - wanted, self.huber_c).mean()

    def _clipped(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1) if self.clip else x0

    @torch.no_grad()
    def _after_step(self) -> None:
        mu = self.config.distill.target_ema_decay
        target = dict(self.target.named_parameters())
        names = list(target)
        params = dict(self.model.named_parameters())
        torch._foreach_lerp_([target[k] for k in names], [params[k].detach() for k in names], 1 - mu)

    def sampling_contract(self) -> SamplingContract:
        d = self.config.distill
        teacher = self.teacher_info.sampling
        scale = d.default_guidance_scale
        if scale is None:
            scale = min(max(teacher.defaults.guidance_scale, d.min_guidance_scale), d.max_guidance_scale)
        source = Teacher(checkpoint=self.teacher_path.name, sha256=ckpt.sha256_of(self.teacher_path),
                         method="multistep-consistency", segments=d.segments)
        return student_contract(teacher, source, max_guidance_scale=d.max_guidance_scale, guidance_scale=scale,
                                step_counts=tuple(sorted(d.segment_counts)) if d.segment_counts else None)

    def training_record(self, wall_s: float) -> dict:
        record = super().training_record(wall_s)
        record["teacher"] = {"checkpoint": str(self.teacher_path), "steps": self.teacher_info.training.get("steps"),
                             "wall_time_s": self.teacher_info.training.get("wall_time_s")}
        return record

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def _load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target.load_state_dict({k[len("target."):]: v for k, v in tensors.items()
                                     if k.startswith("target.")})


if __name__ == "__main__":  # torchrun -m dit_runtime.train.distill TEACHER --config ...
    import sys

    from .cli import distill_main
    sys.exit(distill_main())
