"""``dit-convert``: turn the paper repository's ``.pt`` or a diffusers DiT folder into a DiT Serve checkpoint.

Examples::

    dit-convert DiT-XL-2-256x256.pt checkpoints/dit-xl-2-256.safetensors --class-names imagenet_classes.txt
    dit-convert ./DiT-XL-2-256/transformer checkpoints/dit-xl-2-256.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from ..checkpoint import (LATENT_SCALE, CheckpointError, CheckpointInfo, build_model, default_class_names,
                          import_diffusers_folder, import_paper_checkpoint, save_checkpoint, sha256_of)


def read_class_names(path: str, num_classes: int) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    text = Path(path).read_text()
    names = json.loads(text) if path.endswith(".json") else [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise SystemExit(f"dit-convert: {path} has {len(names)} class names, the model has {num_classes} classes")
    return [str(n) for n in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-convert", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Examples"):])
    parser.add_argument("source", help="a facebookresearch/DiT .pt file, or a diffusers DiTTransformer2DModel folder")
    parser.add_argument("output", help="where to write the .safetensors checkpoint")
    parser.add_argument("--num-heads", type=int, help="attention heads (.pt only; needed when no preset matches)")
    parser.add_argument("--input-size", type=int, help="latent/pixel side length (.pt only; needed without pos_embed)")
    parser.add_argument("--class-names", help="JSON list or text file, one class name per line (default class_<i>)")
    parser.add_argument("--space", choices=("latent", "pixel"), default="latent",
                        help="what the model denoises (the paper's models: latent)")
    parser.add_argument("--latent-scale", type=float, default=LATENT_SCALE, help="VAE latent scale (latent space)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    source = Path(args.source)
    try:
        if source.is_dir():
            imported = import_diffusers_folder(source)
        else:
            imported = import_paper_checkpoint(source, num_heads=args.num_heads, input_size=args.input_size)
        config = imported.config
        names = (read_class_names(args.class_names, config.num_classes) if args.class_names
                 else default_class_names(config.num_classes))
        # Building the model checks every key and shape before anything is written.
        build_model(config, imported.state_dict, str(source))
        info = CheckpointInfo(config=config, class_names=names, space=args.space, latent_scale=args.latent_scale,
                              weights="ema", training={"converted_from": str(source), "notes": imported.notes})
        out = save_checkpoint(args.output, imported.state_dict, info)
    except CheckpointError as e:
        sys.exit(f"dit-convert: {e}")
    params = sum(v.numel() for k, v in imported.state_dict.items() if k != "pos_embed")
    for note in imported.notes:
        print(f"note: {note}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {sha256_of(out)[:16]}...): "
          f"{params:,} parameters, {config.num_layers} layers x {config.hidden_dim} wide, {config.num_heads} heads, "
          f"{config.num_classes} classes, {args.space} space, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
