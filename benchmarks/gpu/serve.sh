#!/usr/bin/env bash
# The serving benchmark on a GPU host (ray, fastapi and pydantic from the offline bundle in .bundle/):
#   OUT=/tmp/out bash benchmarks/gpu/serve.sh
# Serves dit-10l (random weights, fp16, compiled, CUDA graphs) as the Docker image does (direct ingress with HAProxy,
# Ray Serve's throughput switches) and runs `python -m benchmarks serve`: the engine alone, what serving adds at one
# image per request on the model's route and the gateway's, Ray Serve's own floor beside it, and Poisson load. LAYOUT
# (direct), PRECISION (fp16, or fp8), MAX_BATCH (64), BUCKETS (powers of two), RATES (8,32,128,256 or none), SEQUENTIAL
# (100), N (images per load request, 1), STEPS (25) and GATEWAYS (4) set its arguments; FLOOR_LOAD=1 offers the same
# rates to Ray Serve's floor route (the control for a served ceiling); STUDENT=1 serves the random weights as a 4-step
# student (with STEPS=4: the served path at student rates); VAE=sd-random decodes with a random VAE of sd-vae-ft-ema's
# configuration (256x256 images; diffusers from the bundle), DECODER_GRAPHS=1 captures it as CUDA graphs,
# DECODER_OPTIONS='{"coordinate_descent_tuning": true}' gives inductor options to its compile (decoder_compile_options);
# ENGINE_ALONE=0 leaves out the engine's in-process phase (which builds the engine once more than the replica does);
# PORT lets two runs share a host; PROFILE=1 adds py-spy's account of each serving process's Python time per request
# (py-spy from .whl/ when not installed: `pip download py-spy -d .whl` here, and carry .whl). Bounded to under 10
# minutes (BENCH_TIMEOUT, 560 s). A cold host compiles each bucket first (the student's seven, 1-64: 298 s), which
# leaves the served phases little of that: BUCKETS="1 8 64" for a first run. SOAK=600 ends with the soak
# (benchmarks/soak.py) on the model's route at 0.8x its capacity (SOAK_LOAD sets another share), its requests paced
# evenly (SOAK_ARRIVALS=poisson: Poisson's). Longer than one call allows: DETACH=1 starts the run in the background (in
# out/detached, with BENCH_TIMEOUT raised to fit) and returns at once; a later call on the same machine with COLLECT=1
# waits for it (up to 560 s) and copies its rows (*.jsonl) and an archive of every file (detached.tar.gz) to OUT. Any
# program compiled while serving is in OUT/recompiles.txt (start-up's too: read the clock times), a replica's slow
# garbage collections (SLOW_COLLECTION_S) and each second its threads' holds add up to STALL_WARN_S in OUT/pauses.txt,
# with STALL_STACKS=1 every thread's stack during each long hold (STALL_DUMP_S) in OUT/stalls.txt, Ray's errors (a
# replica that died and was restarted) in OUT/ray-errors.txt; the host's compaction and reclaim counters before and
# after in OUT/vmstat.txt, and every second's CPU (OUT/vmstat-1s.txt) and GPU clocks (OUT/gpu-1s.csv).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/serve}
mkdir -p "$OUT"
detached=$PWD/out/detached
if [ -n "${COLLECT:-}" ]; then
    for _ in $(seq 560); do
        [ -e "$detached/done" ] && break
        kill -0 "$(cat "$detached/pid")" 2>/dev/null || break   # gone without finishing: say so now, not in 560 s
        sleep 1
    done
    # the rows, and everything in one archive: the device tool brings back 8 files of a call's OUT
    cp "$detached"/*.jsonl "$OUT"/ 2>/dev/null || true
    tar czf "$OUT/detached.tar.gz" -C "$detached" . || true
    [ -e "$detached/done" ] || { kill -0 "$(cat "$detached/pid")" 2>/dev/null \
        && echo "[serve.sh] the detached run is still going: collect again" >&2 \
        || echo "[serve.sh] the detached run ended without finishing (see serve.sh.log)" >&2; exit 1; }
    exit "$(cat "$detached/done")"
fi
if [ -n "${DETACH:-}" ]; then
    rm -rf "$detached" && mkdir -p "$detached"
    OUT=$detached DETACH= BENCH_TIMEOUT=${BENCH_TIMEOUT:-1500} setsid nohup bash "$0" > "$detached/serve.sh.log" 2>&1 \
        < /dev/null &
    echo $! > "$detached/pid"
    echo "[serve.sh] detached (pid $!): collect with COLLECT=1 bash benchmarks/gpu/serve.sh" >&2
    exit 0
fi
if ! python3 -c "import ray, fastapi, pydantic, diffusers" 2>/dev/null; then
    [ -d /tmp/site/ray ] || bash .bundle/install.sh /tmp/site
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if [ -n "${PROFILE:-}" ] && ! command -v py-spy >/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl --target /tmp/py-spy py-spy
    export PATH="/tmp/py-spy/bin:$PATH"
fi
[ "$OUT" != "$detached" ] || echo $$ > "$detached/pid"   # the detached run itself, for COLLECT's liveness check
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1   # as the Docker image runs it
export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1   # a replica's warnings in its log at once, as the image has them
export TORCH_LOGS=${TORCH_LOGS:-recompiles}   # a program compiled while serving: its guard, in OUT/recompiles.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
vm_counters() {
    echo "$1 $(date -Iseconds)"
    grep -E "^(compact_stall|compact_fail|thp_fault_alloc|pgmajfault|allocstall)" /proc/vmstat || true
}
vm_counters before > "$OUT/vmstat.txt"
# Every second of the run, with its clock time, to read a slow minute of the soak against: the host's CPU, run queue
# and memory (vmstat), the GPU's utilisation, clocks, power and throttle reasons (nvidia-smi; without the reasons on
# a driver that does not know the field).
vmstat -t 1 > "$OUT/vmstat-1s.txt" 2>&1 & samplers=$!
gpu_fields=timestamp,utilization.gpu,clocks.sm,clocks.mem,power.draw,temperature.gpu
nvidia-smi --query-gpu=$gpu_fields,clocks_throttle_reasons.active --format=csv >/dev/null 2>&1 \
    && gpu_fields=$gpu_fields,clocks_throttle_reasons.active
nvidia-smi --query-gpu=$gpu_fields --format=csv -l 1 > "$OUT/gpu-1s.csv" 2>&1 & samplers="$samplers $!"
trap 'kill $samplers 2>/dev/null || true' EXIT   # on every way out, an interrupted run's too
status=0
timeout --signal=INT "${BENCH_TIMEOUT:-560}" python3 -m benchmarks serve --out "$OUT" --model-name dit-10l \
    --preset dit-10l --device cuda --precision "${PRECISION:-fp16}" --compile --cuda-graphs --max-batch-size "${MAX_BATCH:-64}" \
    --steps "${STEPS:-25}" --sequential "${SEQUENTIAL:-100}" --rates "${RATES:-8,32,128,256}" \
    --images-per-request "${N:-1}" --gateway-replicas "${GATEWAYS:-4}" --layout "${LAYOUT:-direct}" --port "${PORT:-8000}" \
    ${BUCKETS:+--batch-buckets $BUCKETS} ${STUDENT:+--student} ${FLOOR_LOAD:+--floor-load} ${VAE:+--vae $VAE} \
    ${DECODER_GRAPHS:+--decoder-graphs} \
    ${DECODER_OPTIONS:+--decoder-compile-options "$DECODER_OPTIONS"} $([ "${ENGINE_ALONE:-1}" = 0 ] && echo --no-engine-alone) \
    ${PROFILE:+--profile} ${STALL_STACKS:+--stall-stacks} \
    ${SOAK:+--soak $SOAK} ${SOAK_LOAD:+--soak-load $SOAK_LOAD} ${SOAK_ARRIVALS:+--soak-arrivals $SOAK_ARRIVALS} \
    2>&1 | tee "$OUT/serve.log" || status=$?
grep -rh "__recompiles\]" /tmp/ray/session_latest/logs/ 2>/dev/null | cut -c1-600 > "$OUT/recompiles.txt" || true
vm_counters after >> "$OUT/vmstat.txt"
# a replica's slow garbage collections and holds of all its threads (serving/model_server.py), with their clock times:
# a soak's started_at maps them onto its windows
grep -rhE "garbage collection of generation|Python threads were held off" /tmp/ray/session_latest/logs/serve/ \
    2>/dev/null | cut -c1-300 > "$OUT/pauses.txt" || true
# each long hold's stacks (faulthandler's "Timeout" block) and the stall watch's line after it with its time; a block
# ends at the first line that is neither
awk 'FNR == 1 {keep = 0} /^Timeout \(/ {keep = 1}
     keep && !/^(Timeout \(|Thread 0x|Current thread 0x|  |$|\[stall-watch\])/ {keep = 0}
     keep {print} /^\[stall-watch\]/ {keep = 0}' /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null \
    > "$OUT/stalls.txt" || true
# a replica that died (and Serve restarted) says why only in Ray's logs: each error with its traceback, by file
grep -r -i -A25 -E "traceback|error|died|failed to load|out of memory" /tmp/ray/session_latest/logs/serve/ /tmp/ray/session_latest/logs/*.err \
    2>/dev/null | grep -v -i "warn" | tail -400 > "$OUT/ray-errors.txt" || true
echo "[serve.sh] exit status $status; results in $OUT:" >&2
ls -l "$OUT" >&2
[ "$OUT" != "$detached" ] || echo "$status" > "$detached/done"
exit "$status"
