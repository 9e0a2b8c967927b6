#!/usr/bin/env bash
# Is the 19% between dit-bench and latency_ab.py (docs/benchmarks.md, runs 17-19) the SM clock? Both processes, one
# after the other on one GPU, with nvidia-smi sampling the clock, power and the driver's clock-event reasons every
# 50 ms beside each timing; dit-bench twice, in both setup orders, its setups timed in turn over 5 rounds.
#   OUT=/tmp/out bash scripts/gpu_clock_check.sh        (needs .bundle for diffusers: carry it)
set -uo pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -f .bundle/install.sh ]; then bash .bundle/install.sh /tmp/site > "$OUT/install.log" 2>&1; export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE,TEMPERATURE > "$OUT/smi-q-before.txt" 2>&1
run() { local name=$1; shift; echo "== $name: $*"; local t=$SECONDS; "$@" > "$OUT/$name.log" 2>&1; echo "== $name: rc=$? in $((SECONDS - t)) s"; }
run bench-ours-first python3 -m dit_runtime.cli.bench --out "$OUT/bench-ours-first" --models dit-10l --parts forward \
    --batches 256 --setups ours-compiled-graphs diffusers-compile --rounds 5 --profile-kernels
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE,TEMPERATURE > "$OUT/smi-q-loaded.txt" 2>&1
run latency-ab python3 scripts/latency_ab.py --out "$OUT/latency-ab" --parts graphs --graph-buckets 256 \
    --variants '[{"fused_adaln": true, "split_k": 4, "split_k_max_rows": 512}]'
run bench-diffusers-first python3 -m dit_runtime.cli.bench --out "$OUT/bench-diffusers-first" --models dit-10l \
    --parts forward --batches 256 --setups diffusers-compile ours-compiled-graphs --rounds 5
grep -h '"part": "forward"' "$OUT"/bench-*/bench.jsonl | cut -c1-400
grep -h '"part": "graphs"' "$OUT"/latency-ab/latency_ab.jsonl | cut -c1-400
