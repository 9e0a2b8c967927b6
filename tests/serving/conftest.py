"""Serving fixtures: real random-weight digits-shaped checkpoints (with their sha256 manifest) written once per
module."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import write_digits_checkpoint

from serving.manifest import write_manifest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {"digits-s": write_digits_checkpoint(root / "digits-s.safetensors", seed=0),
             "digits-m": write_digits_checkpoint(root / "digits-m.safetensors", seed=1)}
    write_manifest(root)  # the server verifies every checkpoint against it before loading
    return paths
