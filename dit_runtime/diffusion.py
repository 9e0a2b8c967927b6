"""Diffusion math: the paper's noise schedule, its training loss, and batched samplers.

Every sampler step is a tensor function over a batch in which each sample carries its own step index,
its own number of steps, its own sampler and its own noise stream, so one model forward can serve requests
that are at different points of different schedules. Nothing here branches on tensor values or syncs
with the host; choices are made with ``torch.where``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .request import NUM_TRAIN_TIMESTEPS, SAMPLERS

# The paper's training schedule (DDPM/ADM "linear", as used by DiT), over NUM_TRAIN_TIMESTEPS.
BETA_START = 1e-4
BETA_END = 0.02

SAMPLER_IDS = {name: i for i, name in enumerate(SAMPLERS)}
DDPM, DDIM, DPM_SOLVER, CONSISTENCY = range(4)

Spacing = Literal["trailing", "leading", "linspace"]
SPACINGS = ("trailing", "leading", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep constants of the forward process, as fp32 tensors on one device."""

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,)

    @classmethod
    def linear(cls, num_timesteps: int = NUM_TRAIN_TIMESTEPS, device: torch.device | str = "cpu") -> "NoiseSchedule":
        """The DDPM linear beta schedule, rescaled for ``num_timesteps`` as in ADM; computed in fp64."""
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(betas.to(device, torch.float32), alphas_cumprod.to(device, torch.float32))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (any shape); t < 0 means "before the first step" (alpha_bar = 1)."""
        ab = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(ab), ab)


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor,
                   beta_t: torch.Tensor) -> torch.Tensor:
    """The mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7), from alpha_bar at t and at the step before it and beta_t."""
    return ((torch.sqrt(ab_prev) * beta_t / (1 - ab_t)) * x0
            + (torch.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab_t)) * x_t)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) for broadcasting against ``like``; floats take its dtype, bools and ints stay."""
    v = v.reshape(-1, *([1] * (like.dim() - 1)))
    return v.to(like.dtype) if v.is_floating_point() else v


# --------------------------------------------------------------------------------------------------------------
# Timestep spacing for sampling with fewer steps than training.


