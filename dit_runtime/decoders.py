"""Samples -> images, in one place. The engine hands back images for every model: it decodes the samples of the
requests that finish in a step as one batch, on the device (and on a CUDA stream of its own, so the next step does
not wait), and copies uint8 pixels to the host.

- ``PixelDecoder``: a pixel-space model's samples are its images; [-1, 1] -> uint8.
- ``VAEDecoder``: a latent-space model's samples through the VAE it was trained in (a diffusers ``AutoencoderKL``),
  batched, in the engine's precision, channels-last, optionally compiled, each upsampler folded into one transposed
  convolution (``FoldedUpsample``), on a GPU each GroupNorm and its SiLU computed from its channels' moments
  (``GroupNormSiLU``), its attention written out of diffusers' processor (``VAEAttention``) so that its compiled
  programs can be saved whole.
- ``LatentView``: a latent-space model served without its VAE (random-weight benchmarks): the latents' values as
  pixels, one per latent position, so the path around the engine is measured without a decoder.

``decoder_for`` picks one for a checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointInfo

if TYPE_CHECKING:
    from .engine.programs import ProgramStore

log = logging.getLogger(__name__)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (n, C, H, W), any float dtype -> uint8 (n, H, W, C) on the same device; clipped."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class Decoder:
    """A model's samples (n, C, h, w) on the device -> uint8 images (n, h * upsampling, h * upsampling, channels) on
    the same device."""

    upsampling: int = 1
    channels: int
    store: ProgramStore | None = None  # where its compiled programs are saved and loaded, if it has any

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def warm_up(self, sample_shape: tuple[int, ...]) -> float:
        """Run every batch shape the decoder compiles for once (at start-up, not at a request); returns seconds."""
        return 0.0


class PixelDecoder(Decoder):
    """A pixel-space model: its samples are the images."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        return quantize(samples)


class LatentView(PixelDecoder):
    """A latent-space model served without its VAE: each latent channel read as a pixel channel in [-1, 1], for
    benchmarks of random weights. Never for real images: a checkpoint of latents needs its VAE."""


# A VAEDecoder's own machinery, left out when torch pickles it with a saved program (VAEDecoder.__getstate__).
_MACHINERY = ("_decode", "_saveable", "store", "_programs", "_graphs")


