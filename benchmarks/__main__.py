"""``python -m benchmarks TOOL [ARGS]``: run one benchmark (``python -m benchmarks`` lists them)."""

from __future__ import annotations

import importlib
import sys

TOOLS = {"engine": "engine", "serve": "serve", "load": "loadgen", "overload": "overload", "api": "api",
         "train-memory": "train_memory", "plot": "plots", "cache-quality": "cache_quality",
         "scale": "scale", "startup": "startup", "student-quality": "student_quality", "encode": "encode",
         "soak": "soak", "decode": "decode", "anchor": "anchor"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        print(__import__("benchmarks").__doc__, file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{TOOLS[sys.argv[1]]}")
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
