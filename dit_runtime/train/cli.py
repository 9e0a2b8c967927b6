"""``dit-train`` and ``dit-distill``: train a DiT, or distil one into a few-step student, from a YAML config plus
``--section.key value`` overrides.

Single process: ``dit-train --config train_config/digits-s.yaml``.
Several GPUs or CPU processes, one code path: ``torchrun --nproc_per_node 2 -m dit_runtime.train.cli --config ...``
(``-m dit_runtime.train.distill TEACHER --config ...`` for dit-distill).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import add_checkpoint_argument
from .config import ConfigError, DistillConfig, describe, load_config, parse_overrides

USAGE = """dit-train --config FILE [--resume] [--section.key value ...]

Sections: model, data, diffusion, trainer, checkpointing. `dit-train --help-config` lists every key.
Examples:
  dit-train --config train_config/digits-s.yaml --trainer.max_steps 40 --checkpointing.output_dir /tmp/run
  torchrun --nproc_per_node 8 -m dit_runtime.train.cli --config train_config/dit_config.yaml --resume
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """The fixed options, and the ``--section.key value`` overrides in order."""
    parser = argparse.ArgumentParser(prog="dit-train", usage=USAGE, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML training config (default: every key at its default)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in checkpointing.output_dir, if there is one")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        if args.help_config:
            print(describe())
            return 0
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"dit-train: config error: {e}", file=sys.stderr)
        return 2
    from .trainer import Trainer  # after validation, so config errors come back without importing torch work

    try:
        trainer = Trainer(config, resume=args.resume, command=["dit-train", *argv])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dit-train: {e}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


DISTILL_USAGE = """dit-distill TEACHER.safetensors --config FILE [--resume] [--section.key value ...]

Sections: distill, data, trainer, checkpointing. `dit-distill --help-config` lists every key.
Examples:
  dit-distill checkpoints/digits-s.safetensors --config train_config/digits-s-4step.yaml
  torchrun --nproc_per_node 8 -m dit_runtime.train.distill ckpt.safetensors --config cfg.yaml --resume
"""


def distill_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dit-distill", usage=DISTILL_USAGE,
                                     description="Distil a teacher checkpoint into a few-step student with guidance "
                                                 "built in (dit_runtime/train/distill.py says how).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser, "the teacher checkpoint (.safetensors, from dit-train)")
    parser.add_argument("--config", help="YAML distillation config (default: every key at its default)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in checkpointing.output_dir, if there is one")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    if "--help-config" in argv:
        print(describe(DistillConfig))
        return 0
    args, rest = parser.parse_known_args(argv)
    from ..checkpoint import CheckpointError, read_info

    try:
        read_info(args.checkpoint)  # a wrong teacher path is the first thing to hear about
    except CheckpointError as e:
        print(f"dit-distill: {e}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, parse_overrides(rest), DistillConfig)
    except ConfigError as e:
        print(f"dit-distill: config error: {e}", file=sys.stderr)
        return 2
    from .distill import Distiller  # after validation, as for dit-train

    try:
        distiller = Distiller(config, args.checkpoint, resume=args.resume, command=["dit-distill", *argv])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dit-distill: {e}", file=sys.stderr)
        return 2
    distiller.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
