#!/usr/bin/env bash
# Train both shipped digit models on one CUDA GPU with dit-train (bf16 autocast, fp32 master weights) and copy the
# checkpoints, logs and loss plots to $OUT as each finishes. Needs only torch, numpy, safetensors, pyyaml, pillow;
# runs from the repository root without installing the package. About 2-3 minutes on an H200.
#   OUT=/tmp/out bash benchmarks/gpu/train_checkpoints.sh
# Then, on a machine with scikit-learn: copy $OUT/digits-*.safetensors into checkpoints/ and run
#   dit-eval checkpoints/digits-s.safetensors   (and digits-m)
set -euo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="--trainer.max_steps 3" dry-runs the script on a CPU machine
EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  | tee -a "$OUT/gpu.txt"
# shipped name : config in train_config/
for pair in ${MODELS:-digits-s:digits-s-gpu digits-m:digits-m}; do
  name=${pair%%:*} config=${pair#*:}
  run="runs/gpu-$name"
  rm -rf "$run"
  start=$(date +%s)
  "$PY" -m dit_runtime.train.cli --config "train_config/$config.yaml" \
    --trainer.device "$DEVICE" --trainer.bf16 true --checkpointing.output_dir "$run" $EXTRA 2>&1 | tee "$OUT/$name.train.log"
  cp "$run/model.safetensors" "$OUT/$name.safetensors"
  cp "$run/train_log.jsonl" "$OUT/$name.train_log.jsonl"
  cp "$run/loss_curve.png" "$OUT/$name.loss_curve.png"
  "$PY" -m dit_runtime.cli.sample "$run/model.safetensors" --classes 0 1 2 3 4 5 6 7 8 9 -n 8 --guidance 2 \
    --grid "$OUT/$name.samples.png" --upscale 4 --batch-size 80 --device "$DEVICE" || echo "dit-sample failed for $name (the checkpoint is still in $OUT)"
  echo "{\"model\": \"$name\", \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/summary.jsonl"
done
ls -la "$OUT"
