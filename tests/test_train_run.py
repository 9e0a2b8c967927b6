"""A real dit-train run on a tiny digit model: it writes servable checkpoints, survives a SIGKILL in the middle of a
save with the previous checkpoint intact, and a resumed run follows the uninterrupted run's loss curve exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dit_runtime.checkpoint import load_model, load_state_dict, sha256_of
from dit_runtime.evaluation import eval_engine, sample_images
from dit_runtime.request import SamplingParams
from dit_runtime.train.trainer import checkpoint_paths

REPO = Path(__file__).resolve().parents[1]
# A digit model small enough to train 30 steps in a few seconds on one core.
TINY = ["--model.hidden_dim", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.ffn_dim", "64",
        "--trainer.per_device_train_batch_size", "16", "--trainer.learning_rate", "1e-3",
        "--trainer.warmup_steps", "5", "--trainer.lr_schedule", "cosine", "--trainer.ema_decay", "0.9",
        "--trainer.log_every", "1", "--trainer.seed", "7", "--checkpointing.save_every", "10",
        "--checkpointing.keep_last", "5"]
STEPS = 30


# Trains like dit-train, through the public Trainer, with a hook at the save of step 20: once the state file is
# written under its temporary name, touch "<tmp>.paused" and wait, so the test can SIGKILL the process right there.
PAUSING_WORKER = """
import sys, time
from pathlib import Path
from dit_runtime.train.cli import parse_args
from dit_runtime.train.config import load_config
from dit_runtime.train.trainer import Trainer

def pause(step, tmp):
    if step == 20:
        Path(f"{tmp}.paused").touch()
        time.sleep(120)

args, overrides = parse_args(sys.argv[1:])
Trainer(load_config(args.config, overrides), before_state_rename=pause).run()
"""


def train_args(output_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "train_config/digits-s.yaml"), *TINY, "--trainer.max_steps", str(STEPS),
            "--checkpointing.output_dir", str(output_dir), *extra]


def dit_train(output_dir: Path, *extra: str):
    proc = subprocess.run([sys.executable, "-m", "dit_runtime.train.cli", *train_args(output_dir, *extra)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (output_dir / "train_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = dit_train(out)
    assert "samples/s" in proc.stderr and "ETA" in proc.stderr  # the progress bar
    return out


def test_run_writes_servable_checkpoint_with_training_record(uninterrupted: Path):
    model, info = load_model(uninterrupted / "model.safetensors")
    assert info.class_names == [str(i) for i in range(10)]
    assert info.space == "pixel" and info.weights == "ema"
    record = info.training
    assert record["steps"] == STEPS and record["seed"] == 7
    assert record["command"].startswith("dit-train --config")
    assert record["config"]["trainer"]["max_steps"] == STEPS
    assert record["hardware"] and record["wall_time_s"] > 0
    assert record["final_loss"] == pytest.approx(losses(uninterrupted)[STEPS])
    # The sampling contract: the schedule trained on and the settings the config recommends.
    assert info.sampling.num_train_timesteps == 1000 and info.sampling.prediction == "epsilon"
    assert info.sampling.defaults.sampler == "dpm-solver++" and info.sampling.guidance == "null-row"
    # Training made progress: the loss falls from its start (noise prediction starts at ~1).
    curve = losses(uninterrupted)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert sum(curve[s] for s in range(26, 31)) < sum(curve[s] for s in range(1, 6))
    # The served set is the EMA, not the raw weights.
    served, _ = load_state_dict(uninterrupted / "model.safetensors")
    with safe_open(str(checkpoint_paths(uninterrupted, STEPS)[1]), framework="pt") as f:
        raw = {k[len("raw."):]: f.get_tensor(k) for k in f.keys() if k.startswith("raw.")}
    assert raw.keys() == served.keys()
    assert not torch.equal(raw["blocks.0.attn.qkv.weight"], served["blocks.0.attn.qkv.weight"])
    png = uninterrupted / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # dit-sample serves the checkpoint as written: a 2 x 2 grid of two classes.
    grid = uninterrupted / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "dit_runtime.cli.sample", str(uninterrupted / "model.safetensors"),
                           "--classes", "3", "8", "-n", "2", "--steps", "4", "--guidance", "2", "--grid", str(grid),
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # And the engine serves it: every digit, two images each.
    x = sample_images(eval_engine(model, info, samples_per_class=2), 2, SamplingParams(num_inference_steps=4, seed=0))
    assert x.shape == (20, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1.0


def test_kill_mid_save_keeps_previous_checkpoint_and_resume_matches_uninterrupted(uninterrupted: Path, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_WORKER, *train_args(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob(".*.paused")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached the save of step 20"
            time.sleep(0.05)
        step10 = checkpoint_paths(out, 10)
        digests = [sha256_of(p) for p in step10]
        os.kill(proc.pid, signal.SIGKILL)  # between writing step 20's state file and renaming it into place
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The half-done save left only a temporary file; the step-10 checkpoint is untouched and loads.
    servable20, state20 = checkpoint_paths(out, 20)
    assert not state20.exists() and not servable20.exists()
    assert list((out / "checkpoints").glob(".step-00000020.state.safetensors.tmp-*"))
    assert [sha256_of(p) for p in step10] == digests
    model, info = load_model(step10[0])
    assert info.training["steps"] == 10
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()

    dit_train(out, "--resume")
    resumed, reference = losses(out), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # records past step 10 from the killed run are gone
    # Same seed, fp32 on the CPU: weights, AdamW, scheduler, data position and RNG all restored -> identical curve.
    assert [resumed[s] for s in range(11, STEPS + 1)] == [reference[s] for s in range(11, STEPS + 1)]
    final, _ = load_state_dict(out / "model.safetensors")
    expected, _ = load_state_dict(uninterrupted / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert load_model(out / "model.safetensors")[1].training["steps"] == STEPS


def test_resume_without_checkpoint_starts_from_step_zero(tmp_path):
    proc = dit_train(tmp_path / "fresh", "--resume", "--trainer.max_steps", "2")
    assert "no checkpoint" in proc.stderr
    assert load_model(tmp_path / "fresh" / "model.safetensors")[1].training["steps"] == 2