class VAEDecoder(Decoder):
    """A diffusers ``AutoencoderKL``'s decoder over a latent model's samples (divided by the checkpoint's
    ``latent_scale`` first), in batches of at most ``max_batch``.

    ``compile``: torch.compile the decoder with a symbolic batch size: a few programs serve every batch size up to
    ``max_batch``, where static shapes would compile one per size. A symbolic program holds only for the range of
    sizes its guards allow: one image is specialised, on the CPU torch's convolution tells 2-15 images from 16 and
    more, and diffusers' upsampler branches at 64. So ``warm_up`` decodes every size once. ``compile_options``:
    inductor's (``torch.compile``'s ``options``).

    ``norms_by_channels`` (on a GPU): each GroupNorm that a SiLU follows, and the SiLU, as one ``GroupNormSiLU``
    (``fuse_group_norm_silu``), which computes a group's moments from its channels' (``group_norm_by_channels``): on
    channels-last activations inductor's own GroupNorm passes read a few channels of every pixel. Compiled on an H100,
    0.895x the decode's time at batch 64, the same images (docs/benchmarks.md, "The VAE decoder").

    ``fold_upsampling``: each upsampler (nearest 2x, then a 3x3 convolution) as one transposed convolution of 4/9 of
    its arithmetic (``FoldedUpsample``). With the norms above, compiled and graph-captured on an H100: 0.782x the
    decode's time at batch 64, 0.883x at 16.

    Both are exact rewrites (the images within fp16 rounding of diffusers' decode), on by default; off, the decoder
    runs diffusers' modules as they are.

    ``cuda_graphs`` (compiled, on a GPU): the compiled decoder captured as a CUDA graph at each of
    ``graph_batches(max_batch)``; a batch is padded to the next of them, into a static input whose other rows the
    images do not see (every layer of the decoder works per image). One replay then takes the place of the compiled
    program's launches from Python, which held a replica's GIL 3.2 ms for each request of four images on an H100.

    ``program_dir`` (compiled): save each program the warm-up compiles whole there (``ProgramStore``, the engine's
    ``compile_programs``), and load it at the next start instead of tracing the decoder again. The mid block's
    attention is written out (``VAEAttention``) so that torch can save them."""

    def __init__(self, vae: torch.nn.Module, latent_scale: float, max_batch: int = 64, compile: bool = False,
                 compile_options: dict | None = None, cuda_graphs: bool = False, norms_by_channels: bool = True,
                 fold_upsampling: bool = True, program_dir: str | Path | None = None):
        self.vae = vae.eval().requires_grad_(False)
        write_out_attention(self.vae)
        if fold_upsampling:
            fold_upsampling_convs(self.vae)
        param = next(self.vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cuda":  # cuDNN's convolutions run NHWC natively
            self.vae.to(memory_format=torch.channels_last)
            if norms_by_channels:
                fuse_group_norm_silu(self.vae)
        self.latent_scale = latent_scale
        self.max_batch = max_batch
        self.compiled = compile
        self._decode = torch.compile(self._forward, dynamic=True, options=compile_options) if compile else self._forward
        if cuda_graphs and not (compile and self.device.type == "cuda"):
            raise ValueError("a decoder's cuda_graphs need it compiled (compile_decoder) and on a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # batch: graph, in, out
        self._programs: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}  # batch size: its saved program
        if compile and program_dir is not None:
            from .engine.programs import ProgramStore, aot_compile_enabled  # the engine package imports this module
            with aot_compile_enabled():  # its programs can be compiled ahead of time, and saved (programs.py)
                self._saveable = torch.compile(self._forward, fullgraph=True, dynamic=True, options=compile_options)
            if ProgramStore.supported(self._saveable):
                self.store = ProgramStore(Path(program_dir), self._identity(compile_options, norms_by_channels,
                                                                            fold_upsampling))

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    @property
    def upsampling(self) -> int:
        """Image pixels per latent pixel along a side: 2 per decoder up-block after the first (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.out_channels

    def _identity(self, compile_options: dict | None, norms_by_channels: bool, fold_upsampling: bool) -> dict:
        """What the decoder's saved programs depend on beyond their guards (programs.ProgramStore)."""
        import diffusers  # the VAE is one of its modules

        from .engine.programs import device_identity
        config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}  # "_": diffusers' bookkeeping
        return {"part": "vae-decoder", "device": device_identity(self.device), "dtype": self.dtype, "vae": config,
                "diffusers": diffusers.__version__, "compile_options": compile_options,
                "norms_by_channels": norms_by_channels and self.device.type == "cuda",
                "fold_upsampling": fold_upsampling}

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def _program(self, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The compiled decoder for ``z``'s batch size: with a store, the saved program whose guards take it (loaded,
        or compiled and saved now); else the torch.compile'd decoder."""
        if self.store is None:
            return self._decode
        program = self.store.program("decoder", str(len(z)), self._saveable, self, z)
        return self._decode if program is self._saveable else program  # one torch cannot save: as torch.compile

    def __getstate__(self) -> dict:
        """Without the machinery no compiled program reads: torch pickles a saved program's ``self`` (this decoder)
        with its guards' state, and compiled functions, loaded programs and CUDA graphs do not pickle."""
        return {name: value for name, value in self.__dict__.items() if name not in _MACHINERY}

    @torch.no_grad()  # not inference mode: a loaded program's guards would refuse it (programs.py)
    def decode(self, samples: torch.Tensor) -> list[torch.Tensor]:
        """The images in [-1, 1] (n, C, H, W) in the decoder's dtype, as a list of batches of at most
        ``max_batch`` (with ``cuda_graphs``, the last is a view of its graph's static output: read it before the next
        call)."""
        # Each batch a tensor of its own, not a view of one: a program's guards check a view's base too (under
        # no_grad, where they hold for a loaded program), and a view of a larger batch would compile again.
        chunks = [(chunk.float() / self.latent_scale).to(self.device, self.dtype).contiguous(
            memory_format=self._memory_format) for chunk in samples.split(self.max_batch)]
        if not self._graphs:
            return [self._programs.get(len(chunk), self._decode)(chunk) for chunk in chunks]
        # A replay overwrites its graph's static output, and the graphs share one memory pool: every batch but the
        # last is copied out before the next replay.
        return [self._replay(chunk).clone() for chunk in chunks[:-1]] + [self._replay(chunks[-1])]

    def _replay(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` through the graph of the smallest captured batch that holds it; its rows of the static output."""
        n = len(z)
        graph, static_in, static_out = self._graphs[next(b for b in self._graphs if b >= n)]
        static_in[:n].copy_(z)
        graph.replay()
        return static_out[:n]

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        out = [quantize(x) for x in self.decode(samples)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def warm_up(self, sample_shape: tuple[int, ...]) -> float:
        """Compiled: a decode of every batch size up to ``max_batch``, so that each program the decoder needs is built
        now (a size first met at a request would compile there: on an H100, a stall of about 30 s under load); with
        ``cuda_graphs``, of each graph's batch instead, then its capture."""
        if not self.compiled:
            return 0.0
        start = time.perf_counter()
        if self.cuda_graphs:
            self._capture(sample_shape)
        else:
            for n in range(self.max_batch, 0, -1):  # the largest first: the smaller reuse its cached blocks
                z = torch.zeros(n, *sample_shape, device=self.device, dtype=self.dtype)
                if self.store is not None:
                    self._programs[n] = self._program(z.contiguous(memory_format=self._memory_format))
                self(z)
        if self.store is not None:
            log.info("decoder programs: %d loaded from and %d compiled into %s", self.store.loaded,
                     self.store.compiled, self.store.directory)
        return time.perf_counter() - start

    def _capture(self, sample_shape: tuple[int, ...]) -> None:
        """The compiled decoder captured as a CUDA graph at each of ``graph_batches(max_batch)``."""
        pool = torch.cuda.graph_pool_handle()  # one pool: the graphs never run at once
        side = torch.cuda.Stream(self.device)
        # The largest batch first (vLLM captures in this order too): each capture's freed blocks then hold the next,
        # smaller one's activations. Smallest first, each capture needs blocks larger than any freed before it, and
        # the pool grows by about every capture's activations.
        for n in sorted(graph_batches(self.max_batch), reverse=True):
            static_in = torch.zeros(n, *sample_shape, device=self.device, dtype=self.dtype)
            static_in = static_in.contiguous(memory_format=torch.channels_last)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad():
                program = self._program(static_in)
                for _ in range(2):  # compile (or find) the program, and let the allocator settle
                    program(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                static_out = program(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        self._graphs = dict(sorted(self._graphs.items()))  # ascending: _replay takes the first that holds a batch
        torch.cuda.empty_cache()  # the warm-up decodes' blocks outside the graphs' pool, which nothing uses now


class GroupNormSiLU(torch.nn.GroupNorm):
    """A GroupNorm, then a SiLU if ``silu``, as ``group_norm_by_channels``. The same parameters as the GroupNorm it
    replaces."""

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine, norm.weight.device,
                         norm.weight.dtype)
        self.weight, self.bias, self.silu = norm.weight, norm.bias, silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_by_channels(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}"


def group_norm_by_channels(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           silu: bool) -> torch.Tensor:
    """``F.group_norm`` (then SiLU if ``silu``) of an (N, C, H, W) ``x`` from each channel's moments over H and W,
    combined into each group's (the group's variance: the mean of its channels' variances plus the variance of their
    means). Moments in fp32. Torch's decomposition views each group as one row, which a channels-last tensor does
    not hold contiguously: inductor's passes then read a few adjacent channels of every pixel. A reduction over H and
    W alone reads whole rows of channels, and stays ops that inductor fuses with their neighbours (a convolution's
    bias, a residual add). Our own Triton kernels for the same moments saved less (0.985x the compiled decode on an
    H100, against 0.895x), most likely because inductor could not fuse that work into opaque ops."""
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(acc), dim=(2, 3), correction=0)
    means = mean.view(n, groups, c // groups)
    group_mean = means.mean(-1, keepdim=True)
    group_var = var.view(n, groups, -1).mean(-1, keepdim=True) + (means - group_mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(group_var + eps).expand(n, groups, c // groups).reshape(n, c)
    scale = rstd * weight.to(acc)
    shift = bias.to(acc) - group_mean.expand(n, groups, c // groups).reshape(n, c) * scale
    y = x.to(acc) * scale[:, :, None, None] + shift[:, :, None, None]
    return (torch.nn.functional.silu(y) if silu else y).to(x.dtype)


def fuse_group_norm_silu(vae: torch.nn.Module) -> int:
    """In place, each GroupNorm of ``vae`` that a SiLU follows becomes a ``GroupNormSiLU`` and the SiLU an identity:
    both norms of each of diffusers' ``ResnetBlock2D`` without a time embedding (the pattern: norm1 -> SiLU -> conv1
    -> norm2 -> SiLU -> conv2), and a decoder's ``conv_norm_out`` + ``conv_act``. Other GroupNorms (attention's)
    stay. Returns how many were fused."""
    fused = 0
    for module in list(vae.modules()):
        if (isinstance(getattr(module, "norm1", None), torch.nn.GroupNorm)
                and isinstance(getattr(module, "norm2", None), torch.nn.GroupNorm)
                and isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU)
                and getattr(module, "time_emb_proj", None) is None and hasattr(module, "conv2")):
            module.norm1 = GroupNormSiLU(module.norm1, True)
            module.norm2 = GroupNormSiLU(module.norm2, True)
            module.nonlinearity = torch.nn.Identity()
            fused += 2
        if (isinstance(getattr(module, "conv_norm_out", None), torch.nn.GroupNorm)
                and isinstance(getattr(module, "conv_act", None), torch.nn.SiLU)):
            module.conv_norm_out = GroupNormSiLU(module.conv_norm_out, True)
            module.conv_act = torch.nn.Identity()
            fused += 1
    return fused


# A 3x3 convolution's taps along one side -> the taps of a transposed convolution of stride 2 and kernel 4 (padding 1)
# that computes it over a 2x nearest upsampling: an even output row 2i reads input rows (i - 1, i, i) through the taps
# (0, 1, 2), so kernel row 3 (row i - 1) is tap 0 and row 1 (row i) taps 1 + 2; an odd one 2i + 1 reads (i, i, i + 1):
# row 2 is taps 0 + 1, row 0 tap 2.
_TRANSPOSED_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


class FoldedUpsample(torch.nn.Module):
    """diffusers' ``Upsample2D`` of a decoder (2x nearest upsampling, then a 3x3 convolution) as one transposed
    convolution of the input (stride 2, 4x4 kernel, padding 1). Each output pixel of the 3x3 convolution over a
    nearest-upsampled image sees 2x2 distinct input pixels, so its taps fold into four, sums of the 3x3 taps; the
    transposed convolution applies each output pixel's four and writes the pixels interleaved. It does 4/9 of the
    arithmetic (16 taps for four pixels, not 36), and the 2x input is never written or read. The same function up to
    rounding: the folded taps are summed in fp32."""

    def __init__(self, upsample: torch.nn.Module):
        super().__init__()
        conv = upsample.conv
        weight = conv.weight.detach()
        taps = torch.tensor(_TRANSPOSED_TAPS, dtype=torch.float32, device=weight.device)  # (4x4 tap, 3x3 tap)
        folded = torch.einsum("kr,ls,oirs->iokl", taps, taps, weight.float())  # conv_transpose2d's (in, out, 4, 4)
        self.weight = torch.nn.Parameter(folded.to(weight.dtype), requires_grad=False)
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def applies(module: torch.nn.Module) -> bool:
        """Whether ``module`` is a 2x nearest upsampling + 3x3 convolution (padding 1, stride 1) this can fold."""
        conv = getattr(module, "conv", None)
        return (type(module).__name__ == "Upsample2D" and getattr(module, "interpolate", False)
                and not getattr(module, "use_conv_transpose", True) and getattr(module, "norm", None) is None
                and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            raise ValueError(f"FoldedUpsample doubles each side: output_size {tuple(output_size)} for input {h}x{w}")
        return torch.nn.functional.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1)


def fold_upsampling_convs(vae: torch.nn.Module) -> int:
    """In place, each upsampler of ``vae`` that ``FoldedUpsample`` applies to becomes one; returns how many."""
    return _rewrite_lists(vae, "upsamplers", FoldedUpsample)


def _rewrite_lists(vae: torch.nn.Module, name: str, rewrite: type[torch.nn.Module]) -> int:
    """In place, each module in a ModuleList called ``name`` of ``vae`` that ``rewrite.applies`` to becomes
    ``rewrite(module)``; returns how many did."""
    rewritten = 0
    for module in list(vae.modules()):
        modules = getattr(module, name, None)
        if isinstance(modules, torch.nn.ModuleList):
            for i, child in enumerate(modules):
                if child is not None and rewrite.applies(child):
                    modules[i] = rewrite(child)
                    rewritten += 1
    return rewritten


class VAEAttention(torch.nn.Module):
    """diffusers' ``Attention`` of a VAE's mid block (a GroupNorm, attention of every pixel to every other, a
    residual) with its ``AttnProcessor2_0`` written out: the same modules and the same ops in the same order, without
    the processor's dispatch. Dynamo guards that dispatch on the processor's signature (ID_MATCH), which torch cannot
    save with a program; without it the compiled decoder's programs are saved whole (``compile_programs``)."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.group_norm, self.to_q, self.to_k, self.to_v = (attention.group_norm, attention.to_q, attention.to_k,
                                                             attention.to_v)
        self.to_out = attention.to_out  # the projection and its dropout: the parameters keep their names
        self.heads, self.rescale_output_factor = attention.heads, attention.rescale_output_factor
        self.residual_connection = attention.residual_connection

    @staticmethod
    def applies(module: torch.nn.Module) -> bool:
        """Whether ``module`` is a self-attention over a 4-D input that ``VAEAttention`` computes the same: diffusers'
        default processor, a GroupNorm, no spatial or query/key norms, no added projections, no output dropout at
        work."""
        out = getattr(module, "to_out", None)
        return (type(module).__name__ == "Attention" and type(getattr(module, "processor", None)).__name__ ==
                "AttnProcessor2_0" and isinstance(getattr(module, "group_norm", None), torch.nn.GroupNorm)
                and all(getattr(module, name, 1) is None for name in ("spatial_norm", "norm_q", "norm_k", "add_k_proj"))
                and not getattr(module, "is_cross_attention", True) and isinstance(out, torch.nn.ModuleList)
                and len(out) == 2 and isinstance(out[0], torch.nn.Linear) and isinstance(out[1], torch.nn.Dropout)
                and (out[1].p == 0 or not module.training))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.group_norm(x.view(n, c, h * w)).transpose(1, 2)
        q, k, v = (proj(y).view(n, -1, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = self.to_out[0](y.transpose(1, 2).reshape(n, -1, c)).transpose(-1, -2).reshape(n, c, h, w)
        if self.residual_connection:
            y = y + x
        return y / self.rescale_output_factor


def write_out_attention(vae: torch.nn.Module) -> int:
    """In place, each attention of ``vae`` that ``VAEAttention`` applies to becomes one; returns how many."""
    return _rewrite_lists(vae, "attentions", VAEAttention)


def graph_batches(max_batch: int) -> list[int]:
    """The batch sizes a decoder's CUDA graphs are captured at: 1, 2 and every multiple of 4 up to ``max_batch``
    (and ``max_batch``). Requests of four images, the served students' case, then pad nothing, and no batch pads
    more than three images."""
    return sorted({b for b in (1, 2, *range(4, max_batch + 1, 4), max_batch) if b <= max_batch})


def load_vae(folder: str | Path) -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` from a local model folder, on the host in fp32 (an engine moves it to its device
    and precision); errors say what is missing (folder, config.json, diffusers)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a diffusers AutoencoderKL folder (no config.json); give a local copy of the "
                         "VAE the model was trained with, e.g. stabilityai/sd-vae-ft-ema")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("decoding latents needs the optional package diffusers (pip install diffusers)") from None
    return AutoencoderKL.from_pretrained(str(folder))


def decoder_for(info: CheckpointInfo, vae: torch.nn.Module | None = None, *, max_batch: int = 64,
                compile: bool = False, cuda_graphs: bool = False, compile_options: dict | None = None,
                program_dir: str | Path | None = None) -> Decoder:
    """The decoder of a checkpoint: its pixels, its VAE (``vae``, for a latent model), or a view of its latents
    when a latent model has no VAE (benchmarks). ``program_dir``: where a compiled VAE decoder saves its programs."""
    channels = info.config.in_channels
    if info.space == "pixel":
        if vae is not None:
            raise ValueError("a pixel-space model's samples are its images: it takes no VAE")
        return PixelDecoder(channels)
    if vae is None:
        return LatentView(channels)
    return VAEDecoder(vae, info.latent_scale, max_batch=max_batch, compile=compile, compile_options=compile_options,
                      cuda_graphs=cuda_graphs, program_dir=program_dir)
