"""The engine's inference fast paths compute the model's function and leave its checkpoint layout alone."""

from __future__ import annotations

import copy

import pytest
import torch

from dit_runtime.engine.fast_paths import FastPaths, SplitKLinear, apply_fast_paths
from dit_runtime.engine.fp8 import E4M3_MAX, Fp8Linear, check_fp8_support, quantize_rows
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
@pytest.mark.parametrize("joined_adaln", [True, False])
def test_embed_blocks_head_compose_to_the_forward(joined_adaln):
    """The three parts a feature-cached step runs apart are the forward: the blocks' adaLN and the final layer's
    become GEMMs of their own, so equal up to the reordering bound."""
    model = tiny_model()
    x, t, y = tiny_inputs(model)
    reference = model(x, t, y)
    fast = apply_fast_paths(model, FastPaths(joined_adaln=joined_adaln), cuda=False)
    tokens, c = fast.embed(x, t, y)
    assert_close_across_shapes(fast.head(fast.blocks(tokens, c), c), reference,
                               model_reordering_tolerance(model.config))


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


def test_rows_quantize_to_e4m3_with_their_own_scale():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1, 10, 1e3, 0]).view(5, 1)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(q.float().abs().amax(dim=1)[:4], torch.full((4,), E4M3_MAX))  # each row fills the range
    assert torch.equal(q[4].float(), torch.zeros(64))  # an all-zero row stays zero, no division by zero
    # e4m3 keeps 3 mantissa bits: every value within half a step (2^-4 relative) of its row's scale grid
    rel = ((q.float() * scale - x).abs() / x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30))[:4]
    assert rel.max() <= 2 ** -4 * 1.001, rel.max()


@torch.no_grad()
def test_an_fp8_linear_computes_the_linear_to_e4m3_precision():
    """Each product's two factors are rounded to e4m3, 2^-4 relative at most. On a sum of random-sign terms the
    roundings' errors and the sum itself both grow as sqrt(K), so the output's relative L2 error stays near the
    per-term one: sqrt(2/3) 2^-4 for two uniform roundings, under 2^-4."""
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(256, 96)
    linear.weight.copy_(torch.randn(96, 256, generator=gen) * 0.05)
    linear.bias.copy_(torch.randn(96, generator=gen))
    linear = linear.to(torch.bfloat16)
    x = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 96)
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 96)
    rel = ((out.float() - expected).norm() / expected.norm()).item()
    assert rel < 2 ** -4, rel
    assert rel > 2 ** -8  # coarser than one bf16 rounding: it really did compute in e4m3


def test_fp8_is_refused_where_it_cannot_run_saying_what_to_use():
    with pytest.raises(ValueError, match="use fp32 on the CPU"):
        check_fp8_support(torch.device("cpu"))


@torch.no_grad()
def test_the_fp8_mlp_computes_the_mlp_to_e4m3_precision():
    model = tiny_model()
    mlp = model.blocks[0].mlp.to(torch.bfloat16)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    expected = mlp.float()(x.float())
    out = apply_fast_paths(model.to(torch.bfloat16), FastPaths(fp8_min_rows=0), cuda=False,
                           fp8=True).model.blocks[0].mlp(x)
    rel = ((out.float() - expected).norm() / expected.norm()).item()
    assert rel < 2 * 2 ** -4, rel  # two FP8 GEMMs in a row, each within one e4m3 rounding (see above)


@torch.no_grad()
def test_an_fp8_engine_runs_forwards_below_fp8_min_rows_in_bf16_and_the_rest_in_fp8():
    """Per-size precision: a forward of fewer token rows than ``fp8_min_rows`` is the bf16 model's, bit for bit (the
    same modules, GEMMs and weights); one of that many or more is the all-FP8 model's, bit for bit, and not bf16's."""
    model = tiny_model().to(torch.bfloat16)  # 16 tokens per image
    bf16 = apply_fast_paths(copy.deepcopy(model), FastPaths(), cuda=False)
    fp8 = apply_fast_paths(copy.deepcopy(model), FastPaths(fp8_min_rows=0), cuda=False, fp8=True)
    by_size = apply_fast_paths(copy.deepcopy(model), FastPaths(fp8_min_rows=64), cuda=False, fp8=True)
    gen = torch.Generator().manual_seed(4)
    for batch in (2, 4, 8):  # 32, 64 and 128 token rows: below, at and above fp8_min_rows
        x = torch.randn(batch, 4, 8, 8, generator=gen).to(torch.bfloat16)
        t, y = torch.full((batch,), 500.0), torch.arange(batch) % 10
        out = by_size(x, t, y)
        if batch * 16 < 64:
            assert torch.equal(out, bf16(x, t, y))
        else:
            assert torch.equal(out, fp8(x, t, y)) and not torch.equal(out, bf16(x, t, y))


def mlp_128(seed: int = 3, width: int = 256, ffn: int = 512) -> torch.nn.Module:
    """A DiT MLP whose widths are multiples of 128 (the block path's tiles), bf16, random weights."""
    from dit_runtime.model import Mlp

    mlp = Mlp(width, ffn)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return mlp.to(torch.bfloat16).eval()


