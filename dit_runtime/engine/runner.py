"""The model runner: owns the model, the per-image state buffers and the compiled, graph-captured step.

State lives on the device in slot-major buffers (one slot per image in flight, plus a scratch slot that padding
reads and writes). One step, for a bucket of B rows, is a single function of those buffers:

    gather the B image positions' state -> build the rows (conditional + null) -> one model forward (with the
    fast paths of fast_paths.py) -> guidance -> sampler step (each image at its own step of its own schedule) ->
    scatter back

It has static shapes per bucket, reads its per-step layout from a device buffer that changes only when requests
join or leave, and makes no host synchronisation, so it compiles with torch.compile and captures as a CUDA graph.

With a feature cache (feature_cache.py) a step where every row runs the blocks is one function, ``_full`` (the
blocks, then the cache entries' update), and so is one where none does, ``_forecast``. A step that mixes them is up
to four: ``_embed`` (bucket B: tokens, conditioning, which rows run the blocks), ``_blocks`` (bucket C: the rows that
do, gathered, through the blocks), ``_update`` (bucket U: the cache entries of those that cache) and ``_head`` (bucket
B: the other rows' forecast, the final layer, guidance and the sampler step). C and U take many sizes (the compute
buckets, EngineConfig.compute_buckets), so those two parts compile once with a symbolic row count and are captured
per size. The scheduler picks C and U from the same rule the device applies (``request.is_full_step``), so nothing is
read back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from enum import IntEnum

import numpy as np
import torch

from ..diffusion import (INITIAL_NOISE_COUNTER, SAMPLER_IDS, NoiseSchedule, counter_noise, noise_key,
                         sampler_step, timestep_at)
from ..model import DiTModel, apply_guidance
from ..request import is_full_step
from .fast_paths import apply_fast_paths
from .fp8 import check_fp8_support
from .feature_cache import FeatureCache
from .programs import ProgramStore, aot_compile_enabled, device_identity
from .scheduler import Layout, RequestState
from .types import EngineConfig

log = logging.getLogger(__name__)

# The dtype of weights and activations for each precision (fp8: bf16 around the FP8 GEMMs).
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# Steps the host may enqueue ahead of the GPU.
_LOOKAHEAD = 2
# The parts of a feature-cached step that run at every compute bucket: compiled once for a symbolic row count.
_SYMBOLIC_PARTS = ("blocks", "update", "admit")
# The runner's own machinery, which no compiled step reads: left out when a program is saved (programs.py), since torch
# pickles the program's `self` (this runner) with the state of its guards, and CUDA graphs, events and loaded programs
# do not pickle.
_MACHINERY = ("_fns", "_programs", "store", "_graphs", "_graph_pool", "_in_flight", "_staging")


class LayoutRow(IntEnum):
    """The rows of the packed layout buffer: ``Layout``'s lists, and whether a row is real (not padding)."""

    IMAGE_SLOT = 0
    ROW_IMAGE = 1
    ROW_LABEL = 2
    COND_ROW = 3
    UNCOND_ROW = 4
    ROW_CACHE = 5
    ROW_REAL = 6


IMAGE_SLOT, ROW_IMAGE, ROW_LABEL, COND_ROW, UNCOND_ROW, ROW_CACHE, ROW_REAL = LayoutRow


class AdmitColumn(IntEnum):
    """The integer columns of the admission buffer, one row per admitted image (its floats: eta, guidance)."""

    SLOT = 0
    KEY = 1  # and KEY + 1: the image's noise key (diffusion.noise_key)
    STEPS = 3
    SAMPLER = 4
    CACHE = 5  # to CACHE + 3: the feature-cache schedule (request.is_full_step's interval, warm-up, cool-down), order


_ADMIT_INTS = AdmitColumn.CACHE + 4


def step_input_views(buffer, rows: int) -> tuple:
    """The three parts of the step inputs' flat int64 buffer (a tensor, or its numpy array on the host), for
    ``rows`` positions: the admission's integers (rows, _ADMIT_INTS), its floats (rows, 2) float32 (eta, guidance),
    two to an int64 element, and the layout (len(LayoutRow), rows). Admission first, so either part uploads alone."""
    ints, floats = rows * _ADMIT_INTS, rows * _ADMIT_INTS + rows
    if isinstance(buffer, np.ndarray):
        return (buffer[:ints].reshape(rows, _ADMIT_INTS), buffer[ints:floats].view(np.float32).reshape(rows, 2),
                buffer[floats:].reshape(len(LayoutRow), rows))
    return (buffer[:ints].view(rows, _ADMIT_INTS), buffer[ints:floats].view(torch.float32).view(rows, 2),
            buffer[floats:].view(len(LayoutRow), rows))


