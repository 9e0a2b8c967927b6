"""DiTModel against an implementation nobody here wrote (diffusers' DiTTransformer2DModel), and its batching."""

from __future__ import annotations

import pytest
import torch

from model_helpers import assert_close_across_shapes, model_reordering_tolerance, randomize
from dit_runtime.checkpoint import CheckpointError, build_model, import_diffusers_folder
from dit_runtime.model import DiTModel, get_preset

pytestmark = pytest.mark.numerics  # run under every vector-kernel level by test_cpu_portability.py

diffusers = pytest.importorskip("diffusers")

# fp32 throughout. Both models do the same arithmetic in a different order (fused vs separate qkv, attention
# kernels), so they agree to fp32 rounding: relative error ~1e-7 x depth. A wrong or swapped block, a wrong
# embedding or the timestep detail below moves the output by 1e-3 to O(1) relative (asserted below).
REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_diffusers_dit(share_embedders: bool = True) -> torch.nn.Module:
    """A small random DiTTransformer2DModel. adaLN-Zero init would make every output zero, so all weights are
    redrawn; the per-block timestep/class embedders are then made equal, as in a DiT (they are one module)."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10, norm_eps=1e-6).eval()
    randomize(model, std=0.2)
    if share_embedders:
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


def use_paper_timestep_frequencies(model: torch.nn.Module) -> None:
    """diffusers' DiT embeds timesteps with frequencies exp(-ln(10000) i / (half - 1)) (downscale_freq_shift=1);
    the paper (and our model) uses i / half. Setting the shift to 0 makes diffusers compute the paper's function."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def convert(model: torch.nn.Module, tmp_path) -> DiTModel:
    model.save_pretrained(tmp_path / "diffusers_dit")
    imported = import_diffusers_folder(tmp_path / "diffusers_dit")
    return build_model(imported.config, imported.state_dict, "test")


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 is the null class
    return x, t, y


@torch.no_grad()
def test_converted_diffusers_model_computes_the_same_function(tmp_path, inputs):
    theirs = make_diffusers_dit()
    ours = convert(theirs, tmp_path)
    assert ours.config.num_layers == 3 and ours.config.num_heads == 2 and ours.config.learn_sigma
    x, t, y = inputs

    differs = rel_err(ours(x, t, y), theirs(x, t, y).sample)
    use_paper_timestep_frequencies(theirs)
    agrees = rel_err(ours(x, t, y), theirs(x, t, y).sample)

    assert agrees < REL_TOL, f"converted model differs from diffusers by {agrees:.2e} (relative)"
    # Without the patch the two functions differ measurably: the test has found the one deliberate difference.
    assert differs > 1e-3, f"timestep frequency shift changed the output by only {differs:.2e}"


@torch.no_grad()
def test_tolerance_would_catch_a_wrong_block(tmp_path, inputs):
    theirs = make_diffusers_dit()
    use_paper_timestep_frequencies(theirs)
    ours = convert(theirs, tmp_path)
    ours.blocks[0], ours.blocks[1] = ours.blocks[1], ours.blocks[0]
    x, t, y = inputs
    assert rel_err(ours(x, t, y), theirs(x, t, y).sample) > 100 * REL_TOL


def test_conversion_refuses_blocks_with_different_embedders(tmp_path):
    model = make_diffusers_dit(share_embedders=False)
    model.save_pretrained(tmp_path / "unshared")
    with pytest.raises(CheckpointError, match=r"block 1's embedder weight norm1\.emb\.timestep_embedder"):
        import_diffusers_folder(tmp_path / "unshared")


@torch.no_grad()
def test_forward_with_cfg_equals_conditional_and_null_passes_run_separately():
    model = randomize(DiTModel.from_preset("dit-tiny")).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t, y = torch.tensor([10, 400, 990]), torch.tensor([1, 5, 7])
    scale = torch.tensor([1.0, 4.0, 7.5])
    guided = model.forward_with_cfg(x, t, y, scale)  # one forward of 2N rows
    cond, null = model(x, t, y), model(x, t, torch.full_like(y, model.config.null_class))  # two of N rows
    # Batches of 2N and N rows are matrix products of other shapes: BLAS may sum them in another order, so the two
    # agree to that reordering's bound (not bit for bit: they differed by 3e-7 on an AVX-512 EPYC). Guidance
    # eps_null + s (eps_cond - eps_null) scales an error in either half by at most 1 + 2s.
    bound = model_reordering_tolerance(model.config)
    expected_eps = null[:, :4] + scale.view(-1, 1, 1, 1) * (cond[:, :4] - null[:, :4])
    assert_close_across_shapes(guided[:, :4], expected_eps, bound * (1 + 2 * scale.max().item()))
    assert_close_across_shapes(guided[:, 4:], cond[:, 4:], bound)  # variance stays conditional
    # The null class really is a different condition, ten times the bound away: taking the variance from the null half
    # would fail the check above.
    assert (cond[:, 4:] - null[:, 4:]).abs().max() > 10 * bound * cond[:, 4:].abs().max()


@torch.no_grad()
def test_each_sample_in_a_batch_uses_its_own_timestep_and_label():
    model = randomize(DiTModel.from_preset("dit-tiny")).eval()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([0, 500, 999]), torch.tensor([2, 2, 8])
    batched = model(x, t, y)
    bound = model_reordering_tolerance(model.config)  # 3 rows against 1: matrix products of other shapes
    for k in range(3):
        assert_close_across_shapes(batched[k:k + 1], model(x[k:k + 1], t[k:k + 1], y[k:k + 1]), bound)
    assert (batched[0] - model(x[:1], t[1:2], y[:1])[0]).abs().max() > 10 * bound * batched[0].abs().max()  # t matters


def test_meta_build_allocates_nothing_and_has_the_real_shapes():
    config = get_preset("dit-10l")
    with torch.device("meta"):
        model = DiTModel.from_config(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.blocks[0].mlp.fc1.weight.shape == (config.ffn_dim, config.hidden_dim)
    assert model.y_embedder.embedding_table.weight.shape == (config.num_classes + 1, config.hidden_dim)
