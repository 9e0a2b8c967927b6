"""Image encoding on the CPU: the encoders a served image goes through, on the same images, per ``output_format``.

    python -m benchmarks encode [--out DIR]
    python -m benchmarks encode --throughput [--threads 1 2 4 8 16]

Images: the 4-channel latent view a random-weight 32x32x4 model answers (noise), crops of the shipped digits sample
grid (real outputs) from 32x32 to 256x256, and a 256x256 photograph when scikit-learn (the test extra) is installed.
Encoders: ours (``dit_runtime.images.encode_png``, on one thread and with its deflate slices on a pool, as the server
runs it), Pillow's PNG at compress levels 1 and 6 (its default), and Pillow's JPEG and WebP at qualities 100 (the
API's default) and 75. Each is timed warm, the encoders in turn, median of 7 rounds; each row gives microseconds per
image and the file's bytes. Rows go to ``OUT/encode.jsonl`` as they are measured, and a table to stdout.

``--throughput``: the 256x256 images as a replica encodes answers under load: requests of four images, base64 PNG
(``images.encode_base64``), on a pool of encoder threads beside a pool as large that deflates the slices, for each of
``--threads`` (default: 1, 2, 4 and so on up to the CPUs this process may use, and that count); median images/s of
``--rounds``, to ``OUT/encode-throughput.jsonl``. A replica sizes both pools to ``images.encode_threads()``
(its CPUs, at most ``MAX_ENCODE_THREADS``: this benchmark's figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dit_runtime.images import deflate_threads, encode_base64, encode_image, encode_png, usable_cpus
from dit_runtime.request import OutputEncoding

ROOT = Path(__file__).resolve().parents[1]


def pillow(image: np.ndarray, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format=format, **options)
    return buffer.getvalue()


def images() -> dict[str, np.ndarray]:
    latent = np.clip(np.random.default_rng(0).standard_normal((32, 32, 4)), -1, 1)
    grid = np.asarray(Image.open(ROOT / "checkpoints" / "digits-m-samples.png").convert("RGB"))
    cases = {"latent view 32x32x4 (noise)": np.round((latent + 1) * 127.5).astype(np.uint8),
             "digits 32x32x3": grid[:32, :32], "digits 128x128x3": grid[:128, :128],
             "digits 256x256x3": np.ascontiguousarray(grid[:256, :256])}
    try:
        from sklearn.datasets import load_sample_image
        cases["photo 256x256x3"] = np.ascontiguousarray(load_sample_image("flower.jpg")[100:356, 100:356])
    except ImportError:
        pass
    return cases


def emit(row: dict, rows: list[dict], log) -> None:
    """A measured row: kept for the table, to the JSON lines file at once, and to stdout."""
    rows.append(row)
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(json.dumps(row), flush=True)


def throughput(out: Path, threads: list[int], rounds: int, requests: int = 64, n: int = 4) -> int:
    """Images/s of requests of ``n`` base64 PNGs on ``threads`` encoder threads (and as many deflating), per image."""
    encoding = OutputEncoding("png")
    cpus = usable_cpus()
    print(f"{cpus} CPUs for this process; requests of {n} images, {requests} a round", flush=True)
    rows = []
    with open(out / "encode-throughput.jsonl", "w") as log:
        for name, image in images().items():
            if image.shape[:2] != (256, 256):
                continue
            batch = np.stack([image] * n)
            for count in threads:
                with ThreadPoolExecutor(count, thread_name_prefix="encode") as encoder, \
                        ThreadPoolExecutor(count, thread_name_prefix="png") as deflater:
                    answer = lambda _: encode_base64(batch, encoding, pool=deflater)  # noqa: E731
                    list(encoder.map(answer, range(count)))  # every thread started and warm
                    rates = []
                    for _ in range(rounds):
                        start = time.perf_counter()
                        list(encoder.map(answer, range(requests)))
                        rates.append(requests * n / (time.perf_counter() - start))
                row = {"image": name, "threads": count, "cpus": cpus, "requests": requests, "images_per_request": n,
                       "images_per_s": round(statistics.median(rates), 1)}
                emit(row, rows, log)
    print("\n| image | threads | images/s |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['image']} | {r['threads']} | {r['images_per_s']:,.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks encode", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--throughput", action="store_true", help="images/s of a replica's encoder pools by thread count")
    p.add_argument("--threads", type=int, nargs="+", help="with --throughput: the pool sizes to time")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        cpus = usable_cpus()
        counts = args.threads or sorted({*(2 ** i for i in range(cpus.bit_length())), cpus})
        return throughput(out, counts, args.rounds)
    rows = []
    with ThreadPoolExecutor(deflate_threads(), thread_name_prefix="png") as pool, \
            open(out / "encode.jsonl", "w") as log:
        for name, image in images().items():
            encoders = {"png ours (one thread)": lambda im: encode_png(im, threads=1),
                        "png ours (server: slices on a pool)": lambda im: encode_png(im, pool=pool),
                        "png Pillow level 1": lambda im: pillow(im, "PNG", compress_level=1),
                        "png Pillow level 6": lambda im: pillow(im, "PNG")}
            for fmt in ("jpeg", "webp"):
                if fmt == "jpeg" and image.shape[-1] == 4:
                    continue  # JPEG holds grey or RGB only
                for quality in (100, 75):
                    encoding = OutputEncoding(fmt, quality)
                    encoders[f"{fmt} Pillow quality {quality}"] = lambda im, e=encoding: encode_image(im, e)
            n = max(10, int(1e6 // image.size))
            times = {k: [] for k in encoders}
            for _ in range(args.rounds):
                for k, fn in encoders.items():
                    fn(image)  # warm
                    start = time.perf_counter()
                    for _ in range(n):
                        fn(image)
                    times[k].append((time.perf_counter() - start) / n)
            for k, fn in encoders.items():
                row = {"image": name, "encoder": k, "us": round(statistics.median(times[k]) * 1e6, 1),
                       "bytes": len(fn(image)), "cpus": os.cpu_count()}
                emit(row, rows, log)
    print("\n| image | encoder | us per image | bytes |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['image']} | {r['encoder']} | {r['us']:,.1f} | {r['bytes']:,} |")
    return 0
