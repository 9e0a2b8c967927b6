"""Inference fast paths, applied from outside the model: ``model.py`` stays the paper's function.

The runner calls ``apply_fast_paths(model, FastPaths(...), cuda=...)`` once on the loaded model, after moving it to
its device and precision. It swaps modules for ones that compute the same function faster (their parameters keep
their names, so ``state_dict()`` is unchanged) and returns ``InferenceDiT``, the forward the runner compiles:

- joined adaLN: every block's adaLN modulation (and the final layer's) in one GEMM per step, over one buffer that
  the layers' weights become views of, so no weight is stored twice;
- GELU epilogue (CUDA): fc1's bias and tanh-GELU inside its cuBLASLt GEMM, saving a pass over the widest
  activation;
- split-K (CUDA): for forwards of few token rows (one guided image is 512), attn.proj's and fc2's reductions cut
  into chunks summed in fp32, so a small GEMM has enough tiles to fill the GPU;
- FP8 linears (``precision: fp8``; fp8.py): the blocks' qkv, proj, fc1 and fc2 as e4m3 weights with one scale per
  output row, quantized once here, times activations quantized per row at run time, through ``torch._scaled_mm``; the
  embedders, the adaLN modulation and the final layer stay in bf16. Under torch.compile the row's amax and its
  quantization fuse into the kernel that produces the row (LayerNorm + modulate, GELU, attention's output). With
  ``fp8_blocks`` the MLP's fc1 is a Triton FP8 GEMM whose epilogue writes GELU's output as e4m3 in 1x128 blocks.
  FP8 pays only on forwards of many token rows: below ``fp8_min_rows`` (one guided image is 512) the blocks run in
  bf16 with the 16-bit fast paths above, each bucket compiled for one of the two (``BySize``).

Feature caching (feature_cache.py) runs ``InferenceDiT``'s three parts apart, the blocks over the rows that need them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DiTModel
from .fp8 import Fp8BlockMlp, Fp8Linear, Fp8Mlp, gelu_quantize_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths the runner applies; each computes the model's function, in another summation order."""

    joined_adaln: bool = True
    gelu_epilogue: bool = True  # CUDA only
    split_k: int = 4  # CUDA only; 1 turns it off
    split_k_max_rows: int = 512  # token rows (batch x tokens) up to which a forward splits K
    # precision fp8: fc1 -> GELU -> e4m3 in 1x128 blocks inside fc1's GEMM, fc2 block-scaled (Fp8BlockMlp), where
    # both MLP widths are multiples of 128; False: per-row scales and a separate GELU pass (Fp8Mlp). Measured at
    # dit-10l's batch 256 on an H100: 25.8 against 27.7 ms a step, forward error 1.13x bf16's either way.
    fp8_blocks: bool = True
    # precision fp8: forwards of fewer token rows (batch x tokens) run the blocks in bf16, with the fast paths of a
    # 16-bit engine, from a bf16 copy of the blocks' linears (+1x the FP8 weights' memory); 0: FP8 at every size.
    # Measured at dit-10l's widths on an H200: the MLP in fp8 is 3.4x slower than fp16 at 512 rows (one guided
    # image), even at 8,192; the whole fp8 step 1.24x faster than fp16 at 16,384 (docs/benchmarks.md, FP8).
    fp8_min_rows: int = 16384

    def __post_init__(self) -> None:
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"split_k must be a positive integer, got {self.split_k!r}")
        for name in ("split_k_max_rows", "fp8_min_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")


