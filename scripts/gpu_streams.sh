#!/usr/bin/env bash
# Independent GPU jobs at once on a multi-GPU host, one job per GPU, so one device call measures several things.
#   OUT=/tmp/out bash scripts/gpu_streams.sh 'serve=bash scripts/gpu_serve_bench.sh' 'bench=python3 -m dit_runtime.cli.bench ...'
# Job k (0-based) runs as `bash -c CMD` with CUDA_VISIBLE_DEVICES=k and OUT=/tmp/streams/NAME (its own results), its
# output in that folder's job.log, under `timeout ${LIMIT:-540}`. Every 20 s and at the end each job's folder is
# packed into $OUT/NAME.tgz, so a call cut short still returns what each job had measured. Ratios quoted from such
# a run compare rows measured inside one job (one GPU, one process), never across jobs.
set -uo pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cores=$(nproc)
export TORCHINDUCTOR_COMPILE_THREADS=$(( cores / $# > 1 ? cores / $# : 1 ))
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit,memory.total,driver_version --format=csv \
    > "$OUT/gpus.csv" 2>&1 || true
summary="$OUT/jobs.jsonl"
names=(); pids=(); k=0
for job in "$@"; do
  name=${job%%=*}; cmd=${job#*=}
  mkdir -p "/tmp/streams/$name"
  ( export CUDA_VISIBLE_DEVICES=$k OUT="/tmp/streams/$name"
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "${LIMIT:-540}" bash -c "$cmd" > "/tmp/streams/$name/job.log" 2>&1
    echo "{\"job\": \"$name\", \"gpu\": $k, \"status\": $?, \"seconds\": $(( $(date +%s) - start ))}" >> "$summary"
  ) &
  names+=("$name"); pids+=($!); k=$((k + 1))
done
pack() { for n in "${names[@]}"; do tar -C /tmp/streams -czf "$OUT/$n.tgz.part" "$n" && mv "$OUT/$n.tgz.part" "$OUT/$n.tgz"; done; }
running() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running; do sleep 5; [ $(( SECONDS % 20 )) -lt 5 ] && pack; done
wait; pack
cat "$summary"
