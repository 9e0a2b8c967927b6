"""Samplers against diffusers' schedulers, per-sample batching, and the counter-based noise."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model_helpers import randomize
from dit_runtime.diffusion import (DDIM, DDPM, DPM_SOLVER, NoiseSchedule, counter_noise, noise_key, sampler_step,
                                   timestep_at)
from dit_runtime.model import DiTModel

pytestmark = pytest.mark.numerics  # run under every vector-kernel level by test_cpu_portability.py

diffusers = pytest.importorskip("diffusers")

SCHEDULE = NoiseSchedule.linear()
SHAPE = (2, 4, 8, 8)
# Both sides compute in fp32 from the same schedule (ours built in fp64 and rounded, diffusers' cumprod in fp32),
# so a step agrees to a few fp32 ulps of the sample's scale: 1e-5 relative to max|x| (measured: <= 1e-6). A wrong
# coefficient, timestep or variance is off by >= 1e-3 relative.
REL_TOL = 1e-5
COMMON = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def assert_fp32_close(got: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=REL_TOL, atol=REL_TOL * scale,
                               msg=lambda m: f"{msg}\n{m}")


def run_step(x, model_output, i, num_steps, sampler, noise, eta=0.0, prev_x0=None, spacing="trailing",
             learn_sigma=False):
    n = x.shape[0]
    full = lambda v: torch.full((n,), v)  # noqa: E731
    prev_x0 = torch.zeros_like(x) if prev_x0 is None else prev_x0
    return sampler_step(SCHEDULE, model_output, x, full(i), full(num_steps), full(sampler), full(float(eta)),
                        prev_x0, noise, learn_sigma=learn_sigma, spacing=spacing)


def random_inputs(seed: int, learn_sigma: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen) * 3
    eps = torch.randn(SHAPE, generator=gen)
    if learn_sigma:  # the variance interpolation output lives in [-1, 1]
        eps = torch.cat([eps, torch.rand(SHAPE, generator=gen) * 2 - 1], dim=1)
    return x, eps


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("num_steps", [10, 25, 50])
def test_timesteps_match_diffusers(spacing, num_steps):
    scheduler = diffusers.DDIMScheduler(**COMMON, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    ours = timestep_at(torch.arange(num_steps), torch.full((num_steps,), num_steps), spacing=spacing)
    assert ours.tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_steps_match_diffusers(variance_type, spacing):
    learn_sigma = variance_type == "learned_range"
    num_steps = 20
    scheduler = diffusers.DDPMScheduler(**COMMON, variance_type=variance_type, clip_sample=False,
                                        timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps[:-1]):  # non-final steps: both add noise
        x, out = random_inputs(i, learn_sigma)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))  # what diffusers draws
        expected = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        got = run_step(x, out, i, num_steps, DDPM, noise, spacing=spacing, learn_sigma=learn_sigma).x
        assert_fp32_close(got, expected, f"step {i} (t={int(t)})")


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_final_step_is_the_posterior_mean(variance_type):
    """At the last step (t = 1000/S - 1 > 0) we return the posterior mean, adding no noise, as the DiT/ADM code
    does at its t = 0. diffusers adds noise whenever t > 0: with fixed_small its variance there is 0, clamped to
    1e-20, so the outputs agree; with learned_range it mixes in log(beta_t) and adds visible noise, so its output
    minus its own noise term must equal ours."""
    learn_sigma = variance_type == "learned_range"
    num_steps = 20
    scheduler = diffusers.DDPMScheduler(**COMMON, variance_type=variance_type, timestep_spacing="trailing",
                                        clip_sample=False)
    scheduler.set_timesteps(num_steps)
    t = scheduler.timesteps[-1]
    assert t > 0
    x, out = random_inputs(7, learn_sigma)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    theirs = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    ours = run_step(x, out, num_steps - 1, num_steps, DDPM, noise, learn_sigma=learn_sigma).x
    if learn_sigma:
        log_variance = scheduler._get_variance(t, predicted_variance=out[:, 4:])
        assert_fp32_close(ours, theirs - torch.exp(0.5 * log_variance) * noise)
        assert (ours - theirs).abs().max() > 1e-2  # diffusers really did add noise there
    else:
        assert_fp32_close(ours, theirs)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(eta, spacing):
    num_steps = 25
    scheduler = diffusers.DDIMScheduler(**COMMON, clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):  # every step, the final one included
        x, eps = random_inputs(i, learn_sigma=False)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + i))
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        got = run_step(x, eps, i, num_steps, DDIM, noise, eta=eta, spacing=spacing).x
        assert_fp32_close(got, expected, f"step {i} (t={int(t)})")


@torch.no_grad()
@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpm_solver_trajectory_matches_diffusers(num_steps):
    """A whole DPM-Solver++(2M) trajectory with a real (random) DiT as the denoiser: the second-order update
    depends on the previous step's x0, so agreement over all steps checks the multistep bookkeeping too."""
    model = randomize(DiTModel(hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, input_size=8, patch_size=2,
                               in_channels=4, num_classes=10, learn_sigma=False)).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(**COMMON, solver_order=2, algorithm_type="dpmsolver++",
                                                      solver_type="midpoint", final_sigmas_type="zero",
                                                      lower_order_final=True, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    y = torch.tensor([1, 6])
    x_theirs = x_ours = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    prev_x0 = torch.zeros(SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        x_theirs = scheduler.step(model(x_theirs, t.expand(2), y), t, x_theirs).prev_sample
        result = run_step(x_ours, model(x_ours, t.expand(2), y), i, num_steps, DPM_SOLVER, torch.zeros(SHAPE),
                          prev_x0=prev_x0)
        x_ours, prev_x0 = result.x, result.x0
        assert_fp32_close(x_ours, x_theirs, f"step {i} (t={int(t)})")


def test_samples_at_different_steps_schedules_and_samplers_equal_each_run_alone():
    """One batched step over samples with mixed step index / number of steps / sampler / eta gives each sample
    what a batch of one would: the engine can batch requests at different points of different schedules."""
    rows = [  # (step index, num_steps, sampler, eta)
        (0, 10, DDPM, 0.0), (9, 10, DDPM, 0.0), (3, 25, DDIM, 0.0), (24, 25, DDIM, 1.0),
        (0, 20, DPM_SOLVER, 0.0), (7, 20, DPM_SOLVER, 0.0), (49, 50, DPM_SOLVER, 0.0), (12, 50, DDIM, 0.5),
    ]
    n = len(rows)
    gen = torch.Generator().manual_seed(4)
    x, out = torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 8, 8, 8, generator=gen).clamp(-1, 1)
    prev_x0, noise = torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 4, 8, 8, generator=gen)
    i, s, kind = (torch.tensor([r[k] for r in rows]) for k in range(3))
    eta = torch.tensor([r[3] for r in rows])
    batched = sampler_step(SCHEDULE, out, x, i, s, kind, eta, prev_x0, noise, learn_sigma=True)
    for k in range(n):
        one = slice(k, k + 1)
        alone = sampler_step(SCHEDULE, out[one], x[one], i[one], s[one], kind[one], eta[one], prev_x0[one],
                             noise[one], learn_sigma=True)
        # Same elementwise arithmetic; only vectorised vs scalar transcendental kernels may differ, by an ulp.
        torch.testing.assert_close(batched.x[one], alone.x, rtol=1e-6, atol=1e-6, msg=f"row {k}: {rows[k]}")
        torch.testing.assert_close(batched.x0[one], alone.x0, rtol=1e-6, atol=1e-6)
    # The rows really are different computations.
    assert len({round(float(v), 4) for v in batched.x.flatten(1).norm(dim=1)}) == n


