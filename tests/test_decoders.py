"""Decoding in the engine: every model's results are images; a latent model's VAE runs once per step over the
requests that finished in it; a failed decode fails those requests and not the engine."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch

from dit_runtime.checkpoint import CheckpointInfo, default_class_names
from dit_runtime.decoders import (FoldedUpsample, GroupNormSiLU, LatentView, PixelDecoder, VAEAttention, VAEDecoder,
                                  decoder_for, fold_upsampling_convs, fuse_group_norm_silu, graph_batches,
                                  group_norm_by_channels, quantize, write_out_attention)
from dit_runtime.engine import Engine, EngineConfig, EngineError, GenerationRequest, SamplingParams
from dit_runtime.model import DiTModel, get_preset

diffusers = pytest.importorskip("diffusers")


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    """A random AutoencoderKL of 4 latent channels with one 2x up-block: 8x8 latents -> 16x16 RGB."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                   layers_per_block=1).eval()


def latent_engine(vae: torch.nn.Module | None, **config) -> Engine:
    torch.manual_seed(0)
    model = DiTModel.from_config(get_preset("dit-tiny")).eval()  # 8x8x4 latents
    info = CheckpointInfo(config=model.config, class_names=default_class_names(10), space="latent",
                          latent_scale=0.5)
    return Engine(model, info, EngineConfig(max_batch_size=16, **config), vae=vae)


