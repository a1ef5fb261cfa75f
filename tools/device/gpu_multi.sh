#!/usr/bin/env bash
# Issue 3's GPU acceptance run on a lent machine of several GPUs (after the staging calls): the
# grpo flow on a random-init Qwen2 of 0.5B or 1.5B shape over every GPU of the machine, full or
# LoRA, with vLLM at tensor-parallel size TP (1: one engine per GPU), 3 steps, vLLM's log-probs
# checked against the trainer's after each sync (training/rollout_probs_diff_*), nvidia-smi peaks.
# Usage, from the repo root there:  tools/device/gpu_multi.sh 0.5b|1.5b full|lora TP [key=value ...]
set -euo pipefail
arch=$1 mode=$2 tp=$3; shift 3
source tools/device/device_env.sh
gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$mode" = lora ]; then tune=(model.lora_rank=32 actor.lr=3e-5); else tune=(model.lora_rank=0 actor.lr=1e-6); fi
out=${OUT:-/root/out}; run="gpu${gpus}-$arch-$mode-tp$tp"; mkdir -p "$out"
python3 benchmarks/build_models.py "$arch" --models-dir /root/models --gsm8k "$PWD/.device/gsm8k" | grep "^\[model\]"
(while true; do nvidia-smi --query-gpu=index,memory.used --format=csv,noheader >> "$out/smi-$run.log"; sleep 1; done) &
smi=$!
python3 -m flows.cli run qwen2-0.5b-lora-1xh100 "${tune[@]}" \
  model.source=random model.arch="$arch" model.path="/root/models/random-qwen2-$arch" \
  data.source="$PWD/.device/gsm8k" data.dir="/root/data-$arch" trainer.n_gpus_per_node="$gpus" \
  data.train_batch_size=32 actor.ppo_mini_batch_size=32 actor.ppo_micro_batch_size_per_gpu=8 \
  rollout.tensor_model_parallel_size="$tp" rollout.max_response_length=256 rollout.gpu_memory_utilization=0.3 \
  rollout.calculate_log_probs=true trainer.total_training_steps=3 trainer.save_freq=3 trainer.test_freq=-1 \
  tracking.tracking_uri=sqlite:////root/mlflow.db tracking.run_name="$run" \
  trainer.default_local_dir="/root/ckpt-$run" "$@" 2>&1 | tee "$out/flow-$run.log" | grep -E "worker group|step [0-9]+/|error"
kill $smi
python3 tools/device/mlflow_summary.py sqlite:////root/mlflow.db "$run" | tee "$out/metrics-$run.txt"
python3 - "$out/smi-$run.log" <<'P' | tee -a "$out/metrics-$run.txt"
import collections, sys
peak = collections.defaultdict(int)
for line in open(sys.argv[1]):
    i, m = line.strip().split(", ")
    peak[i] = max(peak[i], int(m.split()[0]))
print("nvidia-smi peak MiB per GPU:", dict(peak))
P
