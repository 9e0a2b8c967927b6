"""Command-line entry points (dit-sample, dit-eval, dit-verify, dit-convert); the library never imports
from here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class _CheckpointFlag(argparse.Action):
    """``--checkpoint PATH``, which no command takes: refused with the form that works."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"the checkpoint is the first positional argument, not an option: "
                     f"{parser.prog} {values} [options]")


def add_checkpoint_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The checkpoint a command reads, named the same way by every dit-* command: positional, first."""
    parser.add_argument("checkpoint", help=help)
    parser.add_argument("--checkpoint", dest="_checkpoint_flag", metavar="PATH", action=_CheckpointFlag,
                        help=argparse.SUPPRESS)


def denoising_progress(total_image_steps: int) -> Callable:
    """An engine ``on_step`` observer that keeps one line on stderr: image-steps done of the total."""
    done = 0

    def on_step(stats) -> None:
        nonlocal done
        done += stats.images
        print(f"\rdenoising: {done}/{total_image_steps} image-steps", end="", file=sys.stderr, flush=True)
    return on_step