def request(seed: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest((seed % 10,) * n, SamplingParams(seed=seed, num_inference_steps=3, sampler="ddim",
                                                              guidance_scale=1.0))


def test_decoder_for_each_kind_of_checkpoint():
    model_config = get_preset("dit-tiny")
    pixel = CheckpointInfo(config=model_config, class_names=default_class_names(10), space="pixel")
    latent = CheckpointInfo(config=model_config, class_names=default_class_names(10), space="latent")
    assert type(decoder_for(pixel)) is PixelDecoder and decoder_for(pixel).channels == 4
    assert type(decoder_for(latent)) is LatentView
    vae = decoder_for(latent, tiny_vae())
    assert isinstance(vae, VAEDecoder) and (vae.upsampling, vae.channels) == (2, 3)
    with pytest.raises(ValueError, match="pixel-space model"):
        decoder_for(pixel, tiny_vae())


def test_quantize_maps_the_model_range_to_bytes_channels_last():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = quantize(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_a_latent_models_images_are_its_latents_through_its_vae_decoded_once_per_step():
    vae = tiny_vae()
    batches = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: batches.append(z.shape[0]) or decode(z, *a, **k)  # observe, then decode
    engine = latent_engine(vae)
    assert (engine.spec.resolution, engine.spec.channels) == (16, 3)  # what the API answers
    results = engine.generate([request(1, n=2), request(2), request(3, n=3)])  # the same steps: one finishing step
    assert batches == [6]  # the three requests' six images in one decode
    for result in results:
        assert result.images.shape == (len(result.latents), 16, 16, 3) and result.images.dtype == np.uint8
        expected = quantize(decode(torch.from_numpy(result.latents) / 0.5).sample).numpy()
        # Decoded in a batch of 6 against one request's batch: BLAS may sum in another order, a rounding apart.
        assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 1


def test_a_latent_model_without_a_vae_answers_a_view_of_its_latents():
    result = latent_engine(None).generate([request(4)])[0]
    assert result.images.shape == (1, 8, 8, 4)
    assert np.array_equal(result.images, quantize(torch.from_numpy(result.latents)).numpy())


def test_a_failed_decode_fails_its_requests_and_the_engine_serves_on():
    vae = tiny_vae()
    decode, failures = vae.decode, [1]

    def sometimes_fails(z, *a, **k):
        if failures:
            failures.pop()
            raise RuntimeError("out of memory (test)")
        return decode(z, *a, **k)

    vae.decode = sometimes_fails
    with latent_engine(vae) as engine:
        first = engine.submit(request(5))
        with pytest.raises(EngineError, match="decoding the images failed: out of memory"):
            first.result(timeout=60)
        second = engine.submit(request(6)).result(timeout=60)
        engine.health()
    assert second.images.shape == (1, 16, 16, 3)


def test_a_compiled_decoder_compiles_at_start_up_for_every_batch_and_decodes_as_the_eager_one(tmp_path):
    """No request waits on a compile, whatever its batch; with a compile_cache_dir the decoder's programs are saved
    there, and the next engine's decoder loads them."""
    eager = latent_engine(tiny_vae())
    compiled = latent_engine(tiny_vae(), compile_decoder=True, decode_batch_size=20, compile_cache_dir=str(tmp_path))
    assert compiled.decoder_warmup_seconds > 0
    store = compiled.decoder.store
    assert store.directory.parent == tmp_path / "programs"
    assert store.loaded == 0 and store.compiled >= 2  # one image is a program of its own
    restarted = latent_engine(tiny_vae(), compile_decoder=True, decode_batch_size=20, compile_cache_dir=str(tmp_path))
    assert (restarted.decoder.store.loaded, restarted.decoder.store.compiled) == (store.compiled, 0)
    requests = [request(7, n=3), request(8)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # no compile at a request, whatever its batch
        for n in (1, 2, 15, 16, 17, 20, 41):  # 41: two full batches and one
            assert compiled.decoder(torch.zeros(n, 4, 8, 8)).shape == (n, 16, 16, 3)
        got = compiled.generate(requests)
    for a, b in zip(got, eager.generate(requests)):
        assert np.array_equal(a.latents, b.latents)
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1  # fused kernels round apart


def test_decoder_graphs_are_captured_at_every_fourth_batch_and_need_a_compiled_decoder_on_a_gpu():
    assert graph_batches(64) == [1, 2, *range(4, 65, 4)]
    assert graph_batches(10) == [1, 2, 4, 8, 10] and graph_batches(1) == [1]
    with pytest.raises(ValueError, match="compiled .*compile_decoder.* CUDA"):
        VAEDecoder(tiny_vae(), latent_scale=1.0, compile=True, cuda_graphs=True)  # on the CPU
    with pytest.raises(ValueError, match="decoder_cuda_graphs needs compile_decoder and device 'cuda'"):
        EngineConfig(decoder_cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graph_captured_decoder_decodes_every_batch_as_the_compiled_one_without_compiling():
    vae = tiny_vae().to("cuda", torch.float16)
    compiled = VAEDecoder(vae, latent_scale=1.0, max_batch=20, compile=True)
    graphed = VAEDecoder(copy.deepcopy(vae), latent_scale=1.0, max_batch=20, compile=True, cuda_graphs=True)
    compiled.warm_up((4, 8, 8))
    graphed.warm_up((4, 8, 8))
    assert list(graphed._graphs) == graph_batches(20)
    torch.manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 3, 5, 17, 20, 41):  # padded to 4, 8, 20; 41: two full batches and one
            z = torch.randn(n, 4, 8, 8, device="cuda")
            got, want = graphed(z), compiled(z)
            assert got.shape == (n, 16, 16, 3)
            assert (got.int() - want.int()).abs().max() <= 1  # batch sizes apart: kernels may round apart


def test_a_vae_attention_written_out_is_diffusers_attention_under_the_same_names():
    """VAEAttention is diffusers' Attention with its default processor written out: the same output in either memory
    layout, the same parameters under the same names; an attention with another processor is left alone."""
    from diffusers.models.attention_processor import AttnProcessor

    vae = tiny_vae()
    attention = vae.decoder.mid_block.attentions[0]
    torch.manual_seed(1)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 8, 5, 7).contiguous(memory_format=layout)
        with torch.no_grad():
            want, got = attention(x), VAEAttention(attention)(x)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    names = set(vae.state_dict())
    assert write_out_attention(vae) == 2  # the encoder's mid block and the decoder's
    assert isinstance(vae.decoder.mid_block.attentions[0], VAEAttention) and set(vae.state_dict()) == names
    assert write_out_attention(vae) == 0  # once only
    other = tiny_vae()
    other.decoder.mid_block.attentions[0].set_processor(AttnProcessor())
    assert not VAEAttention.applies(other.decoder.mid_block.attentions[0])


def test_a_restart_loads_the_decoders_saved_programs_and_traces_nothing(tmp_path):
    """A compiled decoder with a ``program_dir`` saves each program its warm-up compiles whole (the engine's
    ``compile_programs``). A second decoder on the same directory, over other weights of the same shapes, loads every
    one, compiles none, never enters Dynamo, and decodes its own VAE's images: the weights are the programs' inputs."""
    from torch._dynamo.utils import counters

    def warm(seed: int) -> VAEDecoder:
        decoder = VAEDecoder(tiny_vae(seed), latent_scale=0.5, max_batch=4, compile=True, program_dir=tmp_path)
        decoder.warm_up((4, 8, 8))
        return decoder

    first = warm(0)
    assert first.store.loaded == 0 and first.store.compiled >= 2  # one image is a program of its own
    assert not list(first.store.directory.glob("*.jit")), "a program fell back to torch.compile"
    traced = dict(counters["frames"])
    second = warm(1)
    assert (second.store.loaded, second.store.compiled) == (first.store.compiled, 0)
    z = torch.randn(7, 4, 8, 8)  # a full batch and three images
    got = second(z)
    assert dict(counters["frames"]) == traced, "the restarted decoder traced a function"
    want = VAEDecoder(tiny_vae(1), latent_scale=0.5)(z)
    assert got.shape == (7, 16, 16, 3) and (got.int() - want.int()).abs().max() <= 1
    assert (got.int() - first(z).int()).abs().float().mean() > 5  # the two VAEs' images differ that much
    other = VAEDecoder(tiny_vae(), latent_scale=0.5, compile=True, program_dir=tmp_path, fold_upsampling=False)
    assert other.store.directory != second.store.directory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graph_captured_decoder_restarts_from_its_saved_programs_without_tracing(tmp_path):
    """On a GPU, with both rewrites (the default) and CUDA graphs: a second decoder on the same program_dir loads
    every program the first saved, compiles none, never enters Dynamo, and decodes as the first."""
    from torch._dynamo.utils import counters

    def warm() -> VAEDecoder:
        decoder = VAEDecoder(tiny_vae().to("cuda", torch.float16), latent_scale=1.0, max_batch=20, compile=True,
                             cuda_graphs=True, program_dir=tmp_path)
        decoder.warm_up((4, 8, 8))
        return decoder

    first = warm()
    assert first.store.compiled > 0 and not list(first.store.directory.glob("*.jit"))
    traced = dict(counters["frames"])
    second = warm()
    assert (second.store.loaded, second.store.compiled) == (first.store.compiled, 0)
    assert dict(counters["frames"]) == traced, "the restarted decoder traced a function"
    z = torch.randn(7, 4, 8, 8, device="cuda")
    assert torch.equal(second(z), first(z))


def test_an_upsampler_folded_into_one_convolution_is_its_upsampling_and_convolution():
    """Nearest 2x upsampling + a 3x3 convolution (padding 1) as one transposed convolution: the same numbers (float64;
    the folded taps are summed in fp32, so 1e-6), in either memory layout, at every border, for odd and even sides
    and other output channels."""
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    for channels, out_channels, h, w in [(8, 8, 5, 5), (6, 10, 4, 7), (3, 3, 1, 1)]:
        upsample = Upsample2D(channels, use_conv=True, out_channels=out_channels).double()
        folded = FoldedUpsample(upsample)
        assert folded.weight.shape == (channels, out_channels, 4, 4)
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(3, channels, h, w, dtype=torch.float64).contiguous(memory_format=layout)
            with torch.no_grad():
                want, got = upsample(x), folded(x)
            assert got.shape == want.shape == (3, out_channels, 2 * h, 2 * w)
            assert (got - want).abs().max() < 1e-6 * want.abs().max()
    with pytest.raises(ValueError, match="output_size"):
        folded(torch.zeros(1, 3, 2, 2, dtype=torch.float64), output_size=(5, 5))
    assert not FoldedUpsample.applies(Upsample2D(8, use_conv_transpose=True))
    assert not FoldedUpsample.applies(Upsample2D(8, use_conv=False))
    assert not FoldedUpsample.applies(Upsample2D(8, use_conv=True, kernel_size=1, padding=0))


def test_a_decoder_folds_its_upsamplers_by_default_and_decodes_as_diffusers():
    vae, z = tiny_vae(), torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
    decoder = VAEDecoder(vae, latent_scale=1.0)
    folded = [m for m in vae.modules() if isinstance(m, FoldedUpsample)]
    assert len(folded) == 1 and not [m for m in vae.modules() if type(m).__name__ == "Upsample2D"]
    got = decoder.decode(z)[0]
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert fold_upsampling_convs(vae) == 0  # once only


def test_each_groupnorm_that_a_silu_follows_is_fused_with_it_and_the_decode_is_diffusers():
    """GroupNormSiLU computes each group's moments from its channels' (group_norm_by_channels): the same decode, to
    fp32's rounding."""
    vae, z = tiny_vae(), torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
        fused = fuse_group_norm_silu(vae)
        got = vae.decode(z).sample
    resnets = [m for m in vae.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert fused == 2 * len(resnets) + 2  # and the encoder's and the decoder's conv_norm_out
    assert all(isinstance(r.norm1, GroupNormSiLU) and isinstance(r.nonlinearity, torch.nn.Identity) for r in resnets)
    assert isinstance(vae.decoder.conv_norm_out, GroupNormSiLU) and isinstance(vae.decoder.conv_act, torch.nn.Identity)
    plain = [name for name, m in vae.named_modules() if type(m) is torch.nn.GroupNorm]
    assert plain and all(".attentions." in name for name in plain)  # no SiLU after attention's norm
    assert set(vae.state_dict()) == set(tiny_vae().state_dict())  # the same parameters, under the same names
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert fuse_group_norm_silu(vae) == 0  # once only


def test_a_group_norm_from_its_channels_moments_is_torchs_group_norm():
    """Each group's mean and variance combined from its channels' (float64 here), in either layout, with a mean far
    from zero (the variance of the channels' means is then most of the group's), SiLU or not."""
    torch.manual_seed(0)
    for n, c, h, w, groups, offset in [(2, 32, 9, 7, 8, 0.0), (3, 16, 4, 4, 4, 30.0), (1, 8, 1, 1, 2, 1.0),
                                       (2, 12, 5, 3, 3, 5.0)]:
        weight, bias = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        for layout in (torch.contiguous_format, torch.channels_last):
            spread = torch.linspace(-offset, offset, c, dtype=torch.float64)[:, None, None]  # channels' means apart
            x = (torch.randn(n, c, h, w, dtype=torch.float64) + spread).contiguous(memory_format=layout)
            for silu in (False, True):
                want = torch.nn.functional.group_norm(x, groups, weight, bias, eps=1e-6)
                want = torch.nn.functional.silu(want) if silu else want
                got = group_norm_by_channels(x, groups, weight, bias, 1e-6, silu)
                assert got.dtype == torch.float64 and got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("norms_by_channels, fold_upsampling", [(True, False), (False, True), (True, True)])
def test_a_decoder_with_its_rewrites_compiles_and_captures_once_and_decodes_as_diffusers_modules(norms_by_channels,
                                                                                                 fold_upsampling):
    """Each rewrite, and both (the default), against diffusers' modules as they are, eager."""
    vae = tiny_vae().to("cuda", torch.float16)
    plain = VAEDecoder(copy.deepcopy(vae), latent_scale=1.0, max_batch=20, norms_by_channels=False,
                       fold_upsampling=False)
    changed = VAEDecoder(vae, latent_scale=1.0, max_batch=20, compile=True, cuda_graphs=True,
                         norms_by_channels=norms_by_channels, fold_upsampling=fold_upsampling)
    assert isinstance(vae.decoder.conv_norm_out, GroupNormSiLU) == norms_by_channels
    assert any(isinstance(m, FoldedUpsample) for m in vae.modules()) == fold_upsampling
    changed.warm_up((4, 8, 8))
    torch.manual_seed(2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 2, 15, 16, 20, 41):
            z = torch.randn(n, 4, 8, 8, device="cuda")
            assert (changed(z).int() - plain(z).int()).abs().max() <= 1  # fp16 activations rounded apart
