"""Feature caching inside step-level batching: each image row decides for itself whether a step runs the blocks.

A DiT's block stack changes its input by a residual ``R = blocks(h) - h`` that moves slowly from one denoising step
to the next. A request's ``CachePolicy`` (``dit_runtime.request``) names the steps that run the blocks ("full"); at
the others the runner forecasts ``R`` from the row's last full steps by a Taylor expansion in the step index and
runs only the embedders and the final layer. In one engine step the full rows of every request go through the
blocks together, packed into the smallest bucket that holds them, so the blocks' GEMMs shrink with the share of
rows that forecast.

State is per cache row: a pool of ``rows`` entries, each holding the Taylor terms of one image row's residual and
the step it was last computed at, plus a scratch entry that rows without a cache (and padding) write to. The
scheduler hands a caching request its entries at admission and takes them back the moment it finishes, fails,
is cancelled or times out. An entry is written at its request's step 0, which is always full, before anything
reads it, so no row ever sees another request's features.
"""

from __future__ import annotations

import math

import torch

from ..request import MAX_CACHE_ORDER


class FeatureCache:
    """Taylor terms of the block stack's residual, per cache row: ``terms[k][row]`` is the k-th difference per step."""

    def __init__(self, rows: int, tokens: int, hidden_dim: int, dtype: torch.dtype, device: torch.device):
        self.scratch = rows  # the entry rows without a cache, and padding, write to
        self.terms = torch.zeros(MAX_CACHE_ORDER + 1, rows + 1, tokens, hidden_dim, dtype=dtype, device=device)
        self.last_full = torch.zeros(rows + 1, dtype=torch.int64, device=device)

    @staticmethod
    def bytes_per_row(tokens: int, hidden_dim: int, dtype: torch.dtype) -> int:
        """Device memory one cached image row holds: its Taylor terms and its last full step."""
        return (MAX_CACHE_ORDER + 1) * tokens * hidden_dim * torch.empty((), dtype=dtype).element_size() + 8

    def update(self, entry: torch.Tensor, residual: torch.Tensor, step: torch.Tensor) -> None:
        """After a full step: ``residual`` (M, T, D) of the rows whose cache entries are ``entry`` (M,), at ``step``
        (M,). Each term becomes the divided difference of the one below; at step 0 the higher terms are zero."""
        gap = (step - self.last_full[entry]).clamp(min=1).to(residual.dtype).view(-1, 1, 1)  # (M, 1, 1)
        first = (step == 0).view(-1, 1, 1)
        new = residual
        for k in range(MAX_CACHE_ORDER + 1):
            old = self.terms[k][entry]
            self.terms[k][entry] = new
            if k < MAX_CACHE_ORDER:
                new = torch.where(first, torch.zeros_like(new), (new - old) / gap)
        self.last_full[entry] = step

    def forecast(self, entry: torch.Tensor, step: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The residual (M, T, D) at ``step`` (M,) of the rows at cache ``entry`` (M,), to Taylor ``order`` (M,)."""
        ahead = (step - self.last_full[entry]).to(self.terms.dtype)  # (M,)
        out = self.terms[0][entry]
        for k in range(1, MAX_CACHE_ORDER + 1):
            weight = torch.where(order >= k, ahead ** k / math.factorial(k), torch.zeros_like(ahead))
            out = out + weight.view(-1, 1, 1) * self.terms[k][entry]
        return out
