#!/usr/bin/env bash
# dit-train under torchrun with DDP (NCCL) on a 2-GPU host; every log and result lands in $OUT as it is written.
#   OUT=/tmp/out bash benchmarks/gpu/ddp.sh
# 1. train_config/dit_config.yaml (dit-10l, bf16, gradient checkpointing, accumulation 2) on 1 GPU and on 2, on a
#    file of synthetic 32x32x4 latents (random numbers, not images: this measures speed and scaling, not quality);
#    the steady-state samples/s of each come from its train_log.jsonl.
# 2. The 2-GPU run killed with SIGKILL mid-run, then resumed with --resume to its end.
# 3. The digits-m recipe trained on 2 GPUs (global batch 128, as in the config), checkpoint to $OUT for dit-eval.
# EXTRA="..." adds dit-train overrides to the dit-10l runs (a CPU smoke run: a tiny preset, no bf16).
# Needs only torch, numpy, safetensors, pyyaml, pillow; runs from the repository root without installing.
set -uo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${STEPS:-60}
DIGITS_STEPS=${DIGITS_STEPS:-3000}
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/gpus.csv" 2>&1 || true
data=/tmp/synthetic-latents.safetensors
python3 - "$data" <<'EOF'
import sys, torch
from dit_runtime.train.data import save_latents
g = torch.Generator().manual_seed(0)
save_latents(sys.argv[1], torch.randn(8192, 4, 32, 32, generator=g), torch.randint(0, 10, (8192,), generator=g),
             [f"class{i}" for i in range(10)], vae="none: synthetic N(0, 1) latents for a speed check")
EOF

dit10l() {  # $1 = GPUs, $2 = run dir, rest = extra args
  local n=$1 dir=$2; shift 2
  torchrun --standalone --nproc_per_node "$n" -m dit_runtime.train.cli --config train_config/dit_config.yaml \
    --data.path "$data" --trainer.max_steps "$STEPS" --trainer.log_every 10 --trainer.warmup_steps 10 \
    --checkpointing.output_dir "$dir" --checkpointing.save_every 20 ${EXTRA:-} "$@"
}
for n in 1 2; do
  rm -rf "/tmp/ddp$n"
  start=$(date +%s)
  dit10l "$n" "/tmp/ddp$n" > "$OUT/dit10l-${n}gpu.log" 2>&1
  echo "{\"run\": \"dit10l\", \"gpus\": $n, \"status\": $?, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/summary.jsonl"
  cp "/tmp/ddp$n/train_log.jsonl" "$OUT/dit10l-${n}gpu.train_log.jsonl" 2>/dev/null
done

# Kill the 2-GPU run a second after its step-40 checkpoint exists (on its way to step 60), then resume it.
rm -rf /tmp/ddp-kill
dit10l 2 /tmp/ddp-kill > "$OUT/dit10l-kill.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  [ -f /tmp/ddp-kill/checkpoints/step-00000040.state.safetensors ] || ! kill -0 "$pid" 2>/dev/null && break
  sleep 0.5
done
sleep 1
pkill -KILL -f "output_dir /tmp/ddp-kill" ; wait "$pid"; echo "killed: exit $?" >> "$OUT/dit10l-kill.log"
ls -la /tmp/ddp-kill >> "$OUT/dit10l-kill.log"
dit10l 2 /tmp/ddp-kill --resume > "$OUT/dit10l-resume.log" 2>&1
echo "{\"run\": \"dit10l-resume\", \"gpus\": 2, \"status\": $?}" >> "$OUT/summary.jsonl"
cp /tmp/ddp-kill/train_log.jsonl "$OUT/dit10l-resume.train_log.jsonl" 2>/dev/null

# The digits-m recipe on 2 GPUs: per-device 64 x 2 GPUs = the config's global batch of 128.
rm -rf /tmp/digits-m-ddp
start=$(date +%s)
torchrun --standalone --nproc_per_node 2 -m dit_runtime.train.cli --config train_config/digits-m.yaml \
  --trainer.per_device_train_batch_size 64 --trainer.max_steps "$DIGITS_STEPS" --trainer.bf16 true \
  --checkpointing.output_dir /tmp/digits-m-ddp --checkpointing.save_every 1000 > "$OUT/digits-m-2gpu.log" 2>&1
echo "{\"run\": \"digits-m\", \"gpus\": 2, \"status\": $?, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/summary.jsonl"
cp /tmp/digits-m-ddp/model.safetensors "$OUT/digits-m-2gpu.safetensors" 2>/dev/null
cp /tmp/digits-m-ddp/train_log.jsonl "$OUT/digits-m-2gpu.train_log.jsonl" 2>/dev/null
cp /tmp/digits-m-ddp/loss_curve.png "$OUT/digits-m-2gpu.loss_curve.png" 2>/dev/null
ls -la "$OUT"
