"""FP8 linears: e4m3 weights with one scale per output row, times activations quantized per row at run time.

``fast_paths.apply_fast_paths`` swaps the blocks' linears for these at ``precision: fp8``; ``kernels.py`` fuses
fc1's GELU with the row quantization defined here, to the same constants.
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
