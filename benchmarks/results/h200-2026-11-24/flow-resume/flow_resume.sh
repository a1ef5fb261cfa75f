set -uo pipefail
source scripts/device_env.sh >/dev/null || exit 1
export PYTHONUNBUFFERED=1
python3 benchmarks/build_models.py 0.5b --models-dir /root/models --gsm8k $PWD/.device/gsm8k 2>&1 | grep "^\[model\]"
ls /root/models
common=(model.lora_rank=0 actor.lr=1e-6 model.source=hf model.path=/root/models/random-qwen2-0.5b
  data.source=$PWD/.device/gsm8k data.dir=/root/data data.train_batch_size=64 data.val_max_samples=64
  actor.ppo_mini_batch_size=64 actor.ppo_micro_batch_size_per_gpu=16 rollout.max_response_length=256
  rollout.gpu_memory_utilization=0.4 rollout.calculate_log_probs=true trainer.save_freq=2 trainer.test_freq=-1
  tracking.tracking_uri=sqlite:////root/mlflow.db tracking.run_name=gpu-resume trainer.default_local_dir=/root/ckpt)
timeout 260 python3 -m flows.cli run qwen2-0.5b-lora-1xh100 "${common[@]}" trainer.total_training_steps=2 > $OUT/run1.log 2>&1; echo "run1 rc=$?"
ls -la /root/ckpt/global_step_2/actor | head; du -sh /root/ckpt/global_step_2/*
timeout 200 python3 -m flows.cli run qwen2-0.5b-lora-1xh100 "${common[@]}" trainer.total_training_steps=3 > $OUT/run2.log 2>&1; echo "run2 rc=$?"
grep -E "resumed from|step [0-9]/|error|Error" $OUT/run1.log $OUT/run2.log | grep -v Warning | tail -12
python3 scripts/mlflow_summary.py sqlite:////root/mlflow.db gpu-resume 2>&1 | tail -40
