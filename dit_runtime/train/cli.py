"""``dit-train``: train a DiT from a YAML config plus ``--section.key value`` overrides.

Single process: ``dit-train --config train_config/digits-s.yaml``.
Several GPUs or CPU processes, one code path: ``torchrun --nproc_per_node 2 -m dit_runtime.train.cli --config ...``.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, describe, load_config

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
    overrides = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key value "
                              "(e.g. --trainer.max_steps 40)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"{token} needs a value")
            value = rest[i + 1]
            i += 1
        overrides.append((key, value))
        i += 1
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


if __name__ == "__main__":
    sys.exit(main())
