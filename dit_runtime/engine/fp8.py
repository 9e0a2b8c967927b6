"""FP8 linears: e4m3 weights with one scale per output row, times activations quantized per row at run time.

``fast_paths.apply_fast_paths`` swaps the blocks' linears for these at ``precision: fp8``; ``kernels.py`` fuses
fc1's GELU with the row quantization defined here, to the same constants. With ``FastPaths.fp8_blocks`` the MLP is
``Fp8BlockMlp`` instead: fc1's output leaves its GEMM (a Triton kernel) as e4m3 in 1x128 blocks, fc2 takes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Largest finite float8_e4m3fn value: a row scaled by amax / E4M3_MAX fills the format's range.
E4M3_MAX = 448.0
# Floor of a row's amax, so an all-zero row quantizes to zeros instead of dividing by zero.
AMAX_FLOOR = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and fp32 scales (M, 1) with ``x ~= q * scale``, each row scaled by its own amax."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=AMAX_FLOOR) / E4M3_MAX  # (M, 1)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(gelu(x))`` with tanh-GELU: in plain torch ops (the CPU, and CUDA without Triton)."""
    return quantize_rows(F.gelu(x, approximate="tanh"))


class Fp8Linear(nn.Module):
    """``linear`` in FP8: e4m3 weights with per-output-row scales (quantized here, once), activations quantized
    per row at each call, one ``torch._scaled_mm`` with the bias, bf16 out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)  # (N, K), (N, 1)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N): scaled_mm's per-column scale of w^T
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(*quantize_rows(x.reshape(-1, x.shape[-1])))  # (M, N)
        return out.view(*x.shape[:-1], self.out_features)

    def matmul(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Rows already quantized: e4m3 (M, K) and their scales (M, 1) -> bf16 (M, N)."""
        return torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                                out_dtype=torch.bfloat16)


class Fp8Mlp(nn.Module):
    """The block's MLP in FP8, fc1's output going through GELU to e4m3 rows in one pass: ``gelu_quant`` is the
    Triton kernel of kernels.py on CUDA (inductor's fusion of the same ops reads each 4096-wide row twice)."""

    def __init__(self, mlp: nn.Module, gelu_quant=gelu_quantize_rows):
        super().__init__()
        self.fc1, self.fc2 = Fp8Linear(mlp.fc1), Fp8Linear(mlp.fc2)
        self.gelu_quant = gelu_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (N, T, F) bf16
        return self.fc2.matmul(*self.gelu_quant(h.reshape(-1, h.shape[-1]))).view(*x.shape[:-1], -1)  # (N, T, D)


