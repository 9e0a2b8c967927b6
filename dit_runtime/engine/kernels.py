"""Triton kernels the engine uses where inductor's own are slow, as torch custom ops (opaque to torch.compile, and
captured in CUDA graphs like any kernel). Imported only on CUDA: the CPU keeps the plain torch version beside each.

``gelu_quant_rows``: fc1's output through tanh-GELU to e4m3 rows with one scale each, in one pass. Inductor fuses
the same ops into a looped reduction over the 4096-wide rows that reads each row twice and runs at a third of the
memory bandwidth: 7.9 of a 29.5 ms FP8 step of ``dit-10l`` at batch 256 (``python -m benchmarks engine --setups
ours-fp8 --profile-kernels``). Here a program holds its row in registers, so the row is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import AMAX_FLOOR, E4M3_MAX

SQRT_2_OVER_PI = 0.7978845608028654


# Rows per program and warps, timed once per row width at the first call (before CUDA graphs capture it).
@triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4) for w in (4, 8, 16)],
                 key=["K"])
@triton.jit
def _gelu_quant_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                            E4M3: tl.constexpr, FLOOR: tl.constexpr, C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]  # (ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = C * (x + 0.044715 * x * x * x)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # exact at both ends: exp overflows to inf -> 1, underflows -> -1
    g = 0.5 * x * (1.0 + tanh)
    scale = tl.maximum(tl.max(tl.abs(g), axis=1), FLOOR) / E4M3  # (ROWS,)
    tl.store(q_ptr + offs, (g / scale[:, None]).to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


@torch.library.custom_op("dit_serve::gelu_quant_rows", mutates_args=())
def gelu_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) bf16/fp16 -> tanh-GELU as e4m3 (M, K) and fp32 row scales (M, 1), ``gelu(x) ~= q * scale``."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["ROWS"]),)  # noqa: E731
    _gelu_quant_rows_kernel[grid](x, q, scale, m, K=k, BLOCK=triton.next_power_of_2(k), E4M3=E4M3_MAX,
                                  FLOOR=AMAX_FLOOR, C=SQRT_2_OVER_PI)
    return q, scale


@gelu_quant_rows.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def gelu_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu_quant_rows`` as the function a module holds: a saved compiled program (programs.py) pickles the modules
    its step reads, and a function pickles as its name, where the custom op's object (its dispatcher library) does
    not pickle at all."""
    return gelu_quant_rows(x)
