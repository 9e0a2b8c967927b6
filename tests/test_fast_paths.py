"""The engine's inference fast paths compute the model's function and leave its checkpoint layout alone."""

from __future__ import annotations

import pytest
import torch

from dit_runtime.engine.fast_paths import FastPaths, SplitKLinear, apply_fast_paths
from dit_runtime.model import DiTModel, get_preset
from model_helpers import assert_close_across_shapes, model_reordering_tolerance, randomize

pytestmark = pytest.mark.numerics  # run under every vector-kernel level by test_cpu_portability.py

# CUDA's GELU epilogue is left out on the CPU: there torch._addmm_activation computes the exact (erf) GELU, not the
# model's tanh approximation, so it would be another function (it runs, and is checked, in the GPU tests).
SPLIT_ON_CPU = FastPaths(joined_adaln=True, gelu_epilogue=False, split_k=2, split_k_max_rows=10 ** 6)


def tiny_model(seed: int = 0) -> DiTModel:
    return randomize(DiTModel.from_config(get_preset("dit-tiny")), seed=seed).eval().requires_grad_(False)


def tiny_inputs(model: DiTModel, n: int = 3):
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    return x, torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, cfg.num_classes, (n,), generator=gen)


@torch.no_grad()
def test_fast_paths_compute_the_same_function_and_keep_the_checkpoint_layout():
    model = tiny_model()
    inputs = tiny_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(*inputs)
    fast = apply_fast_paths(model, SPLIT_ON_CPU, cuda=True)
    assert isinstance(model.blocks[0].attn.proj, SplitKLinear) and isinstance(model.blocks[0].mlp.fc2, SplitKLinear)
    # Only the summation order changes (one joined adaLN GEMM; K cut in two halves summed in fp32).
    assert_close_across_shapes(fast(*inputs), reference, model_reordering_tolerance(model.config))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_loading_weights_after_joining_adaln_reaches_the_joined_gemm():
    model = tiny_model()
    fast = apply_fast_paths(model, FastPaths(), cuda=False)
    other = tiny_model(seed=3)
    model.load_state_dict(other.state_dict())  # copies into the views of the joined buffer
    inputs = tiny_inputs(model)
    out = fast(*inputs)
    assert_close_across_shapes(out, other(*inputs), model_reordering_tolerance(model.config))
    assert (out - tiny_model()(*inputs)).abs().max() > 1e-2  # the old weights would give another output


def test_cpu_skips_the_cuda_only_paths_and_split_k_that_does_not_divide():
    on_cpu = tiny_model()
    apply_fast_paths(on_cpu, FastPaths(split_k=2), cuda=False)
    assert type(on_cpu.blocks[0].attn.proj) is torch.nn.Linear and type(on_cpu.blocks[0].mlp).__name__ == "Mlp"
    not_dividing = tiny_model()
    apply_fast_paths(not_dividing, FastPaths(gelu_epilogue=False, split_k=7), cuda=True)  # 7 divides neither 32 nor 64
    assert type(not_dividing.blocks[0].attn.proj) is torch.nn.Linear