class HostStaging:
    """Host copies of a flat device buffer to upload from, reused: on a GPU pinned, one more than the steps the host
    may run ahead, so a copy is refilled only once its upload is done (it was queued at least that many uploads ago,
    so this is almost never a wait), where a fresh pinned buffer per upload would cost an allocation each time. The
    host copies are filled through numpy, which costs a fraction of a torch call per write."""

    def __init__(self, device_buffer: torch.Tensor):
        self.device_buffer = device_buffer
        cuda = device_buffer.device.type == "cuda"
        self._host = [torch.zeros_like(device_buffer, device="cpu", pin_memory=cuda)
                      for _ in range(_LOOKAHEAD + 1 if cuda else 1)]
        self._arrays = [host.numpy() for host in self._host]
        self._uploaded = [torch.cuda.Event() if cuda else None for _ in self._host]
        self._next = 0

    def take(self) -> np.ndarray:
        """The next host copy, free to fill (its contents are what was last written to it)."""
        done = self._uploaded[self._next]
        if done is not None:
            done.synchronize()  # returns at once if the event was never recorded
        return self._arrays[self._next]

    def upload(self, start: int = 0, stop: int | None = None) -> None:
        """Queue the copy of the taken host copy's elements ``start:stop`` to the device buffer, on the current
        stream."""
        host = self._host[self._next]
        self.device_buffer[start:stop].copy_(host[start:stop], non_blocking=True)
        if self._uploaded[self._next] is not None:
            self._uploaded[self._next].record()
        self._next = (self._next + 1) % len(self._host)


def is_full_step_on_device(step: torch.Tensor, interval: torch.Tensor, warmup: torch.Tensor,
                           cooldown: torch.Tensor) -> torch.Tensor:
    """``request.is_full_step`` per row on the device, in float32 (step counts are exact there): compiled for the CPU,
    its integer ``%`` fails, as inductor's code for a vector of fewer lanes than its width checks the unused lanes,
    uninitialised, for a zero divisor (ZeroDivisionError at warm-up, torch 2.13)."""
    return is_full_step(step.float(), interval.float(), warmup.float(), cooldown.float())


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can take on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable: what the kernel can hand out without swapping
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no bound known here
        return sys.maxsize


