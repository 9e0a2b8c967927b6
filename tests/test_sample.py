"""``dit-sample`` and the image helpers: real checkpoints in, PNG files out."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from dit_runtime.cli.sample import main as sample
from dit_runtime import images
from dit_runtime.images import PARALLEL_DEFLATE_BYTES, encode_png, make_grid, save_grid, to_uint8


def test_to_uint8_maps_the_model_range_to_bytes_channels_last():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0, -7.0]).view(1, 1, 2, 3).expand(2, 3, 2, 3)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3, 3)
    assert out[0, :, :, 0].flatten().tolist() == [0, 64, 128, 255, 255, 0]  # clipped outside [-1, 1]
    assert to_uint8(x[0]).shape == (2, 3, 3)


def test_grid_places_image_k_at_row_k_div_cols(tmp_path):
    images = np.stack([np.full((4, 5, 1), 10 * k, dtype=np.uint8) for k in range(5)])
    grid = make_grid(images, ncols=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 6 + 1, 1)
    assert grid[1 + 5, 1 + 6, 0] == 30  # image 3: row 1, column 1 (its top-left pixel)
    path = save_grid(images, tmp_path / "g.png", ncols=2, upscale=3)
    assert Image.open(path).size == (3 * (2 * 7 + 2), 3 * (3 * 6 + 2))  # default padding 2, then x3


def run(checkpoint, tmp_path, *args: str) -> list[np.ndarray]:
    out = tmp_path / "out"
    sample([str(checkpoint), "--out", str(out), "--steps", "4", "--device", "cpu", *args])
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (32, 32), (64, 48)])
def test_png_writer_round_trips_exactly_through_pillow(channels, mode, shape):
    rng = np.random.default_rng(channels * 100 + shape[0])
    noise = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    ramp = (np.arange(shape[0] * shape[1] * channels) % 256).astype(np.uint8).reshape(*shape, channels)
    for image in (noise, ramp, 255 - ramp):  # the Up filter wraps below zero on the last two
        decoded = Image.open(io.BytesIO(encode_png(image)))
        assert decoded.mode == mode and decoded.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(decoded).reshape(image.shape), image)


@pytest.mark.parametrize("threads", [1, 3, None])
def test_png_writer_deflates_large_images_in_slices_that_read_back_as_one(threads):
    """From PARALLEL_DEFLATE_BYTES on, slices of the image are deflated on several threads and joined into one
    zlib stream; Pillow must read back every pixel, whatever the number of slices."""
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (257, 259, 3), dtype=np.uint8)  # 199 KB filtered: over the threshold
    smooth = (np.add.outer(np.arange(257), np.arange(259 * 3)) // 5 % 256).astype(np.uint8).reshape(257, 259, 3)
    assert noise.size + 257 >= PARALLEL_DEFLATE_BYTES
    with ThreadPoolExecutor(2) as pool:  # the caller's pool (a server's), or none: the call's own when threads > 1
        for image in (noise, smooth):
            for given in (None, pool):
                decoded = Image.open(io.BytesIO(encode_png(image, threads=threads, pool=given)))
                np.testing.assert_array_equal(np.asarray(decoded), image)


@pytest.mark.parametrize("cpus", [1, 3, 16, 128])
def test_a_server_encodes_on_its_cpus_up_to_the_measured_cap(monkeypatch, cpus):
    monkeypatch.setattr(images.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert images.usable_cpus() == cpus
    assert images.encode_threads() == min(cpus, images.MAX_ENCODE_THREADS)
    assert images.deflate_threads() == min(cpus, images.MAX_ENCODE_THREADS, images.MAX_DEFLATE_SLICES)


def test_png_writer_takes_strided_views_and_refuses_what_is_not_an_image():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    view = image[::2, ::3]  # not contiguous
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(view)))), view)
    for bad in (image.astype(np.float32), image[..., 0], np.zeros((4, 4, 5), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match="uint8|pixel"):
            encode_png(bad)


def test_writes_one_png_per_image_with_class_names(pixel_checkpoint, tmp_path, capsys):
    images = run(pixel_checkpoint, tmp_path, "--classes", "seven", "2", "-n", "3")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names[:3] == ["0000_7_seven.png", "0001_7_seven.png", "0002_7_seven.png"] and len(names) == 6
    assert all(im.shape == (16, 16) and im.dtype == np.uint8 for im in images)  # grey pixel-space images
    assert len({im.tobytes() for im in images}) == 6  # every image has its own noise
    captured = capsys.readouterr()
    assert "denoising: 24/24 image-steps" in captured.err and "6 images (16x16) of 2 classes" in captured.out


def test_same_seed_same_images_whatever_the_batch_size(pixel_checkpoint, tmp_path):
    """Image k's noise depends only on (seed, k), so splitting the run into batches changes nothing but rounding:
    matrix products of other shapes may be summed in another order, which can move a pixel across a rounding
    boundary, by one grey level at most."""
    one_batch = run(pixel_checkpoint, tmp_path / "a", "--classes", "1", "4", "-n", "2", "--seed", "3")
    batches_of_one = run(pixel_checkpoint, tmp_path / "b", "--classes", "1", "4", "-n", "2", "--seed", "3",
                         "--batch-size", "1")
    other_seed = run(pixel_checkpoint, tmp_path / "c", "--classes", "1", "4", "-n", "2", "--seed", "4")
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(one_batch, batches_of_one))
    assert all(np.abs(a.astype(int) - c).max() > 1 for a, c in zip(one_batch, other_seed))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_grid_for_each_sampler(pixel_checkpoint, tmp_path, sampler):
    grid = tmp_path / "grid.png"
    sample([str(pixel_checkpoint), "--grid", str(grid), "--steps", "3", "--sampler", sampler, "--classes", "0", "1",
            "-n", "2", "--guidance", "1.5"])
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)  # one row per class, 2-pixel padding


def test_latent_checkpoint_without_vae_says_what_is_missing(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tiny_checkpoint, tmp_path)
    message = str(e.value)
    assert str(tiny_checkpoint) in message and "--vae" in message and "AutoencoderKL" in message


def test_latent_checkpoint_decodes_through_a_local_diffusers_vae(tiny_checkpoint, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    images = run(tiny_checkpoint, tmp_path, "--vae", str(tmp_path / "vae"), "--classes", "class_3", "-n", "2")
    assert [im.shape for im in images] == [(16, 16, 3)] * 2  # 8x8 latents, one 2x upsampling: RGB 16x16


def test_unknown_class_and_bad_counts_are_named(pixel_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(pixel_checkpoint, tmp_path, "--classes", "eleven")
    assert "unknown class 'eleven'; this model knows 'zero'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(pixel_checkpoint, tmp_path, "--steps", "0")
    assert "num_inference_steps must be an integer in [1, 1000], got 0" in capsys.readouterr().err