def timestep_at(step_index: torch.Tensor, num_steps: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                spacing: Spacing = "trailing") -> torch.Tensor:
    """The timestep of sampling step i of an S-step schedule, per sample; -1 once i >= S (the clean image).

    ``trailing`` starts at T-1 (recommended: the first step sees pure noise), ``leading`` is diffusers' DDPM and
    DDIM default, ``linspace`` is the DiT repository's respacing (evenly spaced, first T-1, last 0).
    """
    i = step_index.to(torch.int64)
    s = num_steps.to(torch.int64)
    T = num_train_timesteps
    if spacing == "trailing":
        t = torch.round(T - i.double() * (T / s.double())).to(torch.int64) - 1
    elif spacing == "leading":
        t = (s - 1 - i) * (T // s)
    elif spacing == "linspace":
        t = torch.round((T - 1) * (s - 1 - i).double() / (s - 1).clamp(min=1).double()).to(torch.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.where(i >= s, torch.full_like(t, -1), t)


# --------------------------------------------------------------------------------------------------------------
# Counter-based Gaussian noise: an image's noise depends only on its own key and the step, never on the batch.

_M32 = 0xFFFFFFFF
# An image's initial noise x_T is drawn at this counter; the sampler's noise of step k at counter k.
INITIAL_NOISE_COUNTER = -1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32")."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """``_mix32`` of one Python int: the same numbers, without a torch operation per arithmetic step."""
    x &= _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def noise_key(seed: int, image_index: int) -> tuple[int, int]:
    """Two 32-bit words that name one image's noise stream (computed on the host at every admission)."""
    return (_mix32_int(seed) ^ _mix32_int(image_index + 0x9E3779B9),
            _mix32_int(seed >> 32) ^ _mix32_int(image_index * 7 + 1))


def counter_noise(key: torch.Tensor, counter: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise (N, *shape) in fp32 from per-sample keys (N, 2) int64 and counters (N,) int64.

    The same (key, counter) gives the same numbers on any device and in any batch, which is what makes a
    request's images independent of its batch neighbours.
    """
    numel = math.prod(shape)
    lane = torch.arange(2 * numel, device=key.device, dtype=torch.int64)  # two uniforms per normal
    k0 = key[:, 0:1] & _M32
    k1 = key[:, 1:2] & _M32
    c = (counter.to(torch.int64)[:, None] + 2) & _M32
    h = _mix32(k0 ^ _mix32(k1 ^ _mix32(c ^ _mix32(lane[None]))))  # (N, 2 * numel)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    u1, u2 = u[:, :numel], u[:, numel:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.reshape(key.shape[0], *shape)


# --------------------------------------------------------------------------------------------------------------
# Batched sampler step.


def consistency_x0(x: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A consistency student's clean-image estimate: x0 = c_skip(t) x + c_out(t) F with c_skip = sqrt(alpha_bar) and
    c_out = -sqrt(1 - alpha_bar) (F is the velocity, alpha eps - sigma x0).

    The boundary condition holds (c_skip -> 1, c_out -> 0 as t -> 0), and unlike eps -> x0, which divides by
    sqrt(alpha_bar) (0.006 at the linear schedule's last timestep), an error in F reaches x0 at most one to one:
    what a student that jumps from pure noise in one step needs. alpha_bar broadcasts against x.
    """
    return torch.sqrt(alpha_bar) * x - torch.sqrt(1 - alpha_bar) * output


@dataclass
class StepResult:
    x: torch.Tensor  # the sample after this step
    x0: torch.Tensor  # the model's estimate of the clean sample at this step (DPM-Solver++ keeps it)


def sampler_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, step_index: torch.Tensor,
                 num_steps: torch.Tensor, sampler: torch.Tensor, eta: torch.Tensor, prev_x0: torch.Tensor,
                 noise: torch.Tensor, *, learn_sigma: bool, spacing: Spacing = "trailing",
                 clip_denoised: bool = False) -> StepResult:
    """One denoising step for every sample, each at its own step of its own schedule and sampler.

    model_output: (N, C_out, H, W) guided model output (noise, then variance interpolation if learned; for the
    consistency sampler a student's output, read by ``consistency_x0`` and stepped as DDIM between its boundaries);
    x: (N, C, H, W); step_index, num_steps, sampler: (N,) int; eta: (N,) DDIM eta; prev_x0: (N, C, H, W) the
    previous step's x0 estimate (read by DPM-Solver++ second order); noise: (N, C, H, W) standard normal.
    """
    c = x.shape[1]
    T = schedule.num_timesteps
    f32 = torch.float32
    x = x.to(f32)
    eps = model_output[:, :c].to(f32)
    i = step_index.to(torch.int64)
    s = num_steps.to(torch.int64)
    t = timestep_at(i, s, T, spacing)
    t_prev = timestep_at(i + 1, s, T, spacing)  # -1 after the last step
    ab_t = _bcast(schedule.alpha_bar(t), x)
    ab_prev = _bcast(schedule.alpha_bar(t_prev), x)
    last = _bcast(i + 1 >= s, x)

    kind = _bcast(sampler, x)
    consistency = kind == CONSISTENCY
    x0 = torch.where(consistency, consistency_x0(x, eps, ab_t), (x - torch.sqrt(1 - ab_t) * eps) / torch.sqrt(ab_t))
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    implied = (x - torch.sqrt(ab_t) * x0) / torch.sqrt(1 - ab_t)  # the noise a clipped or a student's x0 implies
    eps = implied if clip_denoised else torch.where(consistency, implied, eps)

    # DDPM (ancestral): posterior mean, and the learned variance interpolation when the model predicts one.
    # 1 - ab_t / ab_prev is exactly 0 when a step repeats its timestep, and compiled code can round it a hair
    # below 0 (a NaN in log and sqrt); the clamps change nothing for a step that moves.
    beta_t = (1 - ab_t / ab_prev).clamp(min=1e-20)
    mean = posterior_mean(x0, x, ab_t, ab_prev, beta_t)
    posterior_var = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    if learn_sigma:
        frac = (model_output[:, c:].to(f32) + 1) / 2
        log_var = frac * torch.log(beta_t) + (1 - frac) * torch.log(posterior_var)
    else:
        log_var = torch.log(posterior_var)
    x_ddpm = mean + torch.where(last, torch.zeros_like(x), torch.exp(0.5 * log_var) * noise)

    # DDIM: deterministic at eta = 0.
    sigma = _bcast(eta, x) * torch.sqrt(((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0))
    direction = torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
    x_ddim = torch.sqrt(ab_prev) * x0 + direction + torch.where(last, torch.zeros_like(x), sigma * noise)

    # DPM-Solver++(2M), midpoint form; first order on the first and the last step (which lands on sigma = 0).
    t_before = timestep_at((i - 1).clamp(min=0), s, T, spacing)
    ab_before = _bcast(schedule.alpha_bar(t_before), x)
    alpha_s, sigma_s = torch.sqrt(ab_t), torch.sqrt(1 - ab_t)
    alpha_t, sigma_t = torch.sqrt(ab_prev), torch.sqrt(1 - ab_prev)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t.clamp(min=1e-30))
    lambda_before = torch.log(torch.sqrt(ab_before)) - torch.log(torch.sqrt(1 - ab_before))
    h = lambda_t - lambda_s
    phi = torch.expm1(-h)  # exp(-h) - 1; -1 at the last step
    first_order = (sigma_t / sigma_s) * x - alpha_t * phi * x0
    r0 = (lambda_s - lambda_before) / h
    d1 = (x0 - prev_x0.to(f32)) / torch.where(r0 == 0, torch.ones_like(r0), r0)
    second_order = first_order - 0.5 * alpha_t * phi * d1
    use_first = _bcast((i == 0) | (i + 1 >= s), x)
    x_dpm = torch.where(last, x0, torch.where(use_first, first_order, second_order))

    # A consistency student steps as DDIM between its segments' boundaries (multistep consistency, Heek et al. 2024).
    x_next = torch.where(kind == DDPM, x_ddpm, torch.where((kind == DDIM) | consistency, x_ddim, x_dpm))
    return StepResult(x=x_next, x0=x0)


# --------------------------------------------------------------------------------------------------------------
# Training: q_sample and the DiT/ADM hybrid loss.


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse clean samples to timesteps t: sqrt(ab) x0 + sqrt(1 - ab) noise."""
    ab = _bcast(schedule.alpha_bar(t), x0)
    return torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * noise


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder term at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def training_losses(schedule: NoiseSchedule, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, learn_sigma: bool) -> dict[str, torch.Tensor]:
    """Per-sample losses (N,): ``mse`` on the noise and, with learned sigma, ``vb`` (the variational bound on the
    variance, in bits per dimension, with the mean's gradient stopped as in ADM/DiT); ``loss`` is their sum."""
    c = x0.shape[1]
    eps = model_output[:, :c].float()
    mse = ((noise.float() - eps) ** 2).mean(dim=tuple(range(1, x0.dim())))
    if not learn_sigma:
        return {"loss": mse, "mse": mse}
    frac = (model_output[:, c:].float() + 1) / 2
    x0f, xtf = x0.float(), x_t.float()
    ab_t = _bcast(schedule.alpha_bar(t), x0f)
    ab_prev = _bcast(schedule.alpha_bar(t - 1), x0f)
    beta_t = _bcast(schedule.betas[t], x0f)
    post_var = beta_t * (1 - ab_prev) / (1 - ab_t)
    # ADM clips the log posterior variance at t = 0 to its value at t = 1.
    ab_1, ab_0 = schedule.alphas_cumprod[1], schedule.alphas_cumprod[0]
    var_at_1 = schedule.betas[1] * (1 - ab_0) / (1 - ab_1)
    post_log_var = torch.log(torch.where(_bcast(t == 0, x0f), var_at_1.expand_as(post_var), post_var))
    post_mean = posterior_mean(x0f, xtf, ab_t, ab_prev, beta_t)
    # The model's distribution, with eps detached: vb trains only the variance.
    pred_x0 = (xtf - torch.sqrt(1 - ab_t) * eps.detach()) / torch.sqrt(ab_t)
    model_mean = posterior_mean(pred_x0, xtf, ab_t, ab_prev, beta_t)
    model_log_var = frac * torch.log(beta_t) + (1 - frac) * post_log_var
    dims = tuple(range(1, x0.dim()))
    kl = _normal_kl(post_mean, post_log_var, model_mean, model_log_var).mean(dim=dims) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_log_var).mean(dim=dims) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
