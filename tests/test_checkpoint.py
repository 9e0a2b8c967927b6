"""Checkpoints: round trip, imports of the paper's layout, and errors that name the file and what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_helpers import randomize
from dit_runtime.checkpoint import (CheckpointError, CheckpointInfo, default_class_names, import_paper_checkpoint,
                                    load_model, load_state_dict, read_info, save_checkpoint)
from dit_runtime.model import DiTConfig, DiTModel, get_preset

# A paper-style model at test size: 1000 classes and label dropout give the official 1001-row label table.
PAPER_STYLE = DiTConfig(hidden_dim=64, num_layers=2, num_heads=4, ffn_dim=256, input_size=8, patch_size=2,
                        in_channels=4, num_classes=1000)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    config = get_preset("dit-tiny")
    model = randomize(DiTModel.from_config(config))
    raw = randomize(DiTModel.from_config(config), seed=5)
    info = CheckpointInfo(config=config, class_names=[f"c{i}" for i in range(10)], space="latent",
                          training={"steps": 3})
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), info, raw_state_dict=raw.state_dict())
    loaded, loaded_info = load_model(path)
    assert loaded_info.config == config and loaded_info.class_names == info.class_names
    assert loaded_info.training == {"steps": 3} and read_info(path).space == "latent"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    raw_state, _ = load_state_dict(path, which="raw")
    assert torch.equal(raw_state["blocks.0.attn.qkv.weight"], raw.blocks[0].attn.qkv.weight)
    assert not any(p.is_meta for p in loaded.parameters())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'nope.safetensors'}"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file_names_the_file_and_says_truncated(tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_checkpoint)
    assert str(tiny_checkpoint) in str(e.value) and "truncated" in str(e.value)


def test_corrupted_header_names_the_file(tiny_checkpoint):
    data = bytearray(tiny_checkpoint.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after the 8-byte length
    tiny_checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_checkpoint)
    assert str(tiny_checkpoint) in str(e.value) and "corrupted" in str(e.value)


def test_foreign_safetensors_file_asks_for_conversion(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert str(path) in message and "'pt'" in message and "dit-serve/1" in message and "dit-convert" in message


def test_mismatched_weights_name_missing_unexpected_and_mis_shaped_keys(tmp_path):
    config = get_preset("dit-tiny")
    state = DiTModel.from_config(config).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.7.extra.weight"] = torch.zeros(3)
    state["final_layer.linear.weight"] = torch.zeros(5, 32)
    info = CheckpointInfo(config=config, class_names=default_class_names(10))
    path = save_checkpoint(tmp_path / "bad.safetensors", state, info)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert str(path) in message
    assert "missing keys blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys blocks.7.extra.weight" in message
    assert "final_layer.linear.weight: file (5, 32) vs model (32, 32)" in message


def test_unreadable_config_metadata_is_reported(tmp_path):
    info = CheckpointInfo(config=get_preset("dit-tiny"), class_names=default_class_names(10))
    meta = info.to_metadata() | {"model_config": json.dumps({"hidden_dim": 32, "depth": 2})}
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"unreadable checkpoint metadata: unknown DiT config keys \['depth'\]"):
        load_model(path)


@torch.no_grad()
def test_paper_state_dict_imports_with_its_pos_embed_and_null_class(tmp_path):
    model = randomize(DiTModel.from_config(PAPER_STYLE)).eval()
    state = model.state_dict()
    assert state["y_embedder.embedding_table.weight"].shape[0] == 1001 and "pos_embed" in state
    torch.save(state, tmp_path / "DiT-test.pt")
    imported = import_paper_checkpoint(tmp_path / "DiT-test.pt", num_heads=4)
    assert imported.config == PAPER_STYLE
    assert all(torch.equal(imported.state_dict[k], v) for k, v in state.items())


def test_paper_import_needs_num_heads_unless_a_preset_matches(tmp_path):
    torch.save(DiTModel.from_config(PAPER_STYLE).state_dict(), tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="pass --num-heads"):
        import_paper_checkpoint(tmp_path / "a.pt")
    # dit-tiny's shapes are a preset's: heads come from it, and a missing pos_embed is recomputed.
    state = DiTModel.from_preset("dit-tiny").state_dict()
    torch.save({"model": state, "ema": state, "opt": {"step": torch.tensor(3)}}, tmp_path / "b.pt")
    imported = import_paper_checkpoint(tmp_path / "b.pt")
    assert imported.config.num_heads == get_preset("dit-tiny").num_heads
    state.pop("pos_embed")
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="has no pos_embed, so the input size is unknown; pass --input-size"):
        import_paper_checkpoint(tmp_path / "c.pt")
    imported = import_paper_checkpoint(tmp_path / "c.pt", input_size=8)
    assert torch.equal(imported.state_dict["pos_embed"], DiTModel.from_preset("dit-tiny").pos_embed)
    assert any("pos_embed" in note for note in imported.notes)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_paper_import_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        import_paper_checkpoint(path)
    assert str(path) in str(e.value) and "a weights-only load refuses" in str(e.value) and "posix.mkdir" in str(e.value)
    assert not marker.exists()


def test_paper_import_rejects_non_dit_state_dicts(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"no tensor 'x_embedder.proj.weight'.*encoder.weight"):
        import_paper_checkpoint(tmp_path / "other.pt")


def test_truncated_pt_file_is_reported_as_such(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(DiTModel.from_preset("dit-tiny").state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable torch file .* may be truncated or corrupted"):
        import_paper_checkpoint(path)