def test_block_quantization_scales_each_block_by_its_own_amax():
    """1x128 blocks of a row and 128x128 tiles of a weight: each block's largest value lands on E4M3_MAX, every value
    within one e4m3 rounding (2^-4) of the block's amax, and a block of zeros stays zero."""
    from dit_runtime.engine.fp8 import dequantize_blocks, quantize_blocks, quantize_tiles

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 384, generator=gen) * torch.logspace(-3, 3, 3).repeat_interleave(128)  # blocks of 3 ranges
    x[2, 128:256] = 0
    q, scale = quantize_blocks(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 3)
    blocks = q.float().view(6, 3, 128)
    assert torch.equal(blocks.abs().amax(dim=2)[scale > 1e-11], torch.full((17,), E4M3_MAX))
    assert torch.equal(blocks[2, 1], torch.zeros(128))
    amax = x.view(6, 3, 128).abs().amax(dim=2, keepdim=True).clamp(min=1e-30)
    assert ((dequantize_blocks(q, scale) - x).view(6, 3, 128).abs() / amax).max() <= 2 ** -4
    w = torch.randn(256, 384, generator=gen)
    wq, wscale = quantize_tiles(w)
    assert wscale.shape == (2, 3)
    assert ((dequantize_blocks(wq, wscale, rows=128) - w).abs().max() / w.abs().max()) <= 2 ** -4


@torch.no_grad()
def test_the_block_scaled_fp8_mlp_computes_the_mlp_to_e4m3_precision():
    """fc1 -> GELU in 1x128 blocks -> fc2 in 128x128 tiles: two e4m3 GEMMs, each within one rounding as above; and
    apply_fast_paths picks it with fp8_blocks where the widths allow (dit-tiny's 64 does not: the row path stays)."""
    from dit_runtime.engine.fp8 import Fp8BlockMlp, Fp8Mlp

    mlp = mlp_128()
    x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    expected = mlp.float()(x.float())
    out = Fp8BlockMlp(mlp.to(torch.bfloat16))(x)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    rel = ((out.float() - expected).norm() / expected.norm()).item()
    assert 2 ** -8 < rel < 2 * 2 ** -4, rel
    fast = apply_fast_paths(tiny_model().to(torch.bfloat16), FastPaths(fp8_blocks=True, fp8_min_rows=0), cuda=False,
                            fp8=True)
    assert isinstance(fast.model.blocks[0].mlp, Fp8Mlp)
    assert Fp8BlockMlp.supports(mlp) and not Fp8BlockMlp.supports(tiny_model().blocks[0].mlp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [512, 1000, 8192])
def test_the_fused_fc1_kernel_matches_the_torch_ops(rows):
    """fc1's e4m3 GEMM with bias, GELU and 1x128 quantization in its epilogue, against the same function in fp32
    torch ops on the same e4m3 inputs: block scales equal up to the tensor cores' FP8 accumulation (2^-8), every
    value on the same or the next e4m3 point (one step is at most 2^-3 of a value, so of its block's amax), the
    scales column-major as F.scaled_mm's BlockWise1x128 wants them; and the MLP through it within the e4m3 bound of
    the CPU test. Rows not a multiple of a tile (1000) check the kernel's masks."""
    import torch.nn.functional as F

    from dit_runtime.engine.fp8 import Fp8BlockMlp, dequantize_blocks, quantize_blocks, quantize_rows
    from dit_runtime.engine.kernels import fp8_gemm_gelu_quant_blocks

    mlp = mlp_128(width=1024, ffn=4096).cuda()
    block = Fp8BlockMlp(mlp)
    fc1 = block.fc1
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    xq, xs = quantize_rows(x)
    q, scale = fp8_gemm_gelu_quant_blocks(xq, xs, fc1.weight, fc1.weight_scale, fc1.bias)
    h = (xq.float() * xs) @ (fc1.weight.float() * fc1.weight_scale.t()).t() + fc1.bias.float()
    ref_q, ref_scale = quantize_blocks(F.gelu(h, approximate="tanh"))
    assert q.shape == (rows, 4096) and scale.shape == (rows, 32) and scale.stride() == (1, rows)
    torch.testing.assert_close(scale, ref_scale, rtol=2 ** -8, atol=0)
    amax = ref_scale.repeat_interleave(128, dim=1) * E4M3_MAX
    assert ((dequantize_blocks(q, scale) - dequantize_blocks(ref_q, ref_scale)).abs() / amax).max() <= 2 ** -3
    out = block(x).float()  # before mlp.float(), which converts the parameters the block shares in place
    expected = mlp.float()(x.float())
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 2 * 2 ** -4, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fused_gelu_quantization_kernel_matches_the_torch_ops():
    """The Triton kernel against quantize_rows(gelu(x)) in torch: the same row scales up to the bf16 rounding the
    torch ops apply to GELU's output (2^-8), and every value on the same or the next point of the e4m3 grid (the
    two round slightly different inputs): one step is at most 2^-3 of the value, so of the row's amax."""
    from dit_runtime.engine.fp8 import gelu_quantize_rows
    from dit_runtime.engine.kernels import gelu_quant_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 4096, device="cuda", generator=gen) * torch.logspace(-3, 3, 300, device="cuda")[:, None]
    x[7] = 0  # an all-zero row quantizes to zeros
    x = x.to(torch.bfloat16)
    q, scale = gelu_quant_rows(x)
    ref_q, ref_scale = gelu_quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (300, 1)
    torch.testing.assert_close(scale, ref_scale, rtol=2 ** -8, atol=0)
    amax = (ref_q.float() * ref_scale).abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert ((q.float() * scale - ref_q.float() * ref_scale).abs() / amax).max() <= 2 ** -3
    assert torch.equal(q[7].float(), torch.zeros(4096, device="cuda"))
