"""Helpers shared by the dit_runtime tests (a plain module: `conftest` names clash between test folders)."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from dit_runtime.diffusion import SAMPLER_IDS, NoiseSchedule, counter_noise, noise_key, sampler_step, timestep_at


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter from N(0, std): adaLN-Zero's init makes a fresh DiT output exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def reordering_tolerance(dtype: torch.dtype, reduction_length: int, chained: int = 1) -> float:
    """How far, relative to the size of its terms, a result may move when its sums are taken in another order.

    A matrix product at another shape (another batch size) may be blocked, vectorised and threaded differently by
    BLAS, so each of its dot products of length K may be summed in another order. Two orders of one sum of K terms
    differ by at most (K - 1) eps sum|terms| (the recursive-summation bound, Higham 2002, eq. 4.4, taken twice with
    u = eps / 2); ``chained`` reductions one after another add their bounds, to first order. Compare with
    ``atol = bound * max|expected|``: the bound is relative to the terms, not to each output element.
    """
    return chained * (reduction_length - 1) * torch.finfo(dtype).eps


def model_reordering_tolerance(config, dtype: torch.dtype = torch.float32, steps: int = 1) -> float:
    """``reordering_tolerance`` of a DiT forward (``steps`` of them in sequence, as a sampling loop runs them).

    Its longest reduction is the widest of: the timestep frequencies (256), the hidden and FFN widths, the attention
    over all tokens and the patch embedding. Along its deepest path a forward chains the conditioning MLP and adaLN
    (3 reductions), then per block qkv, scores, the weighted sum of values, proj, LayerNorm, fc1, fc2 and the next
    LayerNorm (8), then the final LayerNorm and linear (2).
    """
    from dit_runtime.model import TIMESTEP_FREQ_DIM

    longest = max(TIMESTEP_FREQ_DIM, config.hidden_dim, config.ffn_dim, config.num_tokens,
                  config.in_channels * config.patch_size ** 2)
    return reordering_tolerance(dtype, longest, chained=steps * (3 + 8 * config.num_layers + 2))


def assert_close_across_shapes(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    """``actual`` equals ``expected`` up to a reordering bound (see ``reordering_tolerance``), on the tensor's scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound * scale)


def reference_sample(model, request, num_train_timesteps: int = 1000, clip_denoised: bool = False) -> np.ndarray:
    """The plain way: one request at a time, the whole batch at one step, no engine. A teacher runs its conditional
    and null rows through ``forward_with_cfg``; a student (a guidance embedding) takes its scale as an input."""
    schedule = NoiseSchedule.linear(num_train_timesteps)
    s = request.sampling
    labels = torch.tensor(request.class_ids)
    n, shape = len(labels), (model.config.in_channels, model.config.input_size, model.config.input_size)
    keys = torch.tensor([noise_key(s.seed, i) for i in range(n)])
    x = counter_noise(keys, torch.full((n,), -1), shape)
    prev_x0 = torch.zeros_like(x)
    steps = torch.full((n,), s.num_inference_steps)
    w = torch.full((n,), s.guidance_scale)
    with torch.no_grad():
        for i in range(s.num_inference_steps):
            step = torch.full((n,), i)
            t = timestep_at(step, steps, num_train_timesteps)
            if model.config.guidance_embed:  # a student: its scale (and its step count) are inputs
                out = model(x, t, labels, w, torch.full((n,), s.num_inference_steps))
            else:
                out = model.forward_with_cfg(x, t, labels, w)
            res = sampler_step(schedule, out, x, step, steps, torch.full((n,), SAMPLER_IDS[s.sampler]),
                               torch.full((n,), s.eta), prev_x0, counter_noise(keys, step, shape),
                               learn_sigma=model.config.learn_sigma, clip_denoised=clip_denoised)
            x, prev_x0 = res.x, res.x0
    return x.numpy()


def hold_the_gil(seconds: float) -> None:
    """Keep the GIL for ``seconds``: Python code that no other thread may interrupt until it blocks."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)  # no forced hand-over: the watch waits until this thread sleeps
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    finally:
        sys.setswitchinterval(interval)
