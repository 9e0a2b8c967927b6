#!/usr/bin/env bash
# Independent GPU jobs at once on a multi-GPU host, one job per GPU, so one device call measures several things.
#   OUT=/tmp/out bash benchmarks/gpu/streams.sh 'serve=bash benchmarks/gpu/serve.sh' 'bench=python3 -m benchmarks engine ...'
# Job k (0-based) runs as `bash -c CMD` with CUDA_VISIBLE_DEVICES=k and OUT=/tmp/streams/NAME (its own results, emptied
# first), its output in that folder's job.log, under `timeout ${LIMIT:-540}`. Every 20 s and at the end each job's
# folder is packed into $OUT/NAME.tgz, so a call cut short still returns what each job had measured. Exits non-zero
# when any job did. Ratios quoted from such a run compare rows measured inside one job (one GPU, one process).
set -uo pipefail
OUT=${OUT:?set OUT}
[ $# -gt 0 ] || { echo "usage: OUT=DIR $0 'NAME=COMMAND' ..." >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cores=$(nproc)
export TORCHINDUCTOR_COMPILE_THREADS=$(( cores / $# > 1 ? cores / $# : 1 ))
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit,memory.total,driver_version --format=csv \
    > "$OUT/gpus.csv" 2>&1 || true
seen=" "
for job in "$@"; do  # all checked before any starts
  name=${job%%=*}
  if [[ $job != *=* || ! $name =~ ^[A-Za-z0-9._-]+$ || $seen == *" $name "* ]]; then
    echo "bad or repeated job '$job': want NAME=COMMAND with a new NAME of letters, digits, '.', '_' or '-'" >&2
    exit 2
  fi
  seen+="$name "
done
summary="$OUT/jobs.jsonl"
names=(); pids=(); k=0
for job in "$@"; do
  name=${job%%=*}; cmd=${job#*=}
  rm -rf "/tmp/streams/$name"; mkdir -p "/tmp/streams/$name"
  ( export CUDA_VISIBLE_DEVICES=$k OUT="/tmp/streams/$name"
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "${LIMIT:-540}" bash -c "$cmd" > "/tmp/streams/$name/job.log" 2>&1
    rc=$?
    echo "{\"job\": \"$name\", \"gpu\": $k, \"status\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$summary"
    exit "$rc"
  ) &
  names+=("$name"); pids+=($!); k=$((k + 1))
done
pack() {  # tar exits 1 when a file grew while it read it (a live log): the archive is still good
  for n in "${names[@]}"; do
    tar --warning=no-file-changed -C /tmp/streams -czf "$OUT/$n.tgz.part" "$n"
    [ $? -le 1 ] && mv "$OUT/$n.tgz.part" "$OUT/$n.tgz"
  done
}
running() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
last=$SECONDS
while running; do
  sleep 2
  if (( SECONDS - last >= 20 )); then pack; last=$SECONDS; fi
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pack
cat "$summary"
exit "$status"
