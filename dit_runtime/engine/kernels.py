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
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8 import AMAX_FLOOR, BLOCK, E4M3_MAX

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


# fc1 of the FP8 MLP with its epilogue: the e4m3 GEMM, then per-row x per-column scales, bias, tanh-GELU and the
# quantization of each 1x128 block of the output to e4m3 with its own scale, while the tile is in registers. A
# per-row scale could not come out of here (a row's amax spans every N-tile); a 1x128 block lies inside one.
# Persistent: one program per SM walks its tiles, loading A and W through TMA descriptors (built on the host, so CUDA
# graphs capture them by value) and storing e4m3 through one; the flattened tile loop lets the next tile's loads
# overlap this tile's epilogue. A tile of 256 columns is quantized as two 128-wide halves, a block each. At fc1's
# shape for batch 256 (65,536 x 1024 -> 4096) on an H100 it takes 0.697 ms, against 0.747 for the same epilogue in a
# one-tile-per-program kernel of plain loads and 0.642 for cuBLAS's GEMM with no GELU or quantization.
# Timed per (N, K, rows rounded up to a power of two) at the first call, which warm-up makes before any capture.
def _set_tma_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]
    nargs["q_desc"].block_shape = [nargs["BM"], nargs["SB"]]


@triton.autotune(configs=[triton.Config({"BM": bm, "BN": bn, "BK": 128, "GROUP": 8}, num_stages=s, num_warps=w,
                                        pre_hook=_set_tma_blocks)
                          for bm, bn, s, w in ((128, 256, 3, 8), (128, 256, 4, 8), (128, 128, 4, 8), (128, 128, 5, 4),
                                               (256, 128, 3, 8), (128, 128, 3, 4))],
                 key=["N", "K", "M_KEY"])
@triton.jit
def _fp8_gemm_gelu_quant_blocks_kernel(a_desc, b_desc, q_desc, sa_ptr, sb_ptr, bias_ptr, s_ptr, M, M_KEY,
                                       N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                       BK: tl.constexpr, GROUP: tl.constexpr, SB: tl.constexpr, SMS: tl.constexpr,
                                       E4M3: tl.constexpr, FLOOR: tl.constexpr, C: tl.constexpr):
    tiles_m = tl.cdiv(M, BM)
    tiles_n = N // BN
    per_group = GROUP * tiles_n
    tile_out = tl.program_id(0) - SMS  # the epilogue's own tile counter, apart from the loads' (as in flattening)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, per_group, tiles_m, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([pid_n * BN, k]).T, acc)
        tile_out += SMS
        pid_m, pid_n = _grouped_tile(tile_out, per_group, tiles_m, GROUP)
        rm = pid_m * BM + tl.arange(0, BM)
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        if BN == 2 * SB:
            halves = tl.permute(tl.reshape(acc, (BM, 2, SB)), (0, 2, 1))
            left, right = tl.split(halves)
            _gelu_quant_block(left, sa, rm, pid_m * BM, pid_n * BN, M, sb_ptr, bias_ptr, q_desc, s_ptr, SB, E4M3,
                              FLOOR, C)
            _gelu_quant_block(right, sa, rm, pid_m * BM, pid_n * BN + SB, M, sb_ptr, bias_ptr, q_desc, s_ptr, SB,
                              E4M3, FLOOR, C)
        else:
            _gelu_quant_block(acc, sa, rm, pid_m * BM, pid_n * BN, M, sb_ptr, bias_ptr, q_desc, s_ptr, SB, E4M3, FLOOR,
                              C)


@triton.jit
def _grouped_tile(tile, per_group, tiles_m, GROUP: tl.constexpr):
    """A tile's (row, column) of tiles: GROUP row-tiles walk the columns together, so their W tiles stay in L2."""
    first_m = (tile // per_group) * GROUP
    rows_here = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + (tile % per_group) % rows_here, (tile % per_group) // rows_here


@triton.jit
def _gelu_quant_block(acc, sa, rm, m0, n0, M, sb_ptr, bias_ptr, q_desc, s_ptr, SB: tl.constexpr, E4M3: tl.constexpr,
                      FLOOR: tl.constexpr, C: tl.constexpr):
    """One (rows, 128) block column of fc1's accumulator: scales, bias, tanh-GELU, one e4m3 scale per row."""
    rn = n0 + tl.arange(0, SB)
    x = acc * sa[:, None] * tl.load(sb_ptr + rn)[None, :] + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    z = C * (x + 0.044715 * x * x * x)
    g = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))  # 0.5 x (1 + tanh z), exact at both ends as above
    scale = tl.maximum(tl.max(tl.abs(g), axis=1), FLOOR) / E4M3
    q_desc.store([m0, n0], (g / scale[:, None]).to(tl.float8e4nv))
    tl.store(s_ptr + (n0 // SB).to(tl.int64) * M + rm, scale, mask=rm < M)  # column-major


@torch.library.custom_op("dit_serve::fp8_gemm_gelu_quant_blocks", mutates_args=())
def fp8_gemm_gelu_quant_blocks(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows ``a`` (M, K) with scales (M, 1) times e4m3 ``weight`` (N, K) with per-row scales (1, N), plus
    ``bias`` (N,), through tanh-GELU -> e4m3 (M, N) and fp32 1x128 block scales (M, N / 128), column-major (the layout
    ``F.scaled_mm``'s ``BlockWise1x128`` takes): ``gelu(a w^T + bias)[m, j] ~= q[m, j] * scale[m, j // 128]``."""
    (m, k), n = a.shape, weight.shape[0]
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=a.device)
    scale = torch.empty((n // BLOCK, m), dtype=torch.float32, device=a.device).t()
    a = a.contiguous()
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = lambda meta: (min(sms, triton.cdiv(m, meta["BM"]) * (n // meta["BN"])),)  # noqa: E731
    descriptor = lambda t: TensorDescriptor.from_tensor(t, [1, 1])  # noqa: E731  (the config's pre_hook sizes blocks)
    _fp8_gemm_gelu_quant_blocks_kernel[grid](descriptor(a), descriptor(weight), descriptor(q), a_scale.contiguous(),
                                             weight_scale.contiguous(), bias, scale, m, triton.next_power_of_2(m),
                                             N=n, K=k, SB=BLOCK, SMS=sms, E4M3=E4M3_MAX, FLOOR=AMAX_FLOOR,
                                             C=SQRT_2_OVER_PI)
    return q, scale


@fp8_gemm_gelu_quant_blocks.register_fake
def _(a, a_scale, weight, weight_scale, bias):
    m, n = a.shape[0], weight.shape[0]
    return a.new_empty((m, n), dtype=torch.float8_e4m3fn), a.new_empty((n // BLOCK, m), dtype=torch.float32).t()