# Width of a block scale: fc1's GELU output in 1x128 blocks of a row, fc2's weight in 128x128 tiles.
BLOCK = 128


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and fp32 scales (M, K / 128), each 1x128 block of a row scaled by its own amax."""
    m, k = x.shape
    blocks = x.float().view(m, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR) / E4M3_MAX  # (M, K / 128)
    return (blocks / scale[:, :, None]).view(m, k).to(torch.float8_e4m3fn), scale


def quantize_tiles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> e4m3 (N, K) and fp32 scales (N / 128, K / 128), each 128x128 tile scaled by its own amax."""
    n, k = w.shape
    tiles = w.float().view(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (tiles / scale[:, None, :, None]).view(n, k).to(torch.float8_e4m3fn), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """The fp32 values of e4m3 ``q`` (M, K) with scales per ``rows`` x 128 block: (M / rows, K / 128)."""
    return q.float() * scale.repeat_interleave(rows, dim=0).repeat_interleave(BLOCK, dim=1)


def gelu_quantize_blocks(fc1: "Fp8Linear", q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 of e4m3 rows ``q`` (M, K) with scales (M, 1), through tanh-GELU, as e4m3 with 1x128 block scales, in torch
    ops (the CPU); on CUDA kernels.fp8_gemm_gelu_quant_blocks does it inside the GEMM. Scales (M, N / 128),
    column-major as the kernel writes them."""
    blocks, scales = quantize_blocks(F.gelu(fc1.matmul(q, scale), approximate="tanh"))
    return blocks, scales.t().contiguous().t()


def _fc1_gelu_quant_blocks(fc1: "Fp8Linear", q: torch.Tensor, scale: torch.Tensor):
    """The fused kernel where it runs (CUDA with Triton), else the torch ops."""
    if q.is_cuda:
        from .kernels import fp8_gemm_gelu_quant_blocks
        return fp8_gemm_gelu_quant_blocks(q, scale, fc1.weight, fc1.weight_scale, fc1.bias)
    return gelu_quantize_blocks(fc1, q, scale)


class Fp8BlockMlp(nn.Module):
    """The block's MLP in FP8 with fc1's output in 1x128 blocks: fc1's GEMM applies bias and GELU and writes e4m3 with
    a scale per block of 128 outputs (kernels.py; a per-row scale cannot come out of a GEMM's epilogue, a row's amax
    spanning every column tile), and fc2 takes those blocks times its weight in 128x128 tiles (``F.scaled_mm``'s
    ``BlockWise1x128`` x ``BlockWise128x128``). Needs both widths to be multiples of 128."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1 = Fp8Linear(mlp.fc1)
        fc2 = mlp.fc2
        with torch.no_grad():
            weight, scale = quantize_tiles(fc2.weight)  # (D, F), (D / 128, F / 128)
        self.register_buffer("fc2_weight", weight)
        self.register_buffer("fc2_scale", scale)
        self.fc2_bias = fc2.bias

    @staticmethod
    def supports(mlp: nn.Module) -> bool:
        return mlp.fc1.in_features % BLOCK == 0 and mlp.fc1.out_features % BLOCK == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = _fc1_gelu_quant_blocks(self.fc1, *quantize_rows(x.reshape(-1, x.shape[-1])))  # (M, F), (M, F/128)
        return self.fc2(q, scale).view(*x.shape[:-1], -1)

    def fc2(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scaled_mm_blocks(q, scale, self.fc2_weight, self.fc2_scale, self.fc2_bias)


# torch.compile (2.11) cannot trace F.scaled_mm (its _scaled_mm_v2 builtin): a custom op keeps it opaque, as the
# Triton kernels are.
@torch.library.custom_op("dit_serve::scaled_mm_blocks", mutates_args=())
def scaled_mm_blocks(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """e4m3 ``q`` (M, K) in 1x128 blocks (scales (M, K / 128), column-major) times e4m3 ``weight`` (N, K) in 128x128
    tiles (scales (N / 128, K / 128)), plus ``bias``: bf16 (M, N). ``F.scaled_mm`` on CUDA; dequantized fp32 math
    elsewhere (the CPU has no block-scaled FP8 GEMM)."""
    if q.is_cuda:
        return F.scaled_mm(q, weight.t(), scale_a=scale, scale_recipe_a=F.ScalingType.BlockWise1x128,
                           scale_b=weight_scale.t(), scale_recipe_b=F.ScalingType.BlockWise128x128, bias=bias,
                           output_dtype=torch.bfloat16)
    out = dequantize_blocks(q, scale) @ dequantize_blocks(weight, weight_scale, rows=BLOCK).t()
    return (out + bias.float()).to(torch.bfloat16)


@scaled_mm_blocks.register_fake
def _(q, scale, weight, weight_scale, bias):
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=torch.bfloat16)


def check_fp8_support(device: torch.device) -> None:
    """Raise a ValueError saying why FP8 cannot run on ``device`` and what to use instead."""
    if device.type != "cuda":
        raise ValueError(f"precision fp8 runs on an NVIDIA GPU with FP8 tensor cores, not on {device.type}: use fp32 "
                         "on the CPU")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                         f"Blackwell); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: "
                         "use bf16 or fp16")
