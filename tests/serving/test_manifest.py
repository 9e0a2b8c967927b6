"""checkpoints/manifest.json: written from the files, and a missing, truncated or altered checkpoint is refused by
name (no Ray here; test_serve_reliability.py shows the same through a deployment's health)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_helpers import write_digits_checkpoint

from dit_runtime.checkpoint import CheckpointError, sha256_of
from serving.manifest import MANIFEST_NAME, main, verify_checkpoint, write_manifest


@pytest.fixture
def folder(tmp_path):
    write_digits_checkpoint(tmp_path / "a.safetensors", seed=0)
    write_digits_checkpoint(tmp_path / "b.safetensors", seed=1)
    write_manifest(tmp_path)
    return tmp_path


def test_manifest_records_the_sha256_and_size_of_every_checkpoint(folder):
    files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert set(files) == {"a.safetensors", "b.safetensors"}
    for name, entry in files.items():
        assert entry == {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size}
    verify_checkpoint(folder / "a.safetensors")


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.unlink(), "not found"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])), "does not match the manifest"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(folder, damage, needle):
    damage(folder / "a.safetensors")
    with pytest.raises(CheckpointError, match=needle) as e:
        verify_checkpoint(folder / "a.safetensors")
    assert "a.safetensors" in str(e.value)
    verify_checkpoint(folder / "b.safetensors")  # the other file is unaffected


def test_unlisted_checkpoint_or_missing_manifest_says_how_to_write_one(folder):
    write_digits_checkpoint(folder / "c.safetensors", seed=2)
    with pytest.raises(CheckpointError, match=r"c\.safetensors: not listed.*python -m serving\.manifest"):
        verify_checkpoint(folder / "c.safetensors")
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="no checksum manifest"):
        verify_checkpoint(folder / "a.safetensors")


def test_cli_writes_then_checks_and_fails_on_a_changed_file(folder, capsys):
    assert main([str(folder)]) == 0 and "2 files" in capsys.readouterr().out
    assert main(["--check", str(folder)]) == 0
    (folder / "b.safetensors").write_bytes(b"not the same")
    assert main(["--check", str(folder)]) == 1
    assert "BAD" in capsys.readouterr().out


def test_every_shipped_checkpoint_is_in_the_manifest_and_every_cpu_config_names_a_shipped_one():
    """The repository as it ships: `make serve` loads every model of serve_config.yaml from checkpoints/, each checked
    against its manifest entry, so a file missing from either would stop a replica from starting."""
    import yaml

    from serving.manifest import verify_checkpoint as verify

    root = Path(__file__).resolve().parents[2]
    listed = json.loads((root / "checkpoints" / MANIFEST_NAME).read_text())["files"]
    shipped = sorted(p.name for p in (root / "checkpoints").glob("*.safetensors"))
    assert sorted(listed) == shipped
    config = yaml.safe_load((root / "serve_config.yaml").read_text())
    for model in config["applications"][0]["args"]["models"]:
        verify(root / model["checkpoint"])
