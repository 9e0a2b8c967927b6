"""dit-bench's plumbing that runs without a GPU: the step's slots hold the same inputs as the diffusers setups."""

from __future__ import annotations

import torch

from dit_runtime.cli.bench import fill_rows, random_dit
from dit_runtime.diffusion import timestep_at
from dit_runtime.engine.runner import ModelRunner
from dit_runtime.engine.types import EngineConfig


def test_fill_rows_puts_the_given_latents_timesteps_and_labels_in_the_step():
    runner = ModelRunner(random_dit("dit-tiny", torch.float32), EngineConfig(max_batch_size=16), clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    fill_rows(runner, 16, (x, t, y))
    assert torch.equal(runner.x[:16], x)
    assert torch.equal(runner.layout[2, :16], y)
    assert torch.equal(timestep_at(runner.step_index[:16], runner.num_steps[:16]), t)
    runner.execute(16)  # the rows never finish: a step later they are still in flight, one step on
    assert torch.equal(runner.step_index[:16], (999 - t) * 1000 + 1)


def test_the_rows_stay_the_inputs_whatever_the_model_predicts():
    """A row that never finishes repeats its timestep; its step must neither move the latent nor make it NaN, even
    when the model predicts variance values far outside [-1, 1] (DDPM's learned variance is infinite there)."""
    model = random_dit("dit-tiny", torch.float32, random_final_layer=True)
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(100)  # predictions of size ~10
    runner = ModelRunner(model, EngineConfig(max_batch_size=16), clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    fill_rows(runner, 16, (x, t, y))
    for _ in range(20):
        runner.execute(16)
    assert torch.isfinite(runner.x[:16]).all()
    torch.testing.assert_close(runner.x[:16], x, rtol=0, atol=1e-4)
