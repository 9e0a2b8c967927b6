"""``dit-verify``: exact counts from the module, FLOPs and activation memory checked against torch's own tallies."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_runtime.cli.verify import main as verify
from dit_runtime.model import PRESETS, DiTConfig, DiTModel, get_preset
from dit_runtime.sizing import activation_bytes_per_token_layer, forward_flops


def run_json(capsys, *args: str) -> dict:
    verify(["--json", *args])
    return {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}


def meta_model(config: DiTConfig) -> DiTModel:
    with torch.device("meta"):
        return DiTModel(**config.to_dict())


def test_json_lists_every_preset_with_the_modules_exact_parameter_count(capsys):
    models = run_json(capsys)
    assert list(models) == list(PRESETS)
    for name, config in PRESETS.items():
        module = meta_model(config)
        report = models[name]
        assert report["parameters"] == sum(p.numel() for p in module.parameters()), name
        b = report["breakdown"]
        assert b["embeddings"] + config.num_layers * b["per_block"] + b["final_layer"] == report["parameters"]
        weights = report["weight_bytes"]
        assert {k: weights[k] for k in ("fp32", "fp16", "bf16")} == {"fp32": 4 * report["parameters"],
                                                                    "fp16": 2 * report["parameters"],
                                                                    "bf16": 2 * report["parameters"]}
        # fp8: the blocks' attention and MLP weights (4d^2 + 2d*ffn per block) at one byte plus an fp32 scale per
        # output row (qkv 3d, proj d, fc1 ffn, fc2 d; fc2 one per 128x128 tile where both widths are multiples of
        # 128, the block-scaled MLP), and every weight in bf16 (the blocks' too: forwards below fp8_min_rows run
        # them; fp8_only: without that copy).
        d, f, L = config.hidden_dim, config.ffn_dim, config.num_layers
        fp8_params = L * (4 * d * d + 2 * d * f)
        fc2_scales = (d // 128) * (f // 128) if d % 128 == 0 and f % 128 == 0 else d
        scales = 4 * L * (4 * d + f + fc2_scales)
        assert weights["fp8"] == fp8_params + scales + 2 * report["parameters"]
        assert weights["fp8_only"] == fp8_params + scales + 2 * (report["parameters"] - fp8_params)
        # A cached row: two Taylor terms of the blocks' residual (tokens x width, 16-bit) and its last full step.
        assert report["feature_cache_bytes_per_row"] == 2 * config.num_tokens * d * 2 + 8


def test_true_sizes_of_our_presets_and_the_old_cards_errors(capsys):
    models = run_json(capsys, "dit-10l", "dit-8l", "dit-6l", "dit-legacy-30l", "DiT-XL/2")
    millions = {name: m["parameters"] / 1e6 for name, m in models.items()}
    assert 193 < millions["dit-10l"] < 194 and 155 < millions["dit-8l"] < 156 and 117 < millions["dit-6l"] < 118.5
    assert 223 < millions["dit-legacy-30l"] < 224  # the largest of the four, not the smallest
    for name, claim in {"dit-10l": 390e6, "dit-8l": 320e6, "dit-6l": 250e6, "dit-legacy-30l": 150e6}.items():
        assert models[name]["model_card_claim"] == claim
        assert abs(models[name]["parameters"] - claim) / claim > 0.3
    # The paper (Table 1): DiT-XL/2 has 675M parameters (its frozen pos_embed included) and 118.6 "Gflops".
    xl = models["DiT-XL/2"]
    assert abs(xl["parameters"] + xl["breakdown"]["pos_embed_buffer"] - 675e6) < 0.5e6
    assert abs(xl["flops_per_image"]["macs"] / 1e9 - 118.6) < 0.1


@pytest.mark.parametrize("name", ["dit-10l", "dit-legacy-30l", "DiT-XL/2", "DiT-S/8", "dit-digits-s", "dit-tiny"])
def test_flop_formula_equals_torchs_flop_counter(name):
    config = get_preset(name)
    model = meta_model(config)
    with torch.device("meta"):
        x = torch.empty(1, config.in_channels, config.input_size, config.input_size)
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.int64)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, y)
    assert forward_flops(config)["total"] == counter.get_total_flops()


def test_activation_model_matches_what_autograd_saves_under_bf16_autocast():
    """Sum the distinct storages one block saves for backward (minus the bf16 weight copies autocast makes, which
    the estimate counts once per model) and compare with the per-token formula; the formula leaves out per-token
    scalars (LayerNorm statistics, log-sum-exp: ~1% here), and any missed tensor would cost >= 2d (~4%)."""
    config = DiTConfig(hidden_dim=48, num_layers=1, num_heads=3, ffn_dim=160, input_size=16, patch_size=2,
                       in_channels=4, num_classes=10)
    block = DiTModel.from_config(config).blocks[0]
    batch = 3
    x = torch.randn(batch, config.num_tokens, config.hidden_dim, requires_grad=True)
    c = torch.randn(batch, config.hidden_dim)
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, c)
    weight_shapes = {s for p in block.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}  # W or W.T
    tokens = batch * config.num_tokens
    measured = sum(t.untyped_storage().nbytes() for t in saved.values()
                   if not (t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes))
    expected = activation_bytes_per_token_layer(config) * tokens
    assert expected <= measured <= 1.03 * expected, \
        f"measured {measured / tokens:.0f} B/token, model {expected / tokens}"
    assert len(saved) > 10  # the hook saw the block's tensors


def test_checkpointing_lowers_the_estimate_and_memory_grows_with_batch(capsys):
    small = run_json(capsys, "dit-10l", "--batch-size", "8")["dit-10l"]["training_memory"]
    large = run_json(capsys, "dit-10l", "--batch-size", "64")["dit-10l"]["training_memory"]
    assert large["with_checkpointing"]["peak"] < large["without_checkpointing"]["peak"]
    assert small["without_checkpointing"]["peak"] < large["without_checkpointing"]["peak"]
    params = 193_384_480
    assert large["without_checkpointing"]["weights"] == 4 * params
    assert large["without_checkpointing"]["adamw_states"] == 8 * params


def test_config_file_and_explicit_dimensions(tmp_path, capsys):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("model:\n  preset: dit-10l\n  num_layers: 12\n")
    models = run_json(capsys, "--config", str(config_file))
    expected = DiTConfig(**{**get_preset("dit-10l").to_dict(), "num_layers": 12})
    assert models["mine"]["config"] == expected.to_dict()
    assert models["mine"]["parameters"] == sum(p.numel() for p in meta_model(expected).parameters())
    models = run_json(capsys, "--hidden-dim", "768", "--num-layers", "12", "--num-heads", "12", "--ffn-dim", "3072")
    assert models["custom"]["parameters"] == run_json(capsys, "DiT-B/2")["DiT-B/2"]["parameters"]


def test_table_shows_every_preset_and_says_the_card_was_wrong(capsys):
    verify([])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "old model card's figures were wrong" in out and "card said 390.0M, true count 193.4M" in out


def test_bad_input_is_named(capsys):
    with pytest.raises(SystemExit):
        verify(["dit-11l"])
    assert "unknown model preset 'dit-11l'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        verify(["dit-10l", "--num-heads", "7"])
    assert "hidden_dim (1024) must be divisible by num_heads (7)" in capsys.readouterr().err
