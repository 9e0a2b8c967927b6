"""Shared fixtures: small real checkpoints written to tmp_path; the run's CPU kernels in pytest's header."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dit_runtime.checkpoint import CheckpointInfo, default_class_names, save_checkpoint
from dit_runtime.model import DiTConfig, DiTModel, get_preset
from model_helpers import randomize

EXIT_STATUS = pytest.StashKey[int]()
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Digits-shaped (16x16 grey, 10 classes, no learned sigma) but narrow, so tests stay fast.
TINY_PIXEL_CONFIG = DiTConfig(hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, input_size=16, patch_size=2,
                              in_channels=1, num_classes=10, learn_sigma=False)


def pytest_report_header(config) -> str:
    """Which vector kernels and how many threads torch runs with, and MKL's code path if one is forced: what a
    numerical test's exact or tolerant comparison depends on (tests/test_cpu_portability.py reads this line)."""
    import torch

    return (f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}, "
            f"MKL_CBWR: {os.environ.get('MKL_CBWR') or 'unset'}")


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """The test process ends here, once pytest has reported and every plugin has finished, with pytest's own status
    and without the interpreter's teardown. Ray Serve's router thread outlives ``ray.shutdown()``
    (ray-project/ray#31145), and native threads left at exit can crash the process as its libraries are torn down:
    CI has seen a SIGSEGV after every test had passed, with no Python frame for faulthandler to print."""
    status = config.stash.get(EXIT_STATUS, None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def write_random_checkpoint(path: Path, config: DiTConfig, class_names: list[str], space: str,
                            seed: int = 0) -> Path:
    model = randomize(DiTModel.from_config(config), seed=seed)
    info = CheckpointInfo(config=config, class_names=class_names, space=space,
                          training={"note": "random weights for tests"})
    return save_checkpoint(path, model.state_dict(), info)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A random latent-space ``dit-tiny`` checkpoint (learned sigma, guidance, 4 channels)."""
    config = get_preset("dit-tiny")
    return write_random_checkpoint(tmp_path / "tiny.safetensors", config, default_class_names(config.num_classes),
                                   "latent")


@pytest.fixture
def pixel_checkpoint(tmp_path: Path) -> Path:
    """A random pixel-space digits-shaped checkpoint (16x16x1, classes named "zero".."nine")."""
    return write_random_checkpoint(tmp_path / "pixel.safetensors", TINY_PIXEL_CONFIG, DIGIT_NAMES, "pixel", seed=1)
