"""What a training run shows and leaves behind besides checkpoints: a progress bar, a JSONL log, a loss plot.

Plain stderr and Pillow only, so training needs neither tqdm nor matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressBar:
    """One line on stderr: step, bar, loss, samples/s and ETA; redrawn in place on a terminal, else printed."""

    def __init__(self, total_steps: int, start_step: int, samples_per_step: int, stream: TextIO | None = None,
                 width: int = 24):
        self.total, self.start_step, self.samples_per_step = total_steps, start_step, samples_per_step
        self.stream = stream or sys.stderr
        self.width = width
        self.start_time = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, step: int, loss: float) -> str:
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        rate = done * self.samples_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else float("nan")
        filled = int(self.width * step / max(1, self.total))
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"loss {loss:.4f} | {rate:,.0f} samples/s | ETA {format_duration(eta) if done else '?'}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()
        return line

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class JsonlLog:
    """Append-only JSONL training log; on resume the records past the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curve(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> Path:
    """Draw loss against step (log-scale loss axis) as a PNG with Pillow."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 800, 480, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    points = [(s, l) for s, l in zip(steps, losses) if l > 0 and math.isfinite(l)]
    if points:
        xs, ys = [p[0] for p in points], [math.log10(p[1]) for p in points]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = math.floor(min(ys) * 4) / 4, math.ceil(max(ys) * 4) / 4
        y1 = max(y1, y0 + 0.25)

        def px(s: float, ly: float) -> tuple[float, float]:
            return (left + (s - x0) / (x1 - x0) * (width - left - right),
                    height - bottom - (ly - y0) / (y1 - y0) * (height - top - bottom))

        for k in range(5):  # horizontal grid, labelled in loss units
            ly = y0 + (y1 - y0) * k / 4
            _, yy = px(x0, ly)
            draw.line([(left, yy), (width - right, yy)], fill=(225, 225, 225))
            draw.text((6, yy - 6), f"{10 ** ly:.3g}", fill="black")
        for k in range(5):
            s = x0 + (x1 - x0) * k / 4
            xx, _ = px(s, y0)
            draw.text((xx - 10, height - bottom + 8), f"{int(s)}", fill="black")
        draw.line([px(s, ly) for s, ly in zip(xs, ys)] if len(xs) > 1 else [px(xs[0], ys[0])] * 2,
                  fill=(31, 119, 180), width=2)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 30, height - 22), "optimiser step", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
