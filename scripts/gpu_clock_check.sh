#!/usr/bin/env bash
# Is the 19% between dit-bench and latency_ab.py (docs/benchmarks.md, runs 17-19) the SM clock? Both processes, one
# after the other on one GPU, with nvidia-smi sampling the clock, power and the driver's clock-event reasons every
# 50 ms beside each timing; dit-bench twice, in both setup orders, its setups timed in turn over 5 rounds; latency_ab.py with and
# without dit-bench's allow_tf32.
#   OUT=/tmp/out bash scripts/gpu_clock_check.sh        (needs .bundle for diffusers: carry it)
# Results go to /tmp/clock_check and are packed into $OUT/clock_check.tgz after each step (a device call returns
# only so many files; run 21 lost six of them).
set -uo pipefail
FINAL=${OUT:?set OUT}
OUT=/tmp/clock_check
rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
pack() { tar -C /tmp -czf "$FINAL/clock_check.tgz.part" clock_check && mv "$FINAL/clock_check.tgz.part" "$FINAL/clock_check.tgz"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -f .bundle/install.sh ]; then bash .bundle/install.sh /tmp/site > "$OUT/install.log" 2>&1; export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE,TEMPERATURE > "$OUT/smi-q-before.txt" 2>&1
run() { local name=$1; shift; echo "== $name: $*"; local t=$SECONDS; "$@" > "$OUT/$name.log" 2>&1; echo "== $name: rc=$? in $((SECONDS - t)) s"; pack; }
run bench-ours-first python3 -m dit_runtime.cli.bench --out "$OUT/bench-ours-first" --models dit-10l --parts forward \
    --batches 256 --setups ours-compiled-graphs diffusers-compile --rounds 5 --profile-kernels
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE,TEMPERATURE > "$OUT/smi-q-loaded.txt" 2>&1
# the one setting dit-bench makes that latency_ab.py does not (an A/B of the process difference)
run latency-ab-tf32 python3 scripts/latency_ab.py --out "$OUT/latency-ab-tf32" --parts graphs --graph-buckets 256 \
    --variants '[{"fused_adaln": true, "split_k": 4, "split_k_max_rows": 512}]' --tf32
run latency-ab python3 scripts/latency_ab.py --out "$OUT/latency-ab" --parts graphs --graph-buckets 256 \
    --variants '[{"fused_adaln": true, "split_k": 4, "split_k_max_rows": 512}]'
run bench-diffusers-first python3 -m dit_runtime.cli.bench --out "$OUT/bench-diffusers-first" --models dit-10l \
    --parts forward --batches 256 --setups diffusers-compile ours-compiled-graphs --rounds 5
grep -h '"part": "forward"' "$OUT"/bench-*/bench.jsonl | cut -c1-400
grep -h '"part": "graphs"' "$OUT"/latency-ab*/latency_ab.jsonl | cut -c1-400
