"""The training loop: one code path for one process or many (torchrun + DDP), with exact resume.

A checkpoint is two files written atomically side by side in ``output_dir/checkpoints``:

- ``step-NNNNNNNN.safetensors``: servable as is (EMA weights, config, class names, training record);
- ``step-NNNNNNNN.state.safetensors``: what resuming needs besides that: raw weights, AdamW moments, the
  LR scheduler, the data position and every rank's RNG state.

The state file is written first, so a complete pair always has its state; ``--resume`` takes the newest
pair that loads. The last servable checkpoint is also written to ``output_dir/<final_name>``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from .. import checkpoint as ckpt
from ..diffusion import NoiseSchedule, q_sample, training_losses
from ..contract import SamplingContract
from ..model import DiTConfig, DiTModel, count_parameters
from ..request import SamplingParams
from .config import TrainConfig
from .data import ShardedBatches, TensorDataset, load_dataset
from .report import JsonlLog, ProgressBar, format_duration, plot_loss_curve

STATE_FORMAT = "dit-serve-train-state/1"


@dataclass
class DistInfo:
    """Where this process sits in the job: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_choice: str) -> DistInfo:
    """Join the torchrun job if there is one (nccl on GPUs, gloo on CPUs); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but no CUDA GPU is visible; use cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def hardware_description(info: DistInfo) -> str:
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name(info.device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads per rank)"
    return f"{info.world_size} x {name}; torch {torch.__version__}"


def checkpoint_paths(output_dir: Path, step: int) -> tuple[Path, Path]:
    """(servable, state) paths of the checkpoint at ``step``."""
    folder = output_dir / "checkpoints"
    return folder / f"step-{step:08d}.safetensors", folder / f"step-{step:08d}.state.safetensors"


def list_checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps that have both files of a checkpoint, newest first."""
    steps = []
    for p in (output_dir / "checkpoints").glob("step-*.state.safetensors"):
        with contextlib.suppress(ValueError):
            step = int(p.name[len("step-"):-len(".state.safetensors")])
            if checkpoint_paths(output_dir, step)[0].exists():
                steps.append(step)
    return sorted(steps, reverse=True)


