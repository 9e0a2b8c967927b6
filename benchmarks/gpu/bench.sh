#!/usr/bin/env bash
# On a GPU host: the engine's GPU tests, then the engine benchmark. Every result lands in $OUT as it is measured.
#   OUT=/tmp/out bash benchmarks/gpu/bench.sh [python -m benchmarks engine args...]
# On a cold host the tests alone compile for over 5 minutes: GPU_TESTS=0 leaves them out, to run them in a call
# of their own.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if [ -f .bundle/install.sh ] && ! python3 -c "import diffusers" 2>/dev/null; then
  bash .bundle/install.sh /tmp/site && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${GPU_TESTS:-1}" != 0 ]; then
  python3 -m pytest -q -s -m gpu tests/test_engine.py tests/test_fast_paths.py -p no:logging -p no:cacheprovider 2>&1 | grep -v DEBUG | tail -40 >> "$OUT/gpu.txt"
  tail -8 "$OUT/gpu.txt"
fi
python3 -m benchmarks engine --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{"part": "meta"'