class SplitKLinear(nn.Module):
    """``linear`` with its reduction cut into ``splits`` chunks for inputs of at most ``max_rows`` rows: one batched
    GEMM over strided views of the input and the weight (no copies), then a sum in fp32."""

    def __init__(self, linear: nn.Linear, splits: int, max_rows: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters, under the same names
        self.splits, self.max_rows = splits, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.reshape(-1, k)  # (M, K)
        if rows.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        s = self.splits
        a = rows.view(rows.shape[0], s, k // s).transpose(0, 1)  # (S, M, K/S)
        b = self.weight.view(self.weight.shape[0], s, k // s).permute(1, 2, 0)  # (S, K/S, N)
        out = torch.bmm(a, b).sum(0, dtype=torch.float32) + self.bias.float()  # (M, N)
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def _gelu_quant_kernel(cuda: bool):
    """The fused GELU-to-e4m3 of kernels.py where it can run, else the same in torch ops."""
    if cuda:
        try:
            from .kernels import gelu_quant
            return gelu_quant
        except ImportError as e:  # no Triton: the torch ops, which inductor fuses less well
            log.warning("Triton is missing (%s): fc1's GELU and its FP8 quantization run as torch ops", e)
    return gelu_quantize_rows


class BySize(nn.Module):
    """``small`` for inputs of fewer than ``min_rows`` token rows, else ``large`` (the same function in another
    precision): chosen when a bucket's forward is traced, its shape static, so each compiled bucket holds one."""

    def __init__(self, small: nn.Module, large: nn.Module, min_rows: int):
        super().__init__()
        self.small, self.large, self.min_rows = small, large, min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.small if x.numel() // x.shape[-1] < self.min_rows else self.large)(x)


class GeluEpilogueMlp(nn.Module):
    """The block's MLP with fc1's bias and tanh-GELU computed inside its GEMM (cuBLASLt's epilogue)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
        return self.fc2(h.view(*x.shape[:-1], -1))  # (N, T, D)


class JoinedAdaLN(nn.Module):
    """Every block's adaLN modulation and the final layer's, from c, in one GEMM over joined weights.

    The layers' weights move into one buffer and stay visible as views of it, so ``state_dict()`` and
    ``load_state_dict()`` still see them under their names and the memory is not doubled (a later ``.to()`` would
    copy them apart: still right, no longer shared).
    """

    def __init__(self, model: DiTModel):
        super().__init__()
        layers = [block.adaLN_modulation[-1] for block in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
        self.sizes = [layer.out_features for layer in layers]
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in layers])  # (sum of out_features, D)
            bias = torch.cat([layer.bias for layer in layers])
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.weight = nn.Parameter(weight[start:start + size], requires_grad=False)
            layer.bias = nn.Parameter(bias[start:start + size], requires_grad=False)
            start += size

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """(N, D) -> every layer's adaLN output side by side (N, 6D per block + 2D for the final layer)."""
        return F.linear(F.silu(c), self.weight, self.bias)


class InferenceDiT(nn.Module):
    """The forward the engine runs: ``DiTModel.forward`` with the adaLN GEMMs joined (and swapped modules inside).

    ``embed``, ``blocks`` and ``head`` are the same function in three parts, for a step whose rows do not all run the
    blocks (feature caching): ``head(blocks(*embed(x, t, y)), c)`` with ``c`` the conditioning ``embed`` returned.
    The blocks' adaLN runs in ``blocks``, so a row that skips the blocks skips their modulation too.
    """

    def __init__(self, model: DiTModel, joined_adaln: bool):
        super().__init__()
        self.model = model
        self.adaln = JoinedAdaLN(model) if joined_adaln else None
        self.sizes = [block.adaLN_modulation[-1].out_features for block in model.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                steps: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,), y: (N,), w and steps: (N,) a student's guidance and step count -> (N, C_out, H,
        W), as DiTModel.forward."""
        m = self.model
        if self.adaln is None:
            return m(x, t, y, w, steps)
        x = m.x_embedder(x) + m.pos_embed.to(x.dtype)  # (N, T, D)
        modulations = self.adaln(m.condition(t, y, w, steps).to(x.dtype)).split(self.adaln.sizes, dim=1)
        for block, modulation in zip(m.blocks, modulations):
            x = block.modulated(x, modulation)  # (N, T, D)
        return m.unpatchify(m.final_layer.modulated(x, modulations[-1]))  # (N, C_out, H, W)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
              steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The work before the blocks: tokens (N, T, D) and the conditioning c (N, D)."""
        m = self.model
        return m.x_embedder(x) + m.pos_embed.to(x.dtype), m.condition(t, y, w, steps).to(x.dtype)

    def blocks(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, D) through every block, modulated by c (N, D) -> (N, T, D)."""
        blocks = self.model.blocks
        if self.adaln is None:
            modulations = [block.adaLN_modulation(c) for block in blocks]
        else:  # the blocks' rows of the joined weight, in one GEMM
            width = sum(self.sizes)
            modulations = F.linear(F.silu(c), self.adaln.weight[:width], self.adaln.bias[:width]).split(self.sizes, 1)
        for block, modulation in zip(blocks, modulations):
            h = block.modulated(h, modulation)
        return h

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The blocks' output (N, T, D) through the final layer, modulated by c (N, D) -> (N, C_out, H, W)."""
        final = self.model.final_layer
        return self.model.unpatchify(final.modulated(h, final.adaLN_modulation(c)))


def apply_fast_paths(model: DiTModel, options: FastPaths, cuda: bool, fp8: bool = False) -> InferenceDiT:
    """Swap ``model``'s modules for the chosen fast paths (in place) and return the forward to run.

    The CUDA-only paths are skipped elsewhere: on the CPU a request must meet the same GEMMs alone and in a full
    batch. Split-K is skipped, with a log line, where it does not divide both reductions it cuts. With ``fp8`` the
    blocks' linears become ``Fp8Linear``s, which take the place of the GELU epilogue and split-K in forwards of
    ``fp8_min_rows`` token rows or more.
    """
    cfg = model.config
    splits = options.split_k if cuda else 1
    if splits > 1 and (cfg.hidden_dim % splits or cfg.ffn_dim % splits):
        log.info("split_k %d does not divide hidden_dim %d and ffn_dim %d; not splitting", splits, cfg.hidden_dim,
                 cfg.ffn_dim)
        splits = 1
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if fp8:  # the attention's and the MLP's linears; adaLN, the embedders and the final layer stay 16-bit
            large = (Fp8Linear(attn.qkv), Fp8Linear(attn.proj),
                     Fp8BlockMlp(mlp) if options.fp8_blocks and Fp8BlockMlp.supports(mlp) else
                     Fp8Mlp(mlp, _gelu_quant_kernel(cuda)))
            if not options.fp8_min_rows:
                attn.qkv, attn.proj, block.mlp = large
                continue
        if cuda and options.gelu_epilogue:
            mlp = GeluEpilogueMlp(mlp)
        if splits > 1:
            attn.proj = SplitKLinear(attn.proj, splits, options.split_k_max_rows)
            mlp.fc2 = SplitKLinear(mlp.fc2, splits, options.split_k_max_rows)
        if fp8:
            attn.qkv, attn.proj, mlp = (BySize(small, big, options.fp8_min_rows)
                                        for small, big in zip((attn.qkv, attn.proj, mlp), large))
        block.mlp = mlp
    return InferenceDiT(model, options.joined_adaln)
