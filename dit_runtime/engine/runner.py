"""The model runner: owns the model, the per-image state buffers and the compiled, graph-captured step.

State lives on the device in slot-major buffers (one slot per image in flight, plus a scratch slot that padding
reads and writes). One step, for a bucket of B rows, is a single function of those buffers:

    gather the B image positions' state -> build the rows (conditional + null) -> one model forward (with the
    fast paths of fast_paths.py) -> guidance -> sampler step (each image at its own step of its own schedule) ->
    scatter back

It has static shapes per bucket, reads its per-step layout from a device buffer that changes only when requests
join or leave, and makes no host synchronisation, so it compiles with torch.compile and captures as a CUDA graph.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import torch

from ..diffusion import (INITIAL_NOISE_COUNTER, SAMPLER_IDS, NoiseSchedule, counter_noise, noise_key,
                         sampler_step, timestep_at)
from ..model import DiTModel, apply_guidance
from .fast_paths import apply_fast_paths, check_fp8_support
from .scheduler import Layout, RequestState
from .types import EngineConfig

log = logging.getLogger(__name__)

# The dtype of weights and activations for each precision (fp8: bf16 around the FP8 GEMMs).
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# Steps the host may enqueue ahead of the GPU.
_LOOKAHEAD = 2
# Rows of the packed layout buffer: image_slot, row_image, row_label, cond_row, uncond_row.
_LAYOUT_ROWS = 5


def use_compile_cache_dir(path: str) -> None:
    """Point inductor's caches (FX graphs, AOTAutograd, Triton kernels) of this process at ``path``.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it resolves a cache path, and writes its default there the
    first time anything asks (importing ``torch._dynamo.utils`` is enough). So the variable is set outright, not
    only when unset, and the in-memory caches that may hold paths under the old directory are cleared, as torch's
    own ``temporary_cache_dir`` does. The setting is per process: the last engine built decides.
    """
    path = os.path.abspath(path)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") == path:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # a torch without it: the variable alone
        return
    clear_caches()


class ModelRunner:
    """Executes step plans for one model on one device."""

    def __init__(self, model: DiTModel, config: EngineConfig, clip_denoised: bool):
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
        self.schedule = NoiseSchedule.linear(device=self.device)
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
        self.layout = torch.zeros(_LAYOUT_ROWS, max(config.buckets), dtype=torch.int64, device=dev)
        self._in_flight: deque[torch.cuda.Event] = deque()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._step_fn = self._step
        if config.compile:
            if config.compile_cache_dir:
                use_compile_cache_dir(config.compile_cache_dir)
            # Up to one specialisation per bucket, counted per code object: every runner in this process compiles
            # the same _step, so each adds its own allowance (past the limit, fullgraph=True fails hard).
            name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, name, getattr(torch._dynamo.config, name) + 2 * len(config.buckets))
            self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=bool(config.compile_dynamic),
                                          options=dict(config.compile_options) if config.compile_options else None)

    # ---- the step ---------------------------------------------------------------------------------------------
    def _step(self, bucket: int) -> None:
        """One denoising step for ``bucket`` image positions and ``bucket`` rows, in place on the state buffers."""
        image_slot, row_image, row_label, cond_row, uncond_row = self.layout[:, :bucket].unbind(0)  # (B,) each
        x = self.x[image_slot]  # (B, C, H, W) fp32
        step = self.step_index[image_slot]
        num_steps = self.num_steps[image_slot]
        t = timestep_at(step, num_steps, self.schedule.num_timesteps, self.config.spacing)  # (B,)
        out = self.forward(x[row_image].to(self.dtype), t[row_image], row_label).float()  # (B, C_out, H, W)
        # Per image position: its conditional and null rows (the same row when unguided, where the scale is 1).
        model_output = apply_guidance(out[cond_row], out[uncond_row], self.guidance[image_slot], self.image_shape[0])
        noise = counter_noise(self.key[image_slot], step, self.image_shape)
        result = sampler_step(self.schedule, model_output, x, step, num_steps, self.sampler[image_slot],
                              self.eta[image_slot], self.prev_x0[image_slot], noise, learn_sigma=self.learn_sigma,
                              spacing=self.config.spacing, clip_denoised=self.clip_denoised)
        self.x[image_slot] = result.x
        self.prev_x0[image_slot] = result.x0
        self.step_index[image_slot] = step + 1

    def execute(self, bucket: int) -> None:
        """Run one step on the current layout (asynchronous on the GPU).

        The host may run at most ``_LOOKAHEAD`` steps ahead of the GPU: enough to keep it fed, few enough that
        progress events and step timings describe work that has actually been done. Waiting on an old step's
        event is the only synchronisation in the loop; nothing reads a result back.
        """
        if self._in_flight and len(self._in_flight) >= _LOOKAHEAD:
            self._in_flight.popleft().synchronize()
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._step_fn(bucket)
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            self._in_flight.append(done)

    # ---- plan bookkeeping -------------------------------------------------------------------------------------
    def set_layout(self, layout: Layout) -> None:
        """Upload the rows/images layout; called only when requests joined or left."""
        host = torch.zeros_like(self.layout, device="cpu", pin_memory=self.device.type == "cuda")
        for i, values in enumerate((layout.image_slot, layout.row_image, layout.row_label, layout.cond_row,
                                    layout.uncond_row)):
            host[i, :layout.bucket] = torch.tensor(values, dtype=torch.int64)
        self.layout.copy_(host, non_blocking=True)

    def admit(self, states: list[RequestState]) -> None:
        """Initialise the slots of newly admitted requests: initial noise and their sampler settings."""
        slots, keys, steps, samplers, etas, guidance = [], [], [], [], [], []
        for state in states:
            s = state.request.sampling
            for image_index, slot in enumerate(state.slots):
                slots.append(slot)
                keys.append(noise_key(state.seed, image_index))
                steps.append(s.num_inference_steps)
                samplers.append(SAMPLER_IDS[s.sampler])
                etas.append(float(s.eta))
                guidance.append(float(s.guidance_scale))
        if not slots:
            return
        dev = self.device
        idx = torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True)
        key = torch.tensor(keys, dtype=torch.int64).to(dev, non_blocking=True)
        self.key[idx] = key
        self.x[idx] = counter_noise(key, torch.full((len(slots),), INITIAL_NOISE_COUNTER, device=dev),
                                    self.image_shape)
        self.prev_x0[idx] = 0.0
        self.step_index[idx] = 0
        self.num_steps[idx] = torch.tensor(steps, dtype=torch.int64).to(dev, non_blocking=True)
        self.sampler[idx] = torch.tensor(samplers, dtype=torch.int64).to(dev, non_blocking=True)
        self.eta[idx] = torch.tensor(etas).to(dev, non_blocking=True)
        self.guidance[idx] = torch.tensor(guidance).to(dev, non_blocking=True)

    def read_samples(self, slots: list[int]) -> torch.Tensor:
        """Copy the finished samples of ``slots`` to the host (non-blocking on the GPU; wait on an event)."""
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        out = self.x[idx]
        if self.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            return host
        return out.clone()

    # ---- start-up ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self) -> dict[int, float]:
        """Compile (and capture) every bucket once, on scratch state; returns seconds per bucket."""
        timings = {}
        saved = [t.clone() for t in self._state_tensors()]
        for bucket in self.config.buckets:
            start = time.perf_counter()
            self.layout.zero_()
            self.layout[0, :bucket] = self.config.max_batch_size  # every position on the scratch slot
            self.num_steps.fill_(1)
            self._step_fn(bucket)
            if self.config.cuda_graphs:
                self._capture(bucket)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[bucket] = time.perf_counter() - start
            log.info("warmed up bucket %d in %.2f s", bucket, timings[bucket])
        for tensor, value in zip(self._state_tensors(), saved):
            tensor.copy_(value)
        return timings

    def _capture(self, bucket: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # let the allocator and autotuning settle before capture
                self._step_fn(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool()):
            self._step_fn(bucket)
        self._graphs[bucket] = graph

    def _pool(self):
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.x, self.prev_x0, self.step_index, self.num_steps, self.sampler, self.eta, self.guidance,
                self.key, self.layout]
