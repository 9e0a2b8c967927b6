"""Helpers shared by the dit_runtime tests (a plain module: `conftest` names clash between test folders)."""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter from N(0, std): adaLN-Zero's init makes a fresh DiT output exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
