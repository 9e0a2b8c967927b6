"""``dit-verify``: exact parameter counts, weight memory, FLOPs and training memory of DiT configs.

Examples::

    dit-verify                       # every preset, as a table
    dit-verify dit-10l dit-8l --batch-size 16
    dit-verify --config my_model.yaml --json
    dit-verify --hidden-dim 768 --num-layers 12 --num-heads 12 --ffn-dim 3072
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import yaml

from ..model import PRESETS, DiTConfig, get_preset
from ..sizing import size_report

_DIM_FIELDS = [f for f in fields(DiTConfig) if f.type in ("int", "bool", int, bool)]


def config_from_file(path: str) -> DiTConfig:
    """A DiTConfig from YAML: DiTConfig fields at the top level or under ``model:``; ``preset:`` sets the base."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"dit-verify: cannot read config file {path}: {e}") from None
    if isinstance(values, dict) and isinstance(values.get("model"), dict):
        values = values["model"]
    if not isinstance(values, dict):
        raise SystemExit(f"dit-verify: {path} must hold a mapping of DiTConfig fields (optionally under 'model:')")
    values = dict(values)
    allowed = {f.name for f in fields(DiTConfig)}
    values = {k: v for k, v in values.items() if k in allowed or k == "preset"}
    try:
        base = get_preset(values.pop("preset")) if "preset" in values else DiTConfig()
        return replace(base, **values)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"dit-verify: {path}: {e}") from None


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _gib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_table(reports: list[dict]) -> None:
    batch = reports[0]["training_memory"]["batch_size_per_gpu"]
    header = ["model", "params", "embed", "per block", "final", "fp32", "fp16/bf16", "fp8 (fp8 only)", "cache/row",
              "GFLOPs/img", f"train/GPU b={batch}", "+ckpt"]
    rows = []
    for r in reports:
        b, mem = r["breakdown"], r["training_memory"]
        rows.append([r["name"], f"{r['parameters']:,}", _human(b["embeddings"]), _human(b["per_block"]),
                     _human(b["final_layer"]), _gib(r["weight_bytes"]["fp32"]), _gib(r["weight_bytes"]["bf16"]),
                     f"{_gib(r['weight_bytes']['fp8'])} ({_gib(r['weight_bytes']['fp8_only'])})",
                     _gib(r["feature_cache_bytes_per_row"]),
                     f"{r['flops_per_image']['total'] / 1e9:.1f}", _gib(mem["without_checkpointing"]["peak"]),
                     _gib(mem["with_checkpointing"]["peak"])])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    claims = [r for r in reports if "model_card_claim" in r]
    if claims:
        print("\nThe old model card's figures were wrong; the dimensions give:")
        for r in claims:
            print(f"  {r['name']}: card said {_human(r['model_card_claim'])}, true count {_human(r['parameters'])}")
    print("\nGFLOPs: matmuls only, 2 per multiply-add (the paper's 'Gflops' are multiply-adds, half of these). "
          "Training memory: bf16 autocast, fp32 weights/grads, AdamW, fp32 EMA; see docs/model-sizes.md. cache/row: "
          "the feature cache of one image row in fp16/bf16 (serve config feature_cache_rows).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-verify", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Examples"):])
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help=f"presets to report (default: all): {', '.join(PRESETS)}")
    parser.add_argument("--config", help="YAML file with DiTConfig fields (top level or under 'model:')")
    parser.add_argument("--batch-size", type=int, default=32, help="per-GPU batch for the training-memory estimate")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    dims = parser.add_argument_group("explicit dimensions (override the preset/config, or DiTConfig's defaults)")
    for f in _DIM_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            dims.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            dims.add_argument(flag, type=int, default=None)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    overrides = {f.name: getattr(args, f.name) for f in _DIM_FIELDS if getattr(args, f.name) is not None}

    try:
        configs = [(name, get_preset(name)) for name in args.presets]
    except ValueError as e:
        parser.error(str(e))
    if args.config:
        configs.append((Path(args.config).stem, config_from_file(args.config)))
    if overrides:
        try:
            configs = ([(f"{name}*", replace(c, **overrides)) for name, c in configs]
                       or [("custom", DiTConfig(**overrides))])
        except ValueError as e:
            parser.error(str(e))
    if not configs:
        configs = list(PRESETS.items())

    reports = [size_report(name, config, args.batch_size) for name, config in configs]
    if args.json:
        json.dump({"models": reports}, sys.stdout, indent=2)
        print()
    else:
        print_table(reports)


if __name__ == "__main__":
    main()
