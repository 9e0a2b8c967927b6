"""Helpers of the serving tests: real random-weight digits-shaped checkpoints, ports, model entries."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch

from benchmarks.soak import replica_pids  # noqa: F401  (the tests find replicas as the soak does)
from dit_runtime.checkpoint import CheckpointInfo, save_checkpoint
from dit_runtime.model import DiTConfig, DiTModel

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Shaped like the shipped digits models (16x16 grey, 10 classes, label dropout for guidance), but narrow and
# shallow so a step takes about a millisecond on one core.
TINY_DIGITS = DiTConfig(hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, input_size=16, patch_size=4,
                        in_channels=1, num_classes=10, learn_sigma=False)
# Same shape of image, 4x the tokens and width: steps of several milliseconds, so a long request is still running
# when a test cancels it or its deadline passes.
SLOW_DIGITS = DiTConfig(hidden_dim=128, num_layers=4, num_heads=4, ffn_dim=512, input_size=16, patch_size=2,
                        in_channels=1, num_classes=10, learn_sigma=False)


def write_digits_checkpoint(path: Path, seed: int = 0, config: DiTConfig = TINY_DIGITS) -> Path:
    """A random-weight pixel-space checkpoint (every parameter re-drawn: adaLN-Zero's init outputs zeros)."""
    model = DiTModel.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    info = CheckpointInfo(config=config, class_names=DIGIT_NAMES, space="pixel",
                          training={"note": "random weights for serving tests"})
    return save_checkpoint(path, model.state_dict(), info)


def image_serve_env() -> dict[str, str]:
    """Ray Serve's switches as the Docker image sets them (its ENV instructions' ``RAY_SERVE_*`` variables)."""
    text = (Path(__file__).parents[2] / "Dockerfile").read_text().replace("\\\n", " ")  # continuation lines joined
    env = {}
    for instruction in re.findall(r"^ENV\s+(.*)$", text, re.M):
        env.update(token.split("=", 1) for token in instruction.split() if "=" in token)
    return {k: v.strip('"') for k, v in env.items() if k.startswith("RAY_SERVE_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_args(name: str, checkpoint: Path, /, **overrides) -> dict:
    """A CPU model entry sized for a 2-core machine (fractional CPUs so several replicas fit)."""
    return {"name": name, "checkpoint": str(checkpoint), "num_cpus": 0.1, "max_batch_size": 16,
            "max_queue_size": 64, **overrides}