def test_counter_noise_depends_only_on_key_and_counter():
    keys = torch.tensor([noise_key(0, k) for k in range(5)])
    counters = torch.tensor([-1, 0, 3, 3, 17])
    batch = counter_noise(keys, counters, (4, 8, 8))
    reordered = counter_noise(keys.flip(0), counters.flip(0), (4, 8, 8)).flip(0)
    assert torch.equal(batch, reordered)
    for k in range(5):
        assert torch.equal(batch[k], counter_noise(keys[k:k + 1], counters[k:k + 1], (4, 8, 8))[0])
    assert not torch.equal(batch[2], batch[3])  # same counter, different key
    assert not torch.equal(counter_noise(keys[:1], torch.tensor([1]), (4, 8, 8)), batch[:1])  # different counter


def test_noise_keys_on_the_host_are_the_tensor_hash_of_the_same_words():
    """noise_key hashes Python ints; the same hash as a tensor (counter_noise's) must give the same words, so a
    seed names the same images as it did when keys were hashed with torch ops."""
    from dit_runtime.diffusion import _mix32

    def mix(v: int) -> int:
        return int(_mix32(torch.tensor(v & 0xFFFFFFFF, dtype=torch.int64)))

    rng = random.Random(0)
    for seed in [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1] + [rng.randrange(2 ** 63) for _ in range(200)]:
        for k in (0, 1, 7, rng.randrange(1000)):
            assert noise_key(seed, k) == (mix(seed) ^ mix(k + 0x9E3779B9), mix(seed >> 32) ^ mix(k * 7 + 1))


