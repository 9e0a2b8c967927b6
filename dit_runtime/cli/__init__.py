"""Command-line entry points (dit-sample, dit-eval, dit-verify, dit-convert); the library never imports
from here."""

from __future__ import annotations

import sys
from collections.abc import Callable


def denoising_progress(total_image_steps: int) -> Callable:
    """An engine ``on_step`` observer that keeps one line on stderr: image-steps done of the total."""
    done = 0

    def on_step(stats) -> None:
        nonlocal done
        done += stats.images
        print(f"\rdenoising: {done}/{total_image_steps} image-steps", end="", file=sys.stderr, flush=True)
    return on_step
