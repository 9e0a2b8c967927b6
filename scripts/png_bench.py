"""PNG encoding: dit_runtime.images.encode_png against Pillow (compress level 1, what the server used before), on the
images a server returns: the 4-channel latent view of a random-weight 32x32x4 model (noise) and crops of the shipped
digits sample grid (real outputs), 32x32 to 256x256. Each encoder is timed warm, alternating, median of 7 rounds.

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
from dit_runtime.images import encode_png  # noqa: E402


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
    for name, image in cases.items():
        assert (np.asarray(Image.open(io.BytesIO(encode_png(image)))) == image).all()
        n = max(20, int(2e6 // image.size))
        rounds = {"ours": [], "pillow": []}
        for _ in range(7):
            rounds["ours"].append(timed(encode_png, image, n))
            rounds["pillow"].append(timed(pillow, image, n))
        ours, pil = (statistics.median(rounds[k]) * 1e6 for k in ("ours", "pillow"))
        print(json.dumps({"image": name, "ours_us": round(ours, 1), "pillow_us": round(pil, 1),
                          "speedup": round(pil / ours, 2), "ours_bytes": len(encode_png(image)),
                          "pillow_bytes": len(pillow(image))}))


if __name__ == "__main__":
    main()