class Trainer:
    """Trains a DiT from a TrainConfig; ``run()`` returns the final servable checkpoint's path (on rank 0)."""

    def __init__(self, config: TrainConfig, resume: bool = False, command: list[str] | None = None,
                 before_state_rename: Callable[[int, Path], None] | None = None):
        """``before_state_rename(step, tmp)`` runs when a save's state file is written and fsynced under its temporary
        name, before the rename that commits it (a test kills the process there)."""
        self.config = config
        self.command = command if command is not None else sys.argv
        self.before_state_rename = before_state_rename
        t = config.trainer
        self.dist = setup_distributed(t.device)
        self.device = self.dist.device
        self.output_dir = Path(config.checkpointing.output_dir)

        shape = self._model_config(num_classes=1)
        self.data: TensorDataset = load_dataset(config.data.kind, config.data.path,
                                                config.data.image_size or shape.input_size, shape.in_channels)
        self.model_config = self._model_config(num_classes=len(self.data.class_names))
        if tuple(self.data.x.shape[1:]) != (self.model_config.in_channels, self.model_config.input_size,
                                            self.model_config.input_size):
            raise ValueError(f"data items have shape {tuple(self.data.x.shape[1:])} but the model takes "
                             f"({self.model_config.in_channels}, {self.model_config.input_size}, "
                             f"{self.model_config.input_size}); set data.image_size or the model's "
                             "input_size/in_channels to match")
        if int(self.data.y.max()) >= self.model_config.num_classes:
            raise ValueError(f"labels go up to {int(self.data.y.max())} but model.num_classes is "
                             f"{self.model_config.num_classes}")
        self.class_names = config.checkpointing.class_names or self.data.class_names

        torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = self._build_model().to(self.device)
        self.model.gradient_checkpointing = t.gradient_checkpointing
        self.model.train()
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.contract = self.sampling_contract()  # recorded in every checkpoint written
        self.schedule = NoiseSchedule.linear(self.contract.num_train_timesteps, device=self.device)
        self._init_objective()

        decay, no_decay, labels = [], [], []
        for name, p in self.model.named_parameters():  # no decay on biases and embeddings, as is usual
            if name.startswith("y_embedder."):
                labels.append(p)
            else:
                (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
             {"params": labels, "weight_decay": 0.0, "lr": t.learning_rate * t.label_embedding_lr_scale}],
            lr=t.learning_rate, betas=(0.9, t.adam_beta2), fused=self.device.type == "cuda")

        self.batches = ShardedBatches(len(self.data), t.per_device_train_batch_size, self.dist.rank,
                                      self.dist.world_size, t.seed)
        if t.max_steps:
            self.total_steps = t.max_steps
        else:
            self.total_steps = max(1, math.ceil(t.epochs * self.batches.batches_per_epoch
                                                / t.gradient_accumulation_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * self.dist.world_size

        self.step = 0
        self.previous_wall_s = 0.0
        self.last_loss = float("nan")
        torch.manual_seed(t.seed + self.dist.rank)  # each rank draws its own timesteps, noise and label dropout
        resumed_from = self._resume() if resume else None
        self.resumed_from = resumed_from
        self.ddp = None
        if self.dist.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- what a subclass (distill.Distiller) changes -----------------------------------------------------------
    @property
    def name(self) -> str:
        """What is trained, for log lines and the loss plot."""
        return self.config.model.preset or "custom DiT"

    def _model_config(self, num_classes: int) -> DiTConfig:
        return self.config.model.to_dit_config(num_classes=num_classes)

    def _build_model(self) -> DiTModel:
        return DiTModel.from_config(self.model_config)

    def _init_objective(self) -> None:
        """Whatever the loss needs beside the model and the schedule: here the timesteps' MSE weights."""
        d = self.config.diffusion
        self.snr_weight = None  # (T,) per-timestep weight of the noise MSE
        if d.loss_weighting == "min_snr":
            snr = self.schedule.alphas_cumprod / (1 - self.schedule.alphas_cumprod)
            self.snr_weight = snr.clamp(max=d.min_snr_gamma) / snr

    def _loss(self, module: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch of clean samples ``x0`` (B, C, H, W) and labels ``y`` (B,)."""
        timesteps = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(self.schedule, x0, timesteps, noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.trainer.bf16):
            out = module(x_t, timesteps, y)  # (B, C_out, H, W)
        losses = training_losses(self.schedule, out, x0, x_t, timesteps, noise, self.model_config.learn_sigma)
        if self.snr_weight is None:
            return losses["loss"].mean()
        return (losses["loss"] - losses["mse"] + self.snr_weight[timesteps] * losses["mse"]).mean()

    def _after_step(self) -> None:
        """After each optimiser step (the served EMA is updated before it)."""

    def sampling_contract(self) -> SamplingContract:
        """How the trained model is to be sampled (built once, as ``self.contract``)."""
        d = self.config.diffusion
        defaults = SamplingParams(sampler=d.sampler, num_inference_steps=d.num_inference_steps,
                                  guidance_scale=d.guidance_scale)
        return SamplingContract.of_teacher(d.num_timesteps, defaults, self.model_config.supports_guidance)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the weights, optimiser and generators that resuming needs."""
        return {}

    def _load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``_extra_state`` saved."""

    # ----------------------------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        t = self.config.trainer
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, self.total_steps - t.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimiser step over gradient_accumulation_steps micro-batches; returns the mean loss (no sync)."""
        t = self.config.trainer
        module = self.ddp or self.model
        accum = t.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            idx = self.batches.next()
            x0 = self.data.x[idx].to(self.device, non_blocking=True)  # (B, C, H, W)
            y = self.data.y[idx].to(self.device, non_blocking=True)  # (B,)
            sync = self.ddp is None or micro == accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                loss = self._loss(module, x0, y)
                (loss / accum).backward()
            total += loss.detach()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self._after_step()
        self.step += 1
        return total / accum

    @torch.no_grad()
    def _update_ema(self) -> None:
        t = self.config.trainer
        decay = min(t.ema_decay, (1 + self.step) / (10 + self.step)) if t.ema_warmup else t.ema_decay
        params = dict(self.model.named_parameters())
        names = list(params)
        torch._foreach_lerp_([self.ema[n] for n in names], [params[n].detach() for n in names], 1 - decay)
        for name, buf in self.model.named_buffers():  # fixed buffers (the position embedding): copied
            self.ema[name].copy_(buf)

    # ----------------------------------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Train to total_steps, logging and saving on the way; returns the final checkpoint path on rank 0."""
        t, c = self.config.trainer, self.config.checkpointing
        log = JsonlLog(self.output_dir / "train_log.jsonl", self.resumed_from) if self.dist.is_main else None
        params = count_parameters(self.model)
        self._log(f"{self.command[0]}: {self.name} ({params / 1e6:.2f}M params) on "
                  f"{len(self.data)} {self.config.data.kind} items {tuple(self.data.x.shape[1:])}, "
                  f"{self.dist.world_size} rank(s) on {self.device.type}, global batch {self.global_batch}, "
                  f"steps {self.step} -> {self.total_steps}"
                  + (f" (resumed from step {self.resumed_from})" if self.resumed_from is not None else ""))
        progress = ProgressBar(self.total_steps, self.step, self.global_batch) if self.dist.is_main else None
        start = time.perf_counter()
        interval_loss = torch.zeros((), device=self.device)
        interval_steps = 0
        last_saved = self.step if self.resumed_from is not None else -1
        while self.step < self.total_steps:
            interval_loss += self.train_step()
            interval_steps += 1
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                mean = interval_loss / interval_steps
                if self.dist.distributed:
                    dist.all_reduce(mean, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
                    if self.device.type != "cuda":
                        mean = mean / self.dist.world_size
                self.last_loss = float(mean)  # the one host sync per log interval
                interval_loss.zero_()
                interval_steps = 0
                if self.dist.is_main:
                    elapsed = time.perf_counter() - start
                    log.write({"step": self.step, "loss": self.last_loss, "lr": self.scheduler.get_last_lr()[0],
                               "epoch": self.batches.epoch, "samples": self.step * self.global_batch,
                               "wall_s": round(self.previous_wall_s + elapsed, 3)})
                    progress.update(self.step, self.last_loss)
            if self.step % c.save_every == 0 or self.step == self.total_steps:
                self.save(self.previous_wall_s + time.perf_counter() - start)
                last_saved = self.step
        wall = self.previous_wall_s + time.perf_counter() - start
        if last_saved != self.step:  # resumed at (or past) the end: nothing trained, still publish the final file
            self.save(wall)
        final = None
        if self.dist.is_main:
            progress.close()
            final = self.output_dir / c.final_name
            servable, _ = checkpoint_paths(self.output_dir, self.step)
            ema, info = ckpt.load_state_dict(servable)
            raw = None
            if c.save_raw_weights:
                raw, _ = ckpt.load_state_dict(servable, which="raw")
            ckpt.save_checkpoint(final, ema, info, raw_state_dict=raw)
            records = log.records()
            plot_loss_curve([r["step"] for r in records], [r["loss"] for r in records],
                            self.output_dir / "loss_curve.png",
                            title=f"{self.name}: training loss (log scale)")
            done = self.step - (self.resumed_from or 0)
            self._log(f"done: {self.step} steps, final loss {self.last_loss:.4f}, {format_duration(wall)} wall, "
                      f"{done * self.global_batch / max(1e-9, wall - self.previous_wall_s):,.0f} samples/s"
                      + (f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
                         if self.device.type == "cuda" else "")
                      + f"\n  checkpoint: {final} ({final.stat().st_size / 2**20:.1f} MB)"
                      f"\n  log: {self.output_dir / 'train_log.jsonl'}  plot: {self.output_dir / 'loss_curve.png'}")
        if self.dist.distributed:
            dist.barrier()
        return final

    # ----------------------------------------------------------------------------------------------------------
    def training_record(self, wall_s: float) -> dict:
        return {
            "command": shlex.join(self.command),
            "config": self.config.to_dict(),
            "steps": self.step,
            "samples_seen": self.step * self.global_batch,
            "seed": self.config.trainer.seed,
            "wall_time_s": round(wall_s, 1),
            "hardware": hardware_description(self.dist),
            "final_loss": self.last_loss if math.isfinite(self.last_loss) else None,
            "data": {"kind": self.config.data.kind, "items": len(self.data)},
        }

    def save(self, wall_s: float) -> None:
        """Write this step's checkpoint pair (state file first) and prune old ones; every rank takes part."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.distributed:  # every rank's generators, gathered to rank 0
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if self.dist.is_main:
            servable, state_path = checkpoint_paths(self.output_dir, self.step)
            servable.parent.mkdir(parents=True, exist_ok=True)
            tensors: dict[str, torch.Tensor] = {f"raw.{k}": v for k, v in self.model.state_dict().items()}
            optim = self.optimizer.state_dict()
            for idx, state in optim["state"].items():
                for key, value in state.items():
                    tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
            for r, states in enumerate(gathered):
                for kind, value in states.items():
                    tensors[f"rng.{kind}.{r}"] = value
            tensors.update({f"extra.{k}": v for k, v in self._extra_state().items()})
            meta = {"format": STATE_FORMAT, "step": str(self.step), "wall_s": repr(wall_s),
                    "last_loss": repr(self.last_loss), "world_size": str(self.dist.world_size),
                    "data_position": json.dumps(self.batches.state()),
                    "optim_param_groups": json.dumps(optim["param_groups"]),
                    "scheduler": json.dumps(self.scheduler.state_dict()),
                    "model_config": json.dumps(self.model_config.to_dict())}
            hook, step = self.before_state_rename, self.step
            ckpt.atomic_save(state_path, tensors, meta, before_rename=hook and (lambda tmp: hook(step, tmp)))
            info = ckpt.CheckpointInfo(config=self.model_config, class_names=list(self.class_names),
                                       space=self.data.space, weights="ema", training=self.training_record(wall_s),
                                       sampling=self.contract)
            raw = self.model.state_dict() if self.config.checkpointing.save_raw_weights else None
            ckpt.save_checkpoint(servable, self.ema, info, raw_state_dict=raw)
            for old in list_checkpoint_steps(self.output_dir)[self.config.checkpointing.keep_last:]:
                for p in checkpoint_paths(self.output_dir, old):
                    p.unlink(missing_ok=True)
        if self.dist.distributed:
            dist.barrier()

    def _resume(self) -> int | None:
        """Load the newest complete checkpoint in output_dir; returns its step, or None when there is none."""
        for step in list_checkpoint_steps(self.output_dir):
            servable, state_path = checkpoint_paths(self.output_dir, step)
            try:
                self._load_checkpoint(servable, state_path)
                return step
            except (ckpt.CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
                self._log(f"resume: skipping the checkpoint at step {step}: {e}")
        self._log(f"resume: no checkpoint in {self.output_dir / 'checkpoints'}; starting from step 0")
        return None

    def _load_checkpoint(self, servable: Path, state_path: Path) -> None:
        ema, info = ckpt.load_state_dict(servable, device=self.device)
        if info.config != self.model_config:
            raise ValueError(f"{servable} was trained with model config {info.config.to_dict()}, "
                             f"not this run's {self.model_config.to_dict()}")
        with safe_open(str(state_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{state_path}: not a training-state file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if int(meta["world_size"]) != self.dist.world_size:
            raise ValueError(f"{state_path} was written by {meta['world_size']} rank(s); this run has "
                             f"{self.dist.world_size}. Resume with the same world size")
        self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("raw.")})
        self.ema = {k: v.float().clone() for k, v in ema.items()}
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim_state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state,
                                        "param_groups": json.loads(meta["optim_param_groups"])})
        self.scheduler.load_state_dict(json.loads(meta["scheduler"]))
        self._load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
        self.batches.load_state(json.loads(meta["data_position"]))
        torch.set_rng_state(tensors[f"rng.cpu.{self.dist.rank}"])
        if self.device.type == "cuda" and f"rng.cuda.{self.dist.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{self.dist.rank}"], self.device)
        self.step = int(meta["step"])
        self.previous_wall_s = float(meta["wall_s"])
        self.last_loss = float(meta["last_loss"])
