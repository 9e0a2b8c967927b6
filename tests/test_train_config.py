"""The training config: committed YAML files load, and every mistake is an error that names the key and what it
accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dit_runtime.model import get_preset
from dit_runtime.train.cli import main as dit_train
from dit_runtime.train.config import ConfigError, DistillConfig, TrainConfig, describe, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_committed_configs_load_and_validate(path):
    """Every config in train_config/ loads as what it is: a dit-distill config has a `distill` section."""
    config_type = DistillConfig if "distill" in yaml.safe_load(path.read_text()) else TrainConfig
    config = load_config(path, config_type=config_type)
    assert config.trainer.max_steps > 0 or config.trainer.epochs > 0


def test_recommended_dit10l_config_follows_the_model_card():
    config = load_config(REPO / "train_config/dit_config.yaml")
    t = config.trainer
    assert config.model.preset == "dit-10l" and config.data.kind == "latents"
    assert 8 <= t.per_device_train_batch_size <= 16 and 2 <= t.gradient_accumulation_steps <= 4
    assert t.bf16 and t.gradient_checkpointing
    assert load_config(REPO / "train_config/dit8l_config.yaml").model.preset == "dit-8l"


def test_overrides_are_typed_and_applied_in_order():
    config = load_config(REPO / "train_config/digits-s.yaml",
                         [("trainer.max_steps", "40"), ("trainer.bf16", "true"), ("trainer.learning_rate", "3e-4"),
                          ("model.hidden_dim", "64"), ("trainer.max_steps", "41"),
                          ("checkpointing.class_names", "[a, b, c, d, e, f, g, h, i, j]")])
    assert config.trainer.max_steps == 41 and config.trainer.bf16 is True
    assert config.trainer.learning_rate == pytest.approx(3e-4)
    dit = config.model.to_dit_config(num_classes=10)
    assert dit.hidden_dim == 64 and dit.num_layers == get_preset("dit-digits-s").num_layers
    assert config.checkpointing.class_names[0] == "a"


@pytest.mark.parametrize("key, value, expected", [
    ("trainer.max_step", "40", ["trainer.max_step", "max_steps", "per_device_train_batch_size"]),
    ("optimizer.lr", "1", ["optimizer.lr", "model, data, diffusion, trainer, checkpointing"]),
    ("trainer.bf16", "maybe", ["trainer.bf16", "true or false"]),
    ("trainer.per_device_train_batch_size", "0", ["trainer.per_device_train_batch_size", "[1, inf]"]),
    ("trainer.per_device_train_batch_size", "8.5", ["trainer.per_device_train_batch_size", "an integer"]),
    ("trainer.ema_decay", "1.0", ["trainer.ema_decay", "[0, 1)"]),
    ("data.kind", "mnist", ["data.kind", "'digits'", "'image_folder'", "'latents'"]),
    ("diffusion.sampler", "euler", ["diffusion.sampler", "'dpm-solver++'"]),
    ("diffusion.guidance_scale", "0.5", ["diffusion.guidance_scale", "[1, 20]"]),
    ("model.preset", "dit-huge", ["model.preset", "dit-10l", "dit-digits-s"]),
    ("model.num_heads", "5", ["hidden_dim (96) must be divisible by num_heads (5)"]),
])
def test_bad_override_names_the_key_and_the_allowed_values(key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "train_config/digits-s.yaml", [(key, value)])
    for text in expected:
        assert text in str(e.value)


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_steps: 10\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trainer.learning_rat'; trainer has: .*"
                                          r"learning_rate"):
        load_config(path)


def test_neither_steps_nor_epochs_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_steps .* or trainer.epochs"):
        load_config(None, [("trainer.max_steps", "0"), ("trainer.epochs", "0")])


def test_data_path_required_for_folder_and_latent_data():
    with pytest.raises(ConfigError, match="data.path must name the latent file"):
        load_config(None, [("trainer.max_steps", "1"), ("data.kind", "latents"), ("model.preset", "dit-tiny")])


def test_cli_reports_config_errors_without_training(capsys, tmp_path):
    code = dit_train(["--config", str(REPO / "train_config/digits-s.yaml"), "--trainer.warmup", "5",
                      "--checkpointing.output_dir", str(tmp_path / "never")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.warmup'" in err and "warmup_steps" in err
    assert not (tmp_path / "never").exists()
    assert dit_train(["--config", str(REPO / "train_config/digits-s.yaml"), "stray"]) == 2
    assert "--section.key value" in capsys.readouterr().err


def test_help_config_lists_every_section():
    text = describe()
    for section in ("model:", "data:", "diffusion:", "trainer:", "checkpointing:"):
        assert section in text
    assert "ema_decay: 0.9999" in text
