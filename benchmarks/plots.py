"""Plots of serving benchmarks side by side: p99 latency and images/s against the offered load, one line per run.

    python -m benchmarks plot OUT/fp16/summary.json OUT/fp8/summary.json --labels fp16 fp8 --out serve-load.png

Each file is a ``python -m benchmarks serve`` summary; two PNGs are written: ``<out>`` (p99, log scale) and
``<out stem>-throughput.png`` (images/s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dit_runtime.plot import line_plot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks plot", description=__doc__.split("\n\n")[0])
    p.add_argument("summaries", nargs="+", type=Path, help="serve benchmark summary.json files")
    p.add_argument("--labels", nargs="+", help="one per file (default: the files' parent folders)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    labels = a.labels or [s.parent.name for s in a.summaries]
    if len(labels) != len(a.summaries):
        p.error(f"give one label per file: {len(a.summaries)} files, {len(labels)} labels")
    loads = {label: json.loads(path.read_text())["load"] for label, path in zip(labels, a.summaries)}
    p99 = {label: [(r["offered_rps"], r["p99_ms"] / 1000) for r in rows] for label, rows in loads.items()}
    rate = {label: [(r["offered_rps"], r["images_per_s"]) for r in rows] for label, rows in loads.items()}
    line_plot(p99, a.out, title="p99 latency against offered load", xlabel="offered requests/s",
              ylabel="p99 latency (s)", log_y=True)
    throughput = a.out.with_name(f"{a.out.stem}-throughput.png")
    line_plot(rate, throughput, title="images/s against offered load", xlabel="offered requests/s",
              ylabel="images/s")
    print(f"wrote {a.out} and {throughput}")
    return 0