def test_noise_keys_differ_by_seed_and_image():
    keys = {noise_key(seed, k) for seed in range(20) for k in range(20)}
    assert len(keys) == 400


def test_counter_noise_is_standard_normal_and_streams_are_uncorrelated():
    keys = torch.tensor([noise_key(seed, k) for seed in range(4) for k in range(16)])  # 64 streams
    z = counter_noise(keys, torch.zeros(64, dtype=torch.int64), (4096,))  # (64, 4096)
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean()) < 4 / math.sqrt(n)  # 4 standard errors
    assert abs(flat.std() - 1) < 4 / math.sqrt(2 * n)
    # Kolmogorov-Smirnov distance to N(0, 1); 1.95 / sqrt(n) is the 0.1% critical value.
    sorted_z = flat.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ecdf - cdf).abs(), (cdf - (ecdf - 1 / n)).abs()).max()
    assert ks < 1.95 / math.sqrt(n), f"KS distance {ks:.4f}"
    # Neighbouring images, and neighbouring counters of one image, are uncorrelated (4 standard errors).
    m = z.shape[1]
    assert abs(torch.corrcoef(z[:2])[0, 1]) < 4 / math.sqrt(m)
    next_counter = counter_noise(keys[:1], torch.ones(1, dtype=torch.int64), (4096,))
    assert abs(torch.corrcoef(torch.cat([z[:1], next_counter]))[0, 1]) < 4 / math.sqrt(m)


@pytest.mark.parametrize("sampler", [DDPM, DDIM])
def test_a_step_stays_finite_when_its_variance_rounds_below_zero(sampler):
    """1 - alpha_bar_t / alpha_bar_prev is 0 when a step repeats its timestep (a step that does not move), and
    compiled code rounded it a hair below 0 for some rows: sqrt and log of it gave NaN latents on a GPU. A schedule
    whose alpha_bar dips there makes the same rounding happen here."""
    import dataclasses

    i, num_steps = 10, 1000
    t, t_prev = 999 - i, 998 - i  # trailing spacing at 1000 steps
    ab = SCHEDULE.alphas_cumprod.clone()
    ab[t_prev] = ab[t] * (1 - 1e-6)
    schedule = dataclasses.replace(SCHEDULE, alphas_cumprod=ab)
    x, out = random_inputs(0, learn_sigma=True)
    n = x.shape[0]
    full = lambda v: torch.full((n,), v)  # noqa: E731
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for eta in (0.0, 0.7):
        got = sampler_step(schedule, out, x, full(i), full(num_steps), full(sampler), full(eta), torch.zeros_like(x),
                           noise, learn_sigma=True).x
        assert torch.isfinite(got).all(), (sampler, eta)
