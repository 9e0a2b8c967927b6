"""Small line plots as PNGs with Pillow, so reports need no matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "", xlabel: str = "",
              ylabel: str = "", log_y: bool = False, size: tuple[int, int] = (860, 500)) -> Path:
    """One line per named series of (x, y) points, with a legend, grid and axis labels."""
    width, height = size
    left, right, top, bottom = 80, 200, 40, 55
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    points = [(x, fy(y)) for pts in series.values() for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def px(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

        for k in range(5):
            y = y0 + (y1 - y0) * k / 4
            _, yy = px(x0, y)
            draw.line([(left, yy), (width - right, yy)], fill=(225, 225, 225))
            draw.text((6, yy - 6), f"{10 ** y if log_y else y:.3g}", fill="black")
            x = x0 + (x1 - x0) * k / 4
            xx, _ = px(x, y0)
            draw.text((xx - 10, height - bottom + 8), f"{x:.3g}", fill="black")
        for i, (name, pts) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            xy = [px(x, fy(y)) for x, y in sorted(pts) if math.isfinite(y) and (y > 0 or not log_y)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for cx, cy in xy:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            draw.line([(width - right + 10, top + 10 + 18 * i), (width - right + 30, top + 10 + 18 * i)],
                      fill=colour, width=3)
            draw.text((width - right + 36, top + 4 + 18 * i), name, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) // 2 - 30, height - 22), xlabel, fill="black")
    draw.text((6, top - 30), ylabel, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
