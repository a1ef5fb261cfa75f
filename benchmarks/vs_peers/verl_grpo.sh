#!/usr/bin/env bash
# verl (PyPI verl 0.9.1) GRPO entry point, FSDP + vLLM colocated (its defaults), on the work of
# recipe smollm2-135m-1xh200: same model dir, parquet (our prep writes the reference's columns:
# prompt, data_source, reward_model.ground_truth, extra_info), batch 64 x n 8, 256-token responses,
# lr 1e-5, mini-batch 32, micro 64, vLLM max_num_seqs 1024 (the recipe's; verl's default is 256), KL loss low_var_kl 0.001, reward = reference scorer with
# format_score 0.1 (verl_reward.py), full test set val before training and at the end.
# Attention is SDPA and remove-padding off: verl's defaults (flash_attention_2, and remove-padding
# through flash-attn's varlen kernels) need the flash-attn package, which the GPU image lacks and
# PyPI has only as a source build. TRL must not be importable (tools/device/gpu_issue14.sh setup).
# Val: verl_reward.py's "acc" (strict, no format credit) is val-core/openai/gsm8k/acc/mean@1 and
# "flexible" val-aux/.../flexible/mean@1, at step 0 and every TEST_FREQ steps (default: the end).
#   [TEST_FREQ=K] benchmarks/vs_peers/verl_grpo.sh STEPS DATA_DIR MODEL_DIR [extra hydra overrides]
set -uo pipefail
steps=$1 data=$2 model=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
# The prompts in our flow's order (tasks/stages.step_rows: the recipe shuffles with trainer.seed),
# written once as verl's train file, which verl then reads in order (data.shuffle=False).
python3 - "$data" "$steps" <<'PY' || exit 1
import sys
import pandas as pd
from configs.load import load_config
from tasks import stages
data, steps = sys.argv[1], int(sys.argv[2])
cfg = load_config("smollm2-135m-1xh200", [f"data.dir={data}"])
train = pd.read_parquet(f"{data}/train.parquet")
rows = [int(i) for s in range(1, steps + 1) for i in stages.step_rows(len(train), cfg, s)]
train.iloc[rows].to_parquet(f"{data}/verl_train.parquet")
print(f"verl_train.parquet: the {len(rows)} rows our steps 1..{steps} draw, in order")
PY
python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
  data.train_files="$data/verl_train.parquet" data.val_files="$data/test.parquet" \
  data.train_batch_size=64 data.max_prompt_length=512 data.max_response_length=256 \
  data.filter_overlong_prompts=True data.truncation=error data.shuffle=False \
  actor_rollout_ref.model.path="$model" actor_rollout_ref.model.use_remove_padding=False \
  +actor_rollout_ref.model.override_config.attn_implementation=sdpa \
  actor_rollout_ref.model.enable_gradient_checkpointing=False \
  actor_rollout_ref.actor.optim.lr=1e-5 actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64 actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.001 actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
  actor_rollout_ref.rollout.max_num_seqs=1024 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=64 \
  reward.custom_reward_function.path="$here/verl_reward.py" reward.custom_reward_function.name=compute_score \
  trainer.logger='["console"]' trainer.project_name=issue14 trainer.experiment_name=smollm2-verl \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.save_freq=-1 trainer.test_freq="${TEST_FREQ:-$steps}" \
  trainer.val_before_train=True trainer.total_training_steps="$steps" trainer.total_epochs=1 "$@"
