"""Two CPU processes under torchrun (gloo) train through the same code path as one: a checkpoint is written
and both ranks end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dit_runtime.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]

# Runs under torchrun: trains through the public Trainer, then every rank writes its own final raw weights.
WORKER = """
import sys, torch.distributed as dist
from safetensors.torch import save_file
from dit_runtime.train.config import load_config
from dit_runtime.train.trainer import Trainer

out = sys.argv[1]
config = load_config(sys.argv[2], [
    ("model.hidden_dim", "32"), ("model.num_layers", "1"), ("model.num_heads", "2"), ("model.ffn_dim", "64"),
    ("trainer.per_device_train_batch_size", "8"), ("trainer.gradient_accumulation_steps", "2"),
    ("trainer.max_steps", "6"), ("trainer.warmup_steps", "0"), ("trainer.log_every", "2"),
    ("trainer.learning_rate", "0.001"), ("checkpointing.save_every", "3"), ("checkpointing.output_dir", out)])
trainer = Trainer(config, command=["dit-train", "(ddp test)"])
trainer.run()
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
          f"{out}/rank{trainer.dist.rank}.safetensors")
# One write of one line: the two ranks share the pipe, and print's separate writes of each piece interleave.
sys.stdout.write(f"world {trainer.dist.world_size} global_batch {trainer.global_batch}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


def test_two_process_gloo_run_writes_checkpoint_and_ranks_agree(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path), str(REPO / "train_config/digits-s.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("world 2 global_batch 32") == 2
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Training changed the weights (zero-initialised output layer is no longer zero).
    assert rank0["final_layer.linear.weight"].abs().sum() > 0
    model, info = load_model(tmp_path / "model.safetensors")
    assert info.training["steps"] == 6 and info.training["hardware"].startswith("2 x ")
    assert info.training["samples_seen"] == 6 * 32
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000003.safetensors", "step-00000003.state.safetensors",
        "step-00000006.safetensors", "step-00000006.state.safetensors"]
    # Both ranks' RNG states are in the training state, for resume.
    state = load_file(tmp_path / "checkpoints" / "step-00000006.state.safetensors")
    assert {"rng.cpu.0", "rng.cpu.1"} <= state.keys()
    assert not torch.equal(state["rng.cpu.0"], state["rng.cpu.1"])
