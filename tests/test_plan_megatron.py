"""`grpo plan`'s Megatron branch (planner/megatron.py): the 32B recipe's table worked by hand, the
per-rank parameter count against the backend's own HF -> megatron-core mapping, and how each
layout switch moves the numbers."""

from dataclasses import replace

import pytest

from configs.load import load_config
from planner import plan
from planner.megatron import layer_activation_bytes_per_token, megatron_layout, params_per_rank
from planner.shapes import Shape

GIB = 2**30
RECIPE = "qwen2-32b-megatron-8xh20"
# Qwen2.5-32B: hidden 5120, 64 layers, 40 query / 8 key-value heads of 128, intermediate 27648,
# vocab 152064, untied, q/k/v biases. The recipe: 8 x H20, Megatron TP 8 (PP 1, DP 1), micro-batch 1 of
# 2048 + 6144 tokens, recompute, everything offloaded, vLLM TP 8 at 0.6 of the GPU.
H, LAYERS, HEADS, KV_DIM, INTER, VOCAB, TP, T = 5120, 64, 40, 8 * 128, 27648, 152064, 8, 8192
P32 = 32_763_876_352
# One TP rank: per layer linear_qkv h x (h + 2 kv) and its bias, linear_proj h x h, fc1 h x 2I, fc2 I x h,
# all / 8, + the two replicated RMSNorms; + embedding and output layer (V / 8 rows each) + the final norm.
LAYER_RANK = (H * (H + 2 * KV_DIM) + (H + 2 * KV_DIM) + H * H + H * 2 * INTER + INTER * H) // TP + 2 * H
P_RANK = LAYERS * LAYER_RANK + 2 * (VOCAB // TP) * H + H
H20 = (97871 - 481) / 1024 * GIB  # nvidia-smi MiB less 481 MiB (planner/hardware.py)


def _cfg(*overrides):
    return load_config(RECIPE, list(overrides))


def _items(result):
    return {row["item"]: row["gib"] * GIB for row in result["items"]}


def test_params_per_rank_by_hand():
    assert LAYER_RANK == 60_959_616 and P_RANK == 4_096_062_464
    # 1/8 of the model, plus 7/8 of the 129 replicated norm vectors (2 per layer + the final one)
    assert P_RANK == P32 // 8 + 129 * H * 7 // 8


def test_the_32b_recipe_by_hand():
    result = plan(_cfg())
    items = _items(result)
    assert result["verdict"] == "FITS" and result["modelled"] and not result["problems"]
    assert result["megatron"] == dict(
        tensor_parallel=8,
        pipeline_parallel=1,
        data_parallel=1,
        sequence_parallel=True,
        distributed_optimizer=True,
        recompute=True,
        param_offload=True,
        grad_offload=True,
        optimizer_offload=True,
    )
    # State: bf16 weights 2 B, fp32 grad buffer 4 B, fp32 main params 4 B, AdamW 8 B, bf16 reference 2 B.
    assert items["actor weights (bf16)"] == 2 * P_RANK
    assert items["gradients (fp32 buffer)"] == 4 * P_RANK
    assert items["optimizer main params (fp32)"] == 4 * P_RANK
    assert items["AdamW states (exp_avg, exp_avg_sq)"] == 8 * P_RANK
    assert items["reference model (bf16)"] == 2 * P_RANK
    # One layer per token, sequence parallel: (8h + 8 q_dim + 8I) / TP + 6 B x 40/8 heads x T scores.
    per_token = (8 * H + 8 * H + 8 * INTER) // TP + 6 * (HEADS // TP) * T
    assert per_token == 5120 + 5120 + 27648 + 245760  # norm/Linear inputs, attention, MLP, scores
    one_layer = per_token * T  # 2.16 GiB: recomputed in backward
    kept = LAYERS * 2 * H // TP * T + 2 * (2 * H // TP) * T  # each layer's bf16 input + final norm/output inputs
    assert items["activations, recompute on"] == kept + one_layer == 3_015_704_576
    assert items["(activations if recompute off)"] == LAYERS * one_layer + 2 * (2 * H // TP) * T
    assert items["attention score buffer (bf16)"] == 2 * (HEADS // TP) * T * T
    assert items["attention mask"] == T * T
    logit_elements = T * VOCAB // TP  # every position, 1/8 of the vocabulary
    assert items["logits (vocab-parallel, fwd+bwd)"] == 8 * logit_elements  # bf16 2 + fp32 4 + bf16 grad 2
    assert items["optimizer step temporary"] == 4 * P_RANK  # torch foreach AdamW's sqrt(exp_avg_sq)
    # vLLM: bf16 / TP 8; profile at max(8192, max_model_len 8192) tokens + 256 sequences' logits; KV the rest.
    budget = 0.6 * H20
    vllm_weights = 2 * P32 / 8
    vllm_act = 8192 * (4 * INTER // 8 + 8 * H) + 8 * 256 * VOCAB
    assert items["vLLM weights (bf16)"] == vllm_weights
    assert items["vLLM activations + CUDA graphs"] == vllm_act + GIB / 2
    assert items["vLLM KV cache"] == pytest.approx(budget - vllm_weights - vllm_act - GIB / 2, rel=1e-12)
    # Phases. Update: reference offloaded (18 P_RANK) + buffer + mask + kept + max(logits, one layer).
    update = 18 * P_RANK + 2 * 5 * T * T + T * T + kept + max(8 * logit_elements, one_layer)
    log_prob = 20 * P_RANK + 2 * 5 * T * T + T * T + max(6 * logit_elements, one_layer)
    step = 18 * P_RANK + 4 * P_RANK
    phases = result["trainer_phases_gib"]
    assert phases["update"] * GIB == update and phases["log_prob"] * GIB == log_prob
    assert phases["optimizer_step"] * GIB == step and result["trainer_peak_gib"] * GIB == step  # 83.92 GiB
    # Everything offloaded: rollout = budget alone; training = trainer peak + vLLM's 0.5 GiB non-torch part.
    assert result["rollout_phase_gib"] * GIB == pytest.approx(budget, rel=1e-12)
    assert result["train_phase_gib"] * GIB == step + GIB / 2
    assert result["peak_gib"] * GIB == step + GIB / 2 < H20 and result["fits"]
    # The TP group shares its samples: 256 prompts x 5 on the one data-parallel rank.
    assert result["samples_per_gpu_per_minibatch"] == 1280


def test_the_32b_recipe_host_by_hand():
    result = plan(_cfg())
    host = {row["item"]: row["gib"] * GIB for row in result["host_items"]}
    assert host["actor weights (bf16)"] == 2 * P_RANK
    assert host["reference model (bf16)"] == 2 * P_RANK
    assert host["gradients (fp32 buffer)"] == 4 * P_RANK
    assert host["optimizer main params + AdamW states (fp32)"] == 12 * P_RANK
    assert host["(load peak: whole HF model before slicing)"] == 3 * GIB + 2 * P32  # bf16 HF state dict + process
    node = 8 * (3 * GIB + 20 * P_RANK) + 2 * GIB
    assert result["host_node_gib"] * GIB == node and result["host_fits"]  # 636 of 0.95 x 1007 GiB


def test_per_rank_count_matches_the_backend_mapping():
    """params_per_rank against engines/trainer/megatron_weights.hf_to_mcore, the backend's own HF ->
    megatron-core split (its layout is checked against megatron-core in tests/test_megatron_weights.py):
    the 32B shape at TP 8 on meta tensors, and two pipeline stages of a smaller untied shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engines.models import ARCH_PRESETS
    from engines.trainer.megatron_weights import QwenShape, hf_to_mcore
    from planner.shapes import shape_from_hf

    def rank_numel(preset, tp, layers=None, first=True, last=True):
        hf_config = Qwen2Config(**preset)
        with torch.device("meta"):
            state = Qwen2ForCausalLM(hf_config).state_dict()
        split = hf_to_mcore(
            state, QwenShape.from_hf_config(hf_config), tp=tp, layers=layers, first_stage=first, last_stage=last
        )
        return sum(tensor.numel() for tensor in split.values())

    big = ARCH_PRESETS["32b"]
    layout = megatron_layout(_cfg())
    assert params_per_rank(shape_from_hf({**big, "model_type": "qwen2"}), layout) == rank_numel(big, 8) == P_RANK
    small = dict(ARCH_PRESETS["7b"], num_hidden_layers=4)  # untied lm_head
    two_stages = replace(layout, tensor_parallel=2, pipeline_parallel=2)
    last_stage = rank_numel(small, 2, layers=range(2, 4), first=False)
    assert last_stage > rank_numel(small, 2, layers=range(0, 2), last=False)  # + the final norm
    assert params_per_rank(shape_from_hf({**small, "model_type": "qwen2"}), two_stages) == last_stage


def test_distributed_optimizer_splits_over_data_parallel_ranks():
    """Two nodes at TP 8: DP 2. The main params, moments and step temporary halve; weights, grads,
    reference do not (the distributed optimizer splits only its own state)."""
    one, two = _items(plan(_cfg())), _items(plan(_cfg("trainer.nnodes=2")))
    for name in ("optimizer main params (fp32)", "AdamW states (exp_avg, exp_avg_sq)", "optimizer step temporary"):
        assert two[name] == one[name] / 2, name
    for name in ("actor weights (bf16)", "gradients (fp32 buffer)", "reference model (bf16)"):
        assert two[name] == one[name], name
    assert plan(_cfg("trainer.nnodes=2"))["samples_per_gpu_per_minibatch"] == 640


def test_recompute_off_keeps_every_layer():
    items = _items(plan(_cfg("model.enable_gradient_checkpointing=false")))
    per_token = (8 * H + 8 * H + 8 * INTER) // TP + 6 * (HEADS // TP) * T
    assert items["activations, recompute off"] == LAYERS * per_token * T + 2 * (2 * H // TP) * T  # 138.5 GiB
    assert not plan(_cfg("model.enable_gradient_checkpointing=false"))["fits"]


def test_sequence_parallel_splits_the_norm_and_linear_inputs():
    """Without sequence parallelism the 8h bytes of norm and Linear inputs per token stay whole on each
    TP rank (Korthikanti et al. 2022, Table 2); the rest splits by TP either way."""
    shape = Shape(hidden=64, layers=2, heads=8, kv_heads=4, intermediate=128, vocab=256, tie=True)
    layout = megatron_layout(_cfg())
    tensor_part = (8 * 64 + 8 * 128 + 6 * 8 * 10) / 8  # q_dim = 8 heads x 8 = 64
    assert layer_activation_bytes_per_token(shape, layout, 10) == 8 * 64 / 8 + tensor_part
    no_sp = replace(layout, sequence_parallel=False)
    assert layer_activation_bytes_per_token(shape, no_sp, 10) == 8 * 64 + tensor_part


def test_offload_switches_move_the_rollout_phase():
    kept = plan(_cfg("actor.param_offload=false", "actor.optimizer_offload=false"))
    now = plan(_cfg())
    # Nothing offloaded: the whole trainer state (20 B / parameter) stays beside vLLM's budget.
    assert kept["rollout_phase_gib"] * GIB == pytest.approx(20 * P_RANK + 0.6 * H20, rel=1e-12)
    assert now["rollout_phase_gib"] < kept["rollout_phase_gib"] and not kept["fits"]


def test_a_tensor_parallel_size_the_world_cannot_hold_is_one_error():
    with pytest.raises(ValueError, match="actor.megatron_tensor_parallel_size=3 does not divide the world size 8"):
        plan(_cfg("actor.megatron_tensor_parallel_size=3"))