class ModelRunner:
    """Executes step plans for one model on one device."""

    def __init__(self, model: DiTModel, config: EngineConfig, clip_denoised: bool, num_train_timesteps: int):
        """``num_train_timesteps``: the length of the schedule the model was trained on (its sampling contract)."""
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = COMPUTE_DTYPES[config.precision]
        fp8 = config.precision == "fp8"
        if fp8:
            check_fp8_support(self.device)  # before any memory is moved
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.model.pos_embed = self.model.pos_embed.float()
        self.forward = apply_fast_paths(self.model, config.fast_paths, cuda=self.device.type == "cuda", fp8=fp8)
        cfg = model.config
        self.image_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.learn_sigma = cfg.learn_sigma
        self.clip_denoised = clip_denoised
        self.schedule = NoiseSchedule.linear(num_train_timesteps, device=self.device)
        n = config.max_batch_size + 1  # + the scratch slot for padding
        dev = self.device
        # Per-slot sampler state, in fp32 whatever the model's precision.
        self.x = torch.zeros(n, *self.image_shape, device=dev)
        self.prev_x0 = torch.zeros(n, *self.image_shape, device=dev)
        self.step_index = torch.zeros(n, dtype=torch.int64, device=dev)
        self.num_steps = torch.ones(n, dtype=torch.int64, device=dev)
        self.sampler = torch.zeros(n, dtype=torch.int64, device=dev)
        self.eta = torch.zeros(n, device=dev)
        self.guidance = torch.ones(n, device=dev)
        self.key = torch.zeros(n, 2, dtype=torch.int64, device=dev)
        # What the host hands a step, in one buffer so that a step that admits requests makes one upload: the
        # admitted images' settings (padded to a bucket with rows that write the scratch slot) and the layout.
        rows = max(config.buckets)
        self.step_inputs = torch.zeros(rows * (_ADMIT_INTS + 1 + len(LayoutRow)), dtype=torch.int64, device=dev)
        self.admit_ints, self.admit_floats, self.layout = step_input_views(self.step_inputs, rows)
        self._layout_start = self.step_inputs.numel() - self.layout.numel()  # where the layout begins
        self.finished_slots = torch.zeros(config.max_batch_size, dtype=torch.int64, device=dev)
        self._staging = {"step_inputs": HostStaging(self.step_inputs),
                         "finished_slots": HostStaging(self.finished_slots)}
        self._admit_padding = (self._padding_row(), [0.0, 1.0])
        self.admit_ints[:] = torch.tensor(self._admit_padding[0])
        self.admit_floats[:] = torch.tensor(self._admit_padding[1])
        self._in_flight: deque[torch.cuda.Event] = deque()
        self._graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.compile_seconds = self.capture_seconds = 0.0  # of the warm-up (warm_up)
        self.cache = None
        if config.cache_rows:
            self._init_cache(config.cache_rows, max(config.buckets))
        self._fns = {"step": self._step, "full": self._full, "forecast": self._forecast, "embed": self._embed,
                     "blocks": self._blocks, "update": self._update, "head": self._head, "admit": self._admit}
        self._programs: dict[tuple[str, int], object] = {}  # (part, bucket) -> its compiled program, at warm-up
        self.store: ProgramStore | None = None
        if config.compile:  # inductor's cache and Dynamo's limits are the process's (process_settings.py)
            options = dict(config.compile_options) if config.compile_options else None
            with aot_compile_enabled():  # each compiled function can also be compiled ahead of time (programs.py)
                self._fns = {name: torch.compile(fn, fullgraph=True, options=options,
                                                 dynamic=name in _SYMBOLIC_PARTS or bool(config.compile_dynamic))
                             for name, fn in self._fns.items()}
            if config.compile_cache_dir and config.compile_programs and config.warmup and \
                    ProgramStore.supported(self._fns["step"]):
                self.store = ProgramStore(os.path.join(config.compile_cache_dir, "programs"), self._identity())

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name not in _MACHINERY}

    def _identity(self) -> dict:
        """What this runner's compiled programs depend on beyond their guards (programs.ProgramStore)."""
        c = self.config
        return {"device": device_identity(self.device), "model": self.model.config, "clip": self.clip_denoised,
                "num_train_timesteps": self.schedule.num_timesteps,
                "engine": {"precision": c.precision, "max_batch_size": c.max_batch_size, "buckets": c.buckets,
                           "compute_buckets": c.compute_buckets, "cache_rows": c.cache_rows,
                           "fast_paths": c.fast_paths, "spacing": c.spacing, "compile_options": c.compile_options,
                           "compile_dynamic": c.compile_dynamic}}

    def _init_cache(self, rows: int, max_bucket: int) -> None:
        """The feature cache's pool and the buffers that carry a step between its three parts."""
        cfg, dev = self.model.config, self.device
        n = self.config.max_batch_size + 1
        per_row = FeatureCache.bytes_per_row(cfg.num_tokens, cfg.hidden_dim, self.dtype)
        # The pool (+ its scratch entry) and the two token buffers between the step's parts.
        element = torch.empty((), dtype=self.dtype).element_size()
        needed = (rows + 1) * per_row + 2 * (max_bucket + 1) * cfg.num_tokens * cfg.hidden_dim * element
        free = free_memory(dev)
        if needed > free:
            raise ValueError(f"feature_cache_rows {rows} needs {needed / 2**30:.2f} GiB ({per_row / 2**20:.2f} MiB per "
                             f"cached row, plus the step's token buffers), but {dev} has {free / 2**30:.2f} GiB "
                             "free: lower feature_cache_rows (0 turns the cache off) or max_batch_size")
        log.info("feature cache: %d rows x %.2f MiB = %.1f MiB", rows, per_row / 2**20, rows * per_row / 2**20)
        self.cache = FeatureCache(rows, cfg.num_tokens, cfg.hidden_dim, self.dtype, dev)
        # Per slot: the image's cache schedule (request.is_full_step's arguments) and Taylor order; off by default.
        self.cache_interval = torch.ones(n, dtype=torch.int64, device=dev)
        self.cache_warmup = torch.zeros(n, dtype=torch.int64, device=dev)
        self.cache_cooldown = torch.zeros(n, dtype=torch.int64, device=dev)
        self.cache_order = torch.zeros(n, dtype=torch.int64, device=dev)
        tokens = (max_bucket + 1, cfg.num_tokens, cfg.hidden_dim)  # + a row that discarded writes go to
        self.tokens_in = torch.zeros(tokens, dtype=self.dtype, device=dev)
        self.tokens_out = torch.zeros(tokens, dtype=self.dtype, device=dev)
        self.condition = torch.zeros(max_bucket, cfg.hidden_dim, dtype=self.dtype, device=dev)
        self.row_full = torch.zeros(max_bucket, dtype=torch.bool, device=dev)
        self.row_step = torch.zeros(max_bucket, dtype=torch.int64, device=dev)
        self.compute_index = torch.zeros(max_bucket, dtype=torch.int64, device=dev)  # packed place -> row

    # ---- the step ---------------------------------------------------------------------------------------------
    def _layout(self, bucket: int, *rows: LayoutRow) -> list[torch.Tensor]:
        """The layout buffer's ``rows`` over the first ``bucket`` positions, (B,) each."""
        return [self.layout[row, :bucket] for row in rows]

    def _step(self, bucket: int) -> None:
        """One denoising step for ``bucket`` image positions and ``bucket`` rows, in place on the state buffers."""
        image_slot, row_image, row_label = self._layout(bucket, IMAGE_SLOT, ROW_IMAGE, ROW_LABEL)  # (B,) each
        x = self.x[image_slot]  # (B, C, H, W) fp32
        t = self._timesteps(image_slot)
        w = self.guidance[image_slot]  # (B,) a student's input (a teacher's guidance is its null rows)
        steps = self.num_steps[image_slot]  # (B,) the step count, another input of a student trained for several
        out = self.forward(x[row_image].to(self.dtype), t[row_image], row_label, w[row_image],
                           steps[row_image])  # (B, C_out, H, W)
        self._denoise(bucket, x, out)

    def _timesteps(self, image_slot: torch.Tensor) -> torch.Tensor:
        return timestep_at(self.step_index[image_slot], self.num_steps[image_slot], self.schedule.num_timesteps,
                           self.config.spacing)  # (B,)

    def _denoise(self, bucket: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Guidance and the sampler step for the image positions, given the rows' model output ``out``."""
        image_slot, cond_row, uncond_row = self._layout(bucket, IMAGE_SLOT, COND_ROW, UNCOND_ROW)
        step = self.step_index[image_slot]
        num_steps = self.num_steps[image_slot]
        out = out.float()
        # Per image position: its conditional and null rows (the same row when unguided, where the scale is 1).
        model_output = apply_guidance(out[cond_row], out[uncond_row], self.guidance[image_slot], self.image_shape[0])
        noise = counter_noise(self.key[image_slot], step, self.image_shape)
        result = sampler_step(self.schedule, model_output, x, step, num_steps, self.sampler[image_slot],
                              self.eta[image_slot], self.prev_x0[image_slot], noise, learn_sigma=self.learn_sigma,
                              spacing=self.config.spacing, clip_denoised=self.clip_denoised)
        self.x[image_slot] = result.x
        self.prev_x0[image_slot] = result.x0
        self.step_index[image_slot] = step + 1

    # ---- the step with the feature cache ------------------------------------------------------------------------
    def _embedded(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, T, D), conditioning (B, D) and step index (B,) of the B rows."""
        image_slot, row_image, row_label = self._layout(bucket, IMAGE_SLOT, ROW_IMAGE, ROW_LABEL)
        x = self.x[image_slot]
        t = self._timesteps(image_slot)
        w, steps = self.guidance[image_slot], self.num_steps[image_slot]
        tokens, c = self.forward.embed(x[row_image].to(self.dtype), t[row_image], row_label, w[row_image],
                                       steps[row_image])
        return tokens, c, self.step_index[image_slot[row_image]]

    def _final(self, bucket: int, hidden: torch.Tensor, c: torch.Tensor) -> None:
        """The final layer over the B rows' block output (run or forecast), then guidance and the sampler step."""
        image_slot = self.layout[IMAGE_SLOT, :bucket]
        self._denoise(bucket, self.x[image_slot], self.forward.head(hidden, c))

    def _forecast_residual(self, bucket: int, step: torch.Tensor) -> torch.Tensor:
        image_slot, row_image, row_cache = self._layout(bucket, IMAGE_SLOT, ROW_IMAGE, ROW_CACHE)
        return self.cache.forecast(row_cache, step, self.cache_order[image_slot[row_image]])

    def _full(self, bucket: int) -> None:
        """A step where every row runs the blocks: each row with a cache entry updates it (the others and padding
        write the scratch entry)."""
        tokens, c, step = self._embedded(bucket)
        hidden = self.forward.blocks(tokens, c)
        real, row_cache = self._layout(bucket, ROW_REAL, ROW_CACHE)
        self.cache.update(torch.where(real.bool(), row_cache, self.cache.scratch), hidden - tokens, step)
        self._final(bucket, hidden, c)

    def _forecast(self, bucket: int) -> None:
        """A step where no row runs the blocks: every row forecasts them from its cache entry."""
        tokens, c, step = self._embedded(bucket)
        self._final(bucket, tokens + self._forecast_residual(bucket, step), c)

    def _embed(self, bucket: int) -> None:
        """A mixed step's first part: the rows' tokens and conditioning, and which of them run the blocks."""
        tokens, c, step = self._embedded(bucket)
        self.tokens_in[:bucket] = tokens
        self.condition[:bucket] = c
        image_slot, row_image, real = self._layout(bucket, IMAGE_SLOT, ROW_IMAGE, ROW_REAL)
        slot = image_slot[row_image]  # (B,) each row's image slot
        full = is_full_step_on_device(step, self.cache_interval[slot], self.cache_warmup[slot],
                                      self.cache_cooldown[slot])
        self.row_full.zero_()
        self.row_full[:bucket] = full & real.bool()
        self.row_step[:bucket] = step

    def _blocks(self, compute: int) -> None:
        """The rows that run the blocks, packed into ``compute`` rows: rows with a cache entry first (so the cache
        update reads a prefix of them), then the rest; their outputs go to ``tokens_out`` at their own rows."""
        full = self.row_full  # (B_max,)
        rows = full.shape[0]
        cached = full & (self.layout[ROW_CACHE] != self.cache.scratch)
        uncached = full & ~cached
        # Place of each full row in the packed forward: the cached ones from 0, the others after them; the rest
        # go to a spare place past the end.
        place = torch.where(cached, cached.cumsum(0) - 1, torch.where(uncached, cached.sum() + uncached.cumsum(0) - 1,
                                                                       compute))
        index = torch.zeros(compute + 1, dtype=torch.int64, device=full.device)
        index = index.scatter(0, place, torch.arange(rows, device=full.device))[:compute]  # (C,)
        real = torch.arange(compute, device=full.device) < full.sum()  # (C,) places beyond the count are padding
        self.compute_index[:compute] = torch.where(real, index, rows)
        out = self.forward.blocks(self.tokens_in[index], self.condition[index])  # (C, T, D)
        self.tokens_out[self.compute_index[:compute]] = out

    def _update(self, updated: int) -> None:
        """The cache entries of the first ``updated`` packed rows (the full rows that have one, and padding)."""
        index = self.compute_index[:updated]  # (U,) rows; padding places hold the spare row
        has_entry = index < self.row_full.shape[0]
        rows = torch.where(has_entry, index, 0)
        # Padding and rows without a cache entry write the scratch entry.
        entry = torch.where(has_entry, self.layout[ROW_CACHE][rows], self.cache.scratch)
        self.cache.update(entry, self.tokens_out[index] - self.tokens_in[index], self.row_step[rows])

    def _head(self, bucket: int) -> None:
        """A mixed step's last part: the blocks' output where a row ran them, its forecast elsewhere."""
        predicted = self.tokens_in[:bucket] + self._forecast_residual(bucket, self.row_step[:bucket])
        hidden = torch.where(self.row_full[:bucket].view(-1, 1, 1), self.tokens_out[:bucket], predicted)
        self._final(bucket, hidden, self.condition[:bucket])

    def execute(self, bucket: int, compute: int = 0, updated: int = 0, forecast: bool = False,
                admitted: list[RequestState] = (), layout: Layout | None = None) -> None:
        """Run one step (asynchronous on the GPU): first initialise the slots of the ``admitted`` requests and
        upload a new ``layout`` (None: the current one stays), then the step. With a feature cache: ``compute`` is
        the bucket of the rows that run the blocks (0: none does), ``updated`` that of those with a cache entry (0:
        none), ``forecast`` whether any row forecasts the blocks.

        The host writes everything the step needs before the first upload, so the GPU meets one copy and the
        step's programs back to back, not a copy, a wait for the host, another copy. It may run at most
        ``_LOOKAHEAD`` steps ahead of the GPU: enough to keep it fed, few enough that progress events and step
        timings describe work that has actually been done. Waiting on an old step's event is the only
        synchronisation in the loop; nothing reads a result back.
        """
        if self._in_flight and len(self._in_flight) >= _LOOKAHEAD:
            self._in_flight.popleft().synchronize()
        admit_bucket = self._upload_inputs(admitted, layout)
        if admit_bucket:
            self._run("admit", admit_bucket)
        if self.cache is None:
            self._run("step", bucket)
        elif not forecast:
            self._run("full", bucket)
        elif not compute:
            self._run("forecast", bucket)
        else:
            self._run("embed", bucket)
            self._run("blocks", compute)
            if updated:
                self._run("update", updated)
            self._run("head", bucket)
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            self._in_flight.append(done)

    def _run(self, part: str, bucket: int) -> None:
        graph = self._graphs.get((part, bucket))
        if graph is not None:
            graph.replay()
        else:
            self._program(part, bucket)(bucket)

    def _program(self, part: str, bucket: int):
        """What runs ``part`` at ``bucket``: its program from warm-up, else the (compiled) function."""
        return self._programs.get((part, bucket)) or self._fns[part]

    @property
    def parts(self) -> dict[str, tuple[int, ...]]:
        """The functions a step may run, each compiled and captured per bucket of its own."""
        buckets, compute = self.config.buckets, self.config.compute_buckets
        if self.cache is None:
            return {"admit": buckets, "step": buckets}
        return {"admit": buckets, "full": buckets, "forecast": buckets, "embed": buckets, "blocks": compute,
                "update": compute, "head": buckets}

    # ---- plan bookkeeping -------------------------------------------------------------------------------------
    def _upload_inputs(self, admitted: list[RequestState], layout: Layout | None) -> int:
        """Write the admitted requests' settings and the new layout (either may be absent) into the next host copy
        of ``step_inputs`` and upload what changed in one copy; returns the admission's bucket (0: none)."""
        if not admitted and layout is None:
            return 0
        staging = self._staging["step_inputs"]
        host = staging.take()
        ints, floats, lists = step_input_views(host, max(self.config.buckets))
        bucket = self._stage_admission(ints, floats, admitted)
        if layout is not None:
            lists[:] = 0
            lists[:ROW_REAL, :layout.bucket] = (layout.image_slot, layout.row_image, layout.row_label,
                                                layout.cond_row, layout.uncond_row, layout.row_cache)  # to ROW_REAL
            lists[ROW_REAL, :layout.rows] = 1  # the rows before the padding
        staging.upload(self._layout_start if not bucket else 0, None if layout is not None else self._layout_start)
        return bucket

    def _padding_row(self) -> list[int]:
        """An admission row that writes the scratch slot (AdmitColumn's order): one step, no feature cache."""
        return [self.config.max_batch_size, 0, 0, 1, 0, 1, 0, 0, 0]

    def admit(self, states: list[RequestState]) -> None:
        """Initialise the slots of newly admitted requests alone, outside a step (``execute`` does it as a step's
        first part)."""
        bucket = self._upload_inputs(states, None)
        if bucket:
            self._run("admit", bucket)

    def _stage_admission(self, ints: np.ndarray, floats: np.ndarray, states: list[RequestState]) -> int:
        """Write the settings of the admitted requests' images into a host copy's admission rows, padded to a
        bucket; returns the bucket (0: none admitted). One program per bucket (graph-captured on a GPU) then writes
        the slots: a lone request's admission is part of one copy and a replay, not a dozen launches."""
        rows, values = [], []
        for state in states:
            s = state.request.sampling
            settings = [s.num_inference_steps, SAMPLER_IDS[s.sampler]]
            settings += [*s.cache_policy.schedule(s.num_inference_steps), s.cache_policy.order] if \
                self.cache is not None else self._padding_row()[AdmitColumn.CACHE:]
            for image_index, slot in enumerate(state.slots):
                rows.append([slot, *noise_key(state.seed, image_index), *settings])
                values.append([float(s.eta), float(s.guidance_scale)])
        if not rows:
            return 0
        n = len(rows)
        bucket = next(b for b in self.config.buckets if b >= n)
        ints[:n], floats[:n] = rows, values
        ints[n:bucket], floats[n:bucket] = self._admit_padding
        return bucket

    def _admit(self, count: int) -> None:
        """Write the first ``count`` rows of the admission buffers into their slots (padding rows: the scratch
        slot, written several times over)."""
        ints, floats = self.admit_ints[:count], self.admit_floats[:count]
        idx, key = ints[:, AdmitColumn.SLOT], ints[:, AdmitColumn.KEY:AdmitColumn.KEY + 2]
        self.key[idx] = key
        counter = torch.full((count,), INITIAL_NOISE_COUNTER, dtype=torch.int64, device=key.device)
        self.x[idx] = counter_noise(key, counter, self.image_shape)
        self.prev_x0[idx] = 0.0
        self.step_index[idx] = 0
        self.num_steps[idx] = ints[:, AdmitColumn.STEPS]
        self.sampler[idx] = ints[:, AdmitColumn.SAMPLER]
        self.eta[idx] = floats[:, 0]
        self.guidance[idx] = floats[:, 1]
        if self.cache is not None:
            for i, buffer in enumerate((self.cache_interval, self.cache_warmup, self.cache_cooldown, self.cache_order)):
                buffer[idx] = ints[:, AdmitColumn.CACHE + i]

    def gather_samples(self, slots: list[int]) -> torch.Tensor:
        """The finished samples of ``slots``, (n, C, h, w) float32 on the device: a new tensor, which later steps do
        not overwrite."""
        staging = self._staging["finished_slots"]
        staging.take()[:len(slots)] = slots
        staging.upload(0, len(slots))
        return self.x[self.finished_slots[:len(slots)]]

    # ---- start-up ---------------------------------------------------------------------------------------------
    @torch.no_grad()  # not inference mode: a loaded program's guards would refuse it (programs.py)
    def warm_up(self) -> dict[int, float]:
        """Compile (or load) and capture every bucket of every part once, on scratch state; returns seconds per
        bucket (the compute buckets included)."""
        timings = {}
        self.compile_seconds = self.capture_seconds = 0.0  # first calls (compiles), and CUDA graph captures
        saved = [t.clone() for t in self._state_tensors()]
        for bucket in self.config.compute_buckets:
            start = time.perf_counter()
            self.layout.zero_()
            self.layout[IMAGE_SLOT, :bucket] = self.config.max_batch_size  # every position on the scratch slot
            if self.cache is not None:
                self.layout[ROW_CACHE] = self.cache.scratch
            self.num_steps.fill_(1)
            for part, buckets in self.parts.items():
                if bucket in buckets:
                    self.compile_seconds += self._timed(self._prepare, part, bucket)
                    if self.config.cuda_graphs:
                        self.capture_seconds += self._timed(self._capture, part, bucket)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[bucket] = time.perf_counter() - start
            log.info("warmed up bucket %d in %.2f s", bucket, timings[bucket])
        if self.store is not None:
            log.info("compiled programs: %d loaded from and %d compiled into %s", self.store.loaded,
                     self.store.compiled, self.store.directory)
        # One more step of the largest bucket, every row running the blocks, timed: the engine's first estimate of
        # a busy step (admission by time converts waits in steps with it).
        bucket = self.config.buckets[-1]
        self.full_step_seconds = self._timed(self.execute, bucket, bucket, bucket)
        self._in_flight.clear()
        for tensor, value in zip(self._state_tensors(), saved):
            tensor.copy_(value)
        return timings

    def _prepare(self, part: str, bucket: int) -> None:
        """Make ``part``'s program for ``bucket`` (loaded, or compiled) and run it once."""
        if self.store is not None:  # a symbolic part's first program serves its other buckets too (its guards say)
            self._programs[(part, bucket)] = self.store.program(part, str(bucket), self._fns[part], self, bucket)
        self._program(part, bucket)(bucket)

    def _timed(self, fn, *args) -> float:
        """Seconds ``fn(*args)`` took, its GPU work included."""
        start = time.perf_counter()
        fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _capture(self, part: str, bucket: int) -> None:
        fn = self._program(part, bucket)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # let the allocator and autotuning settle before capture
                fn(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool()):
            fn(bucket)
        self._graphs[(part, bucket)] = graph

    def _pool(self):
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.x, self.prev_x0, self.step_index, self.num_steps, self.sampler, self.eta, self.guidance,
                self.key, self.step_inputs]
