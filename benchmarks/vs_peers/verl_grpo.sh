#!/usr/bin/env bash
# verl (PyPI verl 0.9.1) GRPO entry point, FSDP + vLLM colocated (its defaults), on the work of one
# of our recipes (RECIPE, default smollm2-135m-1xh200), over the model dir and parquet our flow built
# (our prep writes the reference's columns: prompt, data_source, reward_model.ground_truth,
# extra_info), the prompts in our flow's order, reward = the reference scorer (verl_reward.py).
# - smollm2-135m-1xh200: batch 64 x n 8, 256-token responses, lr 1e-5, mini-batch 32, micro 64, vLLM
#   pool 0.4 and max_num_seqs 1024 (the recipe's; verl's default is 256), KL loss low_var_kl 0.001,
#   format_score 0.1, full test set val at step 0 and every TEST_FREQ steps (default: the end).
# - qwen2-0.5b-lora-1xh100 (issue 14 item 5, random weights: model.source=random on our side):
#   batch 116 x n 5, LoRA r32 alpha 32 all-linear, lr 3e-5, mini-batch 116, 512-token responses
#   (BENCHMARKS 4b's cap), KL loss, entropy 0.001, vLLM pool 0.1, max_num_seqs 512, max_model_len
#   and max_num_batched_tokens 1536, no chunked prefill, param + optimizer offload, gradient
#   checkpointing, no val. Micro-batch MICRO (default 16, not the recipe's 116): verl pads, and 116
#   padded rows of 1,024 tokens make 72 GB of fp32 logits (116 x 1024 x 151,936 x 4 B).
# Attention is SDPA and remove-padding off: verl's defaults (flash_attention_2, and remove-padding
# through flash-attn's varlen kernels) need the flash-attn package, which the GPU image lacks and
# PyPI has only as a source build. TRL must not be importable (tools/device/gpu_issue14.sh setup).
# Val: verl_reward.py's "acc" (strict, no format credit) is val-core/openai/gsm8k/acc/mean@1 and
# "flexible" val-aux/.../flexible/mean@1.
#   [RECIPE=R] [TEST_FREQ=K] [MICRO=M] benchmarks/vs_peers/verl_grpo.sh STEPS DATA_DIR MODEL_DIR [extra hydra overrides]
set -uo pipefail
steps=$1 data=$2 model=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
# The prompts in our flow's order (tasks/stages.step_rows: the recipe shuffles with trainer.seed),
# written once as verl's train file, which verl then reads in order (data.shuffle=False).
recipe=${RECIPE:-smollm2-135m-1xh200}
python3 - "$data" "$steps" "$recipe" <<'PY' || exit 1
import sys
import pandas as pd
from configs.load import load_config
from tasks import stages
data, steps, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config(recipe, [f"data.dir={data}"])
train = pd.read_parquet(f"{data}/train.parquet")
rows = [int(i) for s in range(1, steps + 1) for i in stages.step_rows(len(train), cfg, s)]
train.iloc[rows].to_parquet(f"{data}/verl_train.parquet")
print(f"verl_train.parquet: the {len(rows)} rows our steps 1..{steps} draw, in order")
PY
A=actor_rollout_ref
case $recipe in
  smollm2-135m-1xh200) work=(
    data.train_batch_size=64 data.max_response_length=256
    $A.model.enable_gradient_checkpointing=False
    $A.actor.optim.lr=1e-5 $A.actor.ppo_mini_batch_size=32 $A.actor.ppo_micro_batch_size_per_gpu=64
    $A.actor.entropy_coeff=0 $A.rollout.n=8 $A.rollout.gpu_memory_utilization=0.4
    $A.rollout.max_num_seqs=1024
    $A.rollout.log_prob_micro_batch_size_per_gpu=64 $A.ref.log_prob_micro_batch_size_per_gpu=64
    trainer.test_freq="${TEST_FREQ:-$steps}" trainer.val_before_train=True) ;;
  qwen2-0.5b-lora-1xh100) m=${MICRO:-16}; work=(
    data.train_batch_size=116 data.max_response_length=512
    $A.model.enable_gradient_checkpointing=True
    $A.model.lora_rank=32 $A.model.lora_alpha=32 $A.model.target_modules=all-linear
    $A.actor.optim.lr=3e-5 $A.actor.ppo_mini_batch_size=116 $A.actor.ppo_micro_batch_size_per_gpu=$m
    $A.actor.entropy_coeff=0.001 $A.rollout.n=5 $A.rollout.gpu_memory_utilization=0.1
    $A.rollout.max_num_seqs=512 $A.rollout.max_model_len=1536 $A.rollout.max_num_batched_tokens=1536
    $A.rollout.enable_chunked_prefill=False $A.rollout.load_format=safetensors
    $A.actor.fsdp_config.param_offload=True $A.actor.fsdp_config.optimizer_offload=True
    $A.ref.fsdp_config.param_offload=True
    $A.rollout.log_prob_micro_batch_size_per_gpu=$m $A.ref.log_prob_micro_batch_size_per_gpu=$m
    trainer.test_freq=-1 trainer.val_before_train=False) ;;
  *) echo "verl_grpo.sh: no verl settings for recipe $recipe (smollm2-135m-1xh200 or qwen2-0.5b-lora-1xh100)" >&2; exit 2 ;;
esac
python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
  data.train_files="$data/verl_train.parquet" data.val_files="$data/test.parquet" \
  data.max_prompt_length=512 data.filter_overlong_prompts=True data.truncation=error data.shuffle=False \
  $A.model.path="$model" $A.model.use_remove_padding=False \
  +$A.model.override_config.attn_implementation=sdpa \
  $A.actor.use_kl_loss=True $A.actor.kl_loss_coef=0.001 $A.actor.kl_loss_type=low_var_kl \
  $A.rollout.name=vllm $A.rollout.tensor_model_parallel_size=1 \
  reward.custom_reward_function.path="$here/verl_reward.py" reward.custom_reward_function.name=compute_score \
  trainer.logger='["console"]' trainer.project_name=issue14 trainer.experiment_name="verl-$recipe" \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.save_freq=-1 \
  trainer.total_training_steps="$steps" trainer.total_epochs=1 "${work[@]}" "$@"
