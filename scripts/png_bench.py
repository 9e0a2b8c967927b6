"""PNG encoding: dit_runtime.images.encode_png against Pillow (compress level 1, what the server used before), on the
images a server returns: the 4-channel latent view of a random-weight 32x32x4 model (noise) and crops of the shipped
digits sample grid (real outputs), 32x32 to 256x256, and a 256x256 photograph (scikit-learn's sample image, from the
test extra). Each encoder is timed warm, alternating, median of 7 rounds. ``default_strategy`` is our encoder with
zlib's default deflate strategy instead of ``Z_RLE`` (what ``encode_png`` used before), same level;
``ours_one_thread`` deflates large images on one thread, as ``encode_png`` did before session 7 (from 128 KB of
filtered data it now deflates slices on up to 4 threads at once).

    .venv/bin/python scripts/png_bench.py
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dit_runtime import images as png  # noqa: E402
from dit_runtime.images import encode_png  # noqa: E402


def default_strategy(image: np.ndarray) -> bytes:
    """encode_png with zlib.compress's default strategy in place of Z_RLE, on one thread."""
    saved = png.zlib.Z_RLE
    png.zlib.Z_RLE = png.zlib.Z_DEFAULT_STRATEGY
    try:
        return encode_png(image, threads=1)
    finally:
        png.zlib.Z_RLE = saved


def one_thread(image: np.ndarray) -> bytes:
    """encode_png deflating on one thread (what it did for every size before session 7)."""
    return encode_png(image, threads=1)


def pillow(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def timed(fn, image, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(image)
    return (time.perf_counter() - start) / n


def main() -> None:
    rng = np.random.default_rng(0)
    latent = np.clip(rng.standard_normal((32, 32, 4)), -1, 1)
    grid = np.asarray(Image.open(ROOT / "checkpoints" / "digits-m-samples.png").convert("RGB"))
    cases = {"latent view 32x32x4 (noise)": np.round((latent + 1) * 127.5).astype(np.uint8),
             "digits 32x32x3": grid[:32, :32], "digits 128x128x3": grid[:128, :128],
             "digits 256x256x3": grid[:256, :256]}
    try:
        from sklearn.datasets import load_sample_image
        cases["photo 256x256x3"] = np.ascontiguousarray(load_sample_image("flower.jpg")[100:356, 100:356])
    except ImportError:
        pass
    for name, image in cases.items():
        assert (np.asarray(Image.open(io.BytesIO(encode_png(image)))) == image).all()
        n = max(20, int(2e6 // image.size))
        encoders = {"ours": encode_png, "ours_one_thread": one_thread, "default_strategy": default_strategy,
                    "pillow": pillow}
        rounds = {k: [] for k in encoders}
        for _ in range(7):
            for k, fn in encoders.items():
                rounds[k].append(timed(fn, image, n))
        us = {k: statistics.median(v) * 1e6 for k, v in rounds.items()}
        print(json.dumps({"image": name, **{f"{k}_us": round(v, 1) for k, v in us.items()},
                          "speedup_vs_pillow": round(us["pillow"] / us["ours"], 2),
                          **{f"{k}_bytes": len(fn(image)) for k, fn in encoders.items()}}))


if __name__ == "__main__":
    main()
