"""Training data: the built-in digits, an image folder, a latent file encoded by a real (tiny, local) diffusers
VAE and trained on, and the per-rank sharding that makes the data position resumable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_runtime.checkpoint import LATENT_SCALE, load_model
from dit_runtime.train.data import ShardedBatches, load_digits, load_image_folder, load_latents

REPO = Path(__file__).resolve().parents[1]


def test_digits_are_all_1797_scans_upsampled_into_minus_one_one():
    data = load_digits(16)
    assert data.x.shape == (1797, 1, 16, 16) and data.y.shape == (1797,)
    assert data.x.min() >= -1 and data.x.max() <= 1 and data.x.min() == -1
    assert sorted(set(data.y.tolist())) == list(range(10)) and data.class_names == [str(i) for i in range(10)]


def test_shards_are_disjoint_equal_and_resume_where_they_left_off():
    ranks = [ShardedBatches(103, 10, r, 2, seed=3) for r in range(2)]
    epoch0 = [torch.cat([b.next() for _ in range(b.batches_per_epoch)]) for b in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 50
    assert not set(epoch0[0].tolist()) & set(epoch0[1].tolist())
    first = ranks[0].next()  # epoch 1 starts with a new order
    assert ranks[0].epoch == 1 and not torch.equal(first, epoch0[0][:10])
    saved = ranks[0].state()
    expected = [ranks[0].next() for _ in range(7)]  # runs into epoch 2
    resumed = ShardedBatches(103, 10, 0, 2, seed=3)
    resumed.load_state(saved)
    assert all(torch.equal(a, resumed.next()) for a in expected)


def make_folder(root: Path, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 5)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            h, w = size + 4 * i, size  # differing aspect ratios exercise resize + centre-crop
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_resizes_and_crops_each_class(tmp_path):
    data = load_image_folder(make_folder(tmp_path / "imgs"), image_size=16, channels=3)
    assert data.x.shape == (8, 3, 16, 16) and data.class_names == ["cat", "dog"]
    assert data.y.tolist() == [0] * 3 + [1] * 5
    assert data.x.min() >= -1 and data.x.max() <= 1


def test_encode_latents_with_local_vae_then_train_on_them(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    images = make_folder(tmp_path / "imgs")
    out = tmp_path / "latents.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dit_runtime.train.encode_latents", "--images", str(images),
                           "--vae", str(tmp_path / "vae"), "--out", str(out), "--image-size", "16",
                           "--batch-size", "3", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = load_latents(out)
    assert data.x.shape == (8, 4, 8, 8) and data.space == "latent" and data.class_names == ["cat", "dog"]
    with torch.no_grad():  # the file holds the VAE's posterior means times LATENT_SCALE
        first = load_image_folder(images, 16, 3).x[:1]
        assert torch.allclose(data.x[:1], vae.encode(first).latent_dist.mean * LATENT_SCALE, atol=1e-5)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dit_runtime.train.cli", "--model.preset", "dit-tiny",
                           "--data.kind", "latents", "--data.path", str(out), "--trainer.max_steps", "3",
                           "--trainer.per_device_train_batch_size", "4", "--checkpointing.output_dir", str(run)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, info = load_model(run / "model.safetensors")
    assert info.space == "latent" and info.class_names == ["cat", "dog"] and info.config.num_classes == 2
    assert info.config.learn_sigma  # dit-tiny learns sigma: the vb term was trained too
