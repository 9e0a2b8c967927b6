"""``dit-convert`` end to end: foreign layouts in, a checkpoint that loads and computes the same function out."""

from __future__ import annotations

import pytest
import torch

from model_helpers import randomize
from dit_runtime.checkpoint import load_model
from dit_runtime.cli.convert import main as convert
from dit_runtime.model import DiTConfig, DiTModel

PAPER_STYLE = DiTConfig(hidden_dim=64, num_layers=2, num_heads=4, ffn_dim=256, input_size=8, patch_size=2,
                        in_channels=4, num_classes=1000)


def inputs(num_classes: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0, 321, 999]),
            torch.tensor([0, num_classes - 1, num_classes]))  # the last label is the null class


@torch.no_grad()
def test_paper_pt_converts_to_a_checkpoint_with_the_same_outputs(tmp_path, capsys):
    original = randomize(DiTModel.from_config(PAPER_STYLE)).eval()
    torch.save(original.state_dict(), tmp_path / "DiT-test.pt")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"species {i}" for i in range(1000)))
    out = tmp_path / "converted.safetensors"
    convert([str(tmp_path / "DiT-test.pt"), str(out), "--num-heads", "4", "--class-names", str(names)])
    assert "wrote" in capsys.readouterr().out

    model, info = load_model(out)
    assert info.config == PAPER_STYLE and info.space == "latent" and info.class_id("Species 7") == 7
    x, t, y = inputs(1000)
    assert torch.equal(model(x, t, y), original(x, t, y))  # same weights, same code: bit for bit


@torch.no_grad()
def test_diffusers_folder_converts_to_the_papers_function(tmp_path):
    pytest.importorskip("diffusers")
    from test_model import make_diffusers_dit, use_paper_timestep_frequencies

    theirs = make_diffusers_dit()
    theirs.save_pretrained(tmp_path / "transformer")
    out = tmp_path / "converted.safetensors"
    convert([str(tmp_path / "transformer"), str(out)])
    model, info = load_model(out)
    assert "timestep frequencies" in " ".join(info.training["notes"])
    use_paper_timestep_frequencies(theirs)
    x, t, y = inputs(10)
    expected = theirs(x, t, y).sample
    assert ((model(x, t, y) - expected).norm() / expected.norm()).item() < 1e-5  # fp32 rounding only


def test_convert_errors_name_the_input_and_write_nothing(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    out = tmp_path / "never.safetensors"
    with pytest.raises(SystemExit) as e:
        convert([str(tmp_path / "other.pt"), str(out)])
    assert str(e.value).startswith(f"dit-convert: {tmp_path / 'other.pt'}") and not out.exists()
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(SystemExit, match="config.json is missing"):
        convert([str(tmp_path / "empty_folder"), str(out)])
