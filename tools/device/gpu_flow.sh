#!/usr/bin/env bash
# GPU check of the pipeline on the lent machine (after the staging calls): the grpo flow on one
# GPU with a random-init Qwen2 of 0.5B shape, full fine-tuning or LoRA, 3 steps, one checkpoint,
# one eval. Usage, from the repo root there:  tools/device/gpu_flow.sh full|lora [key=value ...]
set -euo pipefail
mode=$1; shift
source tools/device/device_env.sh
if [ "$mode" = lora ]; then tune=(model.lora_rank=32 actor.lr=3e-5); else tune=(model.lora_rank=0 actor.lr=1e-6); fi
out=${OUT:-/root/out}; mkdir -p "$out"
python3 -m flows.cli run qwen2-0.5b-lora-1xh100 "${tune[@]}" \
  model.source=random model.arch=0.5b model.path=/root/models/qwen2-0.5b \
  data.source="$PWD/.device/gsm8k" data.dir=/root/data data.train_batch_size=64 data.val_max_samples=128 \
  actor.ppo_mini_batch_size=64 actor.ppo_micro_batch_size_per_gpu=16 \
  rollout.max_response_length=512 rollout.gpu_memory_utilization=0.4 \
  trainer.total_training_steps=3 trainer.save_freq=3 trainer.test_freq=3 \
  tracking.tracking_uri=sqlite:////root/mlflow.db tracking.run_name="gpu-$mode" \
  trainer.default_local_dir="/root/ckpt-$mode" "$@" 2>&1 | tee "$out/flow-$mode.log" | grep -vE "Loading weights|it/s\]"
python3 tools/device/mlflow_summary.py sqlite:////root/mlflow.db "gpu-$mode" | tee "$out/metrics-$mode.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a "$out/metrics-$mode.txt"
