"""dit-eval: its judge (a classifier on real digits) is accurate, its figures tell real digits from collapsed ones,
and the command runs end to end on a real checkpoint; shipped checkpoints meet the quality bar."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_runtime.checkpoint import CheckpointInfo, load_model, save_checkpoint
from dit_runtime.checkpoint import load_state_dict
from dit_runtime.cli.eval import main as dit_eval, record_in_checkpoint
from dit_runtime.evaluation import (MIN_CLASSIFIER_ACCURACY, MIN_DIVERSITY_RATIO, MIN_SAMPLE_ACCURACY, eval_engine,
                                    evaluate, frechet_distance, gaussian_frechet_distance, mean_pairwise_distance,
                                    real_digit_features, score_samples, train_digit_classifier)
from dit_runtime.model import DiTModel, get_preset
from dit_runtime.train.data import digits_to_model_space, load_digit_scans

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "checkpoints").glob("*.safetensors"))


@pytest.fixture(scope="module")
def classifier():
    return train_digit_classifier(seed=0)


def test_classifier_is_accurate_on_held_out_real_digits(classifier):
    assert classifier.held_out_accuracy >= MIN_CLASSIFIER_ACCURACY
    assert classifier.held_out_accuracy_raw >= MIN_CLASSIFIER_ACCURACY


def test_real_digits_pass_the_bar_and_collapsed_samples_fail_it(classifier):
    images, labels = load_digit_scans()
    pick = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(10)])
    real = digits_to_model_space(images[pick], 16)  # (300, 1, 16, 16), as the model would draw them
    y = torch.as_tensor(labels[pick], dtype=torch.int64)
    real_scored = score_samples(real, y, classifier, source="real", samples_per_class=30, sampling={})
    assert real_scored.accuracy >= MIN_SAMPLE_ACCURACY and real_scored.diversity_ratio > 0.8 and real_scored.passed
    # Mode collapse: every sample of a class is the same (correct) digit -> accurate but no diversity.
    collapsed = torch.cat([real[y == c][:1].repeat(30, 1, 1, 1) for c in range(10)])
    collapsed_scored = score_samples(collapsed, torch.arange(10).repeat_interleave(30), classifier,
                                     source="collapsed", samples_per_class=30, sampling={})
    assert collapsed_scored.diversity == 0.0 and collapsed_scored.diversity_ratio < MIN_DIVERSITY_RATIO
    assert not collapsed_scored.passed
    # Wrong classes: each class's samples are another digit.
    shifted = torch.cat([real[y == (c + 1) % 10] for c in range(10)])
    scored = score_samples(shifted, torch.arange(10).repeat_interleave(30), classifier, source="shifted",
                           samples_per_class=30, sampling={})
    assert scored.accuracy < 0.1 and not scored.passed
    # The Frechet distance compares the sets, not their labels: it cannot see the wrong classes (accuracy does).
    assert scored.frechet_distance == pytest.approx(real_scored.frechet_distance)
    # ... but it sees the collapse, far beyond the real-against-real floor.
    assert collapsed_scored.frechet_distance > 10 * collapsed_scored.real_frechet_distance


def test_gaussian_frechet_distance_matches_the_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Covariances with shared eigenvectors: Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i), so the trace term is
    # sum (sqrt(a_i) - sqrt(b_i))^2.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 4, 5), rng.uniform(0.1, 4, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert gaussian_frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected)
    # Two 2x2 covariances that do not commute: the eigenvalues l1, l2 of S1 S2 give
    # Tr((S1 S2)^(1/2)) = sqrt(l1) + sqrt(l2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    cross = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * cross
    assert gaussian_frechet_distance([0, 0], s1, [1, 0], s2) == pytest.approx(expected)


def test_frechet_distance_of_real_digits_to_themselves_is_zero_and_a_shift_costs_its_square():
    real, _ = real_digit_features()  # (1797, 64); a singular covariance, as every sample set's in this space
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    shift = np.linspace(-1, 1, 64)
    assert frechet_distance(real, real + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # Fewer samples than dimensions still gives a finite figure (rank-deficient covariance).
    assert math.isfinite(frechet_distance(real[:20], real[20:40]))


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert mean_pairwise_distance(np.array([[0.0], [1.0], [3.0]])) == pytest.approx((1 + 3 + 2) / 3)


def test_dit_eval_runs_on_a_small_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    config = get_preset("dit-digits-s")
    model = DiTModel.from_config(config)
    info = CheckpointInfo(config=config, class_names=[str(i) for i in range(10)], space="pixel",
                          training={"default_sampling": {"sampler": "ddim", "num_inference_steps": 3,
                                                         "guidance_scale": 1.5}})
    path = save_checkpoint(tmp_path / "small.safetensors", model.state_dict(), info)
    assert load_model(path)[1].sampling.defaults.sampler == "ddim"
    code = dit_eval([str(path), "--samples-per-class", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["sampling"] == {"sampler": "ddim", "num_inference_steps": 3, "guidance_scale": 1.5, "seed": 0,
                               "cache": "off", "full_steps": 3}
    assert out["samples_per_class"] == 3 and len(out["per_class_accuracy"]) == 10
    assert out["classifier_held_out_accuracy"] >= MIN_CLASSIFIER_ACCURACY
    assert out["real_diversity"] > 0
    assert math.isfinite(out["frechet_distance"]) and out["frechet_distance"] > out["real_frechet_distance"] > 0
    # An untrained model draws noise, not digits: the bar must fail and the exit code must say so.
    assert not out["passed"] and code == 1
    grid = Image.open(out["grid"])
    assert grid.size[1] > grid.size[0] * 10 // 3 - 10  # 10 rows (digits) of 3 columns


def test_dit_eval_record_stores_settings_only_when_the_bar_is_met(tmp_path, capsys):
    config = get_preset("dit-digits-s")
    info = CheckpointInfo(config=config, class_names=[str(i) for i in range(10)], space="pixel")
    path = save_checkpoint(tmp_path / "untrained.safetensors", DiTModel.from_config(config).state_dict(), info)
    before = path.read_bytes()
    assert dit_eval([str(path), "--samples-per-class", "2", "--steps", "2", "--record"]) == 1
    assert path.read_bytes() == before  # failed the bar: nothing recorded


def test_dit_eval_record_stores_the_frechet_distance_beside_accuracy(tmp_path, classifier):
    config = get_preset("dit-digits-s")
    info = CheckpointInfo(config=config, class_names=[str(i) for i in range(10)], space="pixel")
    path = save_checkpoint(tmp_path / "model.safetensors", DiTModel.from_config(config).state_dict(), info)
    images, labels = load_digit_scans()
    result = score_samples(digits_to_model_space(images[:100], 16), torch.as_tensor(labels[:100]), classifier,
                           source=str(path), samples_per_class=10,
                           sampling={"sampler": "ddim", "num_inference_steps": 5, "guidance_scale": 2.0, "seed": 3})
    record_in_checkpoint(path, result)
    recorded = load_state_dict(path)[1].training["eval"]
    assert recorded["frechet_distance"] == result.frechet_distance
    assert recorded["real_frechet_distance"] == result.real_frechet_distance
    assert recorded["accuracy"] == result.accuracy and recorded["seed"] == 3


def test_frechet_distance_of_the_shipped_model_falls_with_steps_and_stays_above_the_real_floor(classifier):
    """Five samples per digit from the small shipped model, as dit-eval draws them: one DPM-Solver++ step lands
    far from the real digits, four come much closer, and still stay above what real digits score."""
    model, info = load_model(REPO / "checkpoints" / "digits-s.safetensors")
    # One forward pass per step for all 50 images (small batches cost many times more on a CPU); no warm-up.
    engine = eval_engine(model, info, samples_per_class=5, batch_size=50, warmup=False)
    runs = {steps: evaluate(engine, classifier, source="digits-s", samples_per_class=5,
                            sampling=replace(info.sampling.defaults, sampler="dpm-solver++", seed=0,
                                             num_inference_steps=steps))[0]
            for steps in (1, 4)}
    one, four = runs[1], runs[4]
    assert one.real_frechet_distance == four.real_frechet_distance  # the floor depends on the sample count only
    assert math.isfinite(four.frechet_distance)
    assert one.frechet_distance > 3 * four.frechet_distance
    assert four.frechet_distance > four.real_frechet_distance


def test_dit_eval_table_shows_the_frechet_distance_and_its_floor(tmp_path, capsys):
    config = get_preset("dit-digits-s")
    info = CheckpointInfo(config=config, class_names=[str(i) for i in range(10)], space="pixel")
    path = save_checkpoint(tmp_path / "untrained.safetensors", DiTModel.from_config(config).state_dict(), info)
    dit_eval([str(path), "--samples-per-class", "2", "--steps", "1", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "Frechet distance to 898 real digits" in out and "real against real" in out


def test_dit_eval_rejects_a_non_digit_checkpoint(tmp_path, capsys):
    config = get_preset("dit-tiny")
    path = save_checkpoint(tmp_path / "tiny.safetensors", DiTModel.from_config(config).state_dict(),
                           CheckpointInfo(config=config, class_names=[str(i) for i in range(10)]))
    assert dit_eval([str(path), "--samples-per-class", "2"]) == 2
    assert "dit-eval measures digit models" in capsys.readouterr().err


def test_dit_eval_refuses_fp8_options_without_fp8(capsys):
    for flag in ("--fp8-blocks", "--no-fp8-blocks"):
        assert dit_eval([str(SHIPPED[0]), flag]) == 2
        assert "--fp8-blocks and --fp8-min-rows apply to --precision fp8 only (given: fp32)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_meets_the_bar_at_its_default_sampling(path, classifier):
    model, info = load_model(path)
    assert path.stat().st_size < 20 * 2**20
    result, _ = evaluate(eval_engine(model, info, samples_per_class=10), classifier, source=str(path),
                         samples_per_class=10, sampling=replace(info.sampling.defaults, seed=1))
    assert result.accuracy >= MIN_SAMPLE_ACCURACY, result.per_class_accuracy
    assert result.diversity_ratio >= MIN_DIVERSITY_RATIO
