"""Serving fixtures: real random-weight digits-shaped checkpoints written once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import write_digits_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"digits-s": write_digits_checkpoint(root / "digits-s.safetensors", seed=0),
            "digits-m": write_digits_checkpoint(root / "digits-m.safetensors", seed=1)}
