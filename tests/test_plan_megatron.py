"""`grpo plan`'s Megatron branch (planner/megatron.py): the 32B recipe's table worked by hand, the
per-rank parameter count against the backend's own HF -> megatron-core mapping, and how each
layout switch moves the numbers. The model is of what engines/trainer/megatron.py does: fp32
parameters under bf16 autocast, torch AdamW replicated over DP, no sequence parallelism, the
recompute in backward without autocast."""

import pytest

from configs.load import load_config
from planner import plan
from planner.megatron import layer_bytes_per_token, megatron_layout, params_per_rank
from planner.shapes import Shape

GIB = 2**30
RECIPE = "qwen2-32b-megatron-8xh20"
# Qwen2.5-32B: hidden 5120, 64 layers, 40 query / 8 key-value heads of 128, intermediate 27648,
# vocab 152064, untied, q/k/v biases. The recipe: 8 x H20, Megatron TP 8 (DP 1), micro-batch 1 of
# 2048 + 6144 tokens, recompute, everything offloaded, KL reference, vLLM TP 8 at 0.6 of the GPU.
H, LAYERS, HEADS, KV_DIM, INTER, VOCAB, TP, T, R = 5120, 64, 40, 8 * 128, 27648, 152064, 8, 8192, 6144
P32 = 32_763_876_352
# One TP rank: per layer linear_qkv h x (h + 2 kv), linear_proj h x h, fc1 h x 2I, fc2 I x h, all / 8;
# + the qkv bias / 8 + the two replicated RMSNorms; + embedding and output layer (V / 8 rows each) + final norm.
LINEAR_RANK = (H * (H + 2 * KV_DIM) + H * H + H * 2 * INTER + INTER * H) // TP
LAYER_RANK = LINEAR_RANK + (H + 2 * KV_DIM) // TP + 2 * H
P_RANK = LAYERS * LAYER_RANK + 2 * (VOCAB // TP) * H + H
H20 = (97871 - 481) / 1024 * GIB  # nvidia-smi MiB less 481 MiB (planner/hardware.py)


def _cfg(*overrides):
    return load_config(RECIPE, list(overrides))


def _items(result):
    return {row["item"]: row["gib"] * GIB for row in result["items"]}


def test_params_per_rank_by_hand():
    assert LINEAR_RANK == 60_948_480 and LAYER_RANK == 60_959_616 and P_RANK == 4_096_062_464
    # 1/8 of the model, plus 7/8 of the 129 replicated norm vectors (2 per layer + the final one)
    assert P_RANK == P32 // 8 + 129 * H * 7 // 8


def test_the_32b_recipe_by_hand():
    result = plan(_cfg())
    items = _items(result)
    assert result["verdict"] == "FITS" and result["modelled"] and not result["problems"]
    assert result["megatron"] == dict(
        tensor_parallel=8, data_parallel=1, autocast=True, recompute=True, param_offload=True, optimizer_offload=True
    )
    # State: fp32 weights 4 B, fp32 grads 4 B, AdamW 8 B (not split over DP), bf16 reference 2 B.
    assert items["actor weights (fp32)"] == 4 * P_RANK  # 15.26 GiB
    assert items["gradients (fp32)"] == 4 * P_RANK
    assert items["AdamW states (exp_avg, exp_avg_sq)"] == 8 * P_RANK  # 30.52 GiB
    assert items["reference model (bfloat16)"] == 2 * P_RANK  # 7.63 GiB
    # The score buffer is fp32: linear_qkv's fp32 bias promotes the bf16 query; recompute is fp32 too.
    buffer = 4 * (HEADS // TP) * T * T
    assert items["attention score buffer"] == buffer == 1_342_177_280
    # Recompute: each layer's fp32 input 4h + the final norm's fp32 input and output 8h, per token; one
    # layer recomputed in fp32: norms 16h, (4 q_dim + 4I) x 4 B / TP, 4 B per score, + its fp32 pre-softmax scores.
    kept = LAYERS * 4 * H * T + 8 * H * T
    fp32_layer = (16 * H + 4 * (4 * H + 4 * INTER) // TP + 4 * (HEADS // TP) * T) * T
    recomputed = fp32_layer + 4 * (HEADS // TP) * T * T
    assert kept == 11_072_962_560 and recomputed == (81920 + 65536 + 163840 + 163840) * T == 3_892_314_112
    assert items["activations, recompute on"] == kept + recomputed
    # Without recompute every layer under autocast: norms 16h, (4 q_dim + 4I) x 2 B / TP, 6 B per score.
    autocast_layer = (16 * H + 2 * (4 * H + 4 * INTER) // TP + 6 * (HEADS // TP) * T) * T
    assert autocast_layer == (81920 + 32768 + 245760) * T
    assert items["(activations if recompute off)"] == LAYERS * autocast_layer + 8 * H * T  # 176.3 GiB
    assert items["attention mask"] == 2 * T * T  # [T,T] causal + [1,1,T,T]
    casts = 2 * (LAYERS * LINEAR_RANK + (VOCAB // TP) * H)  # bf16 copy of every matmul weight (7.45 GiB)
    assert items["bf16 weight copies"] == casts == 7_996_047_360
    full, response = T * VOCAB // TP, R * VOCAB // TP  # logit elements: every position, the response
    # Log-prob stage: forward bf16 2 B x full + 4 fp32 copies of the response, backward 5 fp32 copies.
    assert 2 * full + 16 * response < 20 * response
    assert items["logits + fp32 log-prob copies"] == 20 * response == 2_335_703_040
    assert items["gradient all-reduce buffer"] == 0  # DP 1
    # vLLM: bf16 / TP 8; profile at max(8192, max_model_len 8192) tokens + 256 sequences' logits; KV the rest.
    budget = 0.6 * H20
    vllm_weights = 2 * P32 / 8
    vllm_act = 8192 * (4 * INTER // 8 + 8 * H) + 8 * 256 * VOCAB
    assert items["vLLM weights (bf16)"] == vllm_weights
    assert items["vLLM activations + CUDA graphs"] == vllm_act + GIB / 2
    assert items["vLLM KV cache"] == pytest.approx(budget - vllm_weights - vllm_act - GIB / 2, rel=1e-12)
    # Phases. Update: state 18 P_RANK + buffer + mask + kept + the largest of the forward's end (casts +
    # the [T,b,V/8] logits and their transposed copy, 2 x 2 B), the log-prob stage and the recomputed layer.
    forward_end = casts + 4 * full
    assert forward_end > 20 * response and forward_end > recomputed
    update = 18 * P_RANK + buffer + 2 * T * T + kept + forward_end
    # Log-prob pass: the moments stay offloaded (10 P_RANK); casts + one autocast layer > the logits.
    assert autocast_layer > 4 * full and casts + autocast_layer > 2 * full + 12 * response
    log_prob = 10 * P_RANK + buffer + 2 * T * T + casts + autocast_layer
    step = 18 * P_RANK + buffer  # fused AdamW: no temporary
    phases = result["trainer_phases_gib"]
    assert phases["update"] * GIB == update == 94_897_383_424  # 88.38 GiB
    assert phases["log_prob"] * GIB == log_prob and phases["optimizer_step"] * GIB == step
    assert result["trainer_peak_gib"] * GIB == update
    # Everything offloaded but the buffer: rollout = buffer + budget; training = update + vLLM's 0.5 GiB.
    assert result["rollout_phase_gib"] * GIB == pytest.approx(buffer + budget, rel=1e-12)
    assert result["train_phase_gib"] * GIB == update + GIB / 2
    assert result["peak_gib"] * GIB == update + GIB / 2 < H20 and result["fits"]  # 88.88 of 95.11 GiB
    # The TP group shares its samples: 256 prompts x 5 on the one data-parallel rank.
    assert result["samples_per_gpu_per_minibatch"] == 1280


def test_the_32b_recipe_host_by_hand():
    result = plan(_cfg())
    host = {row["item"]: row["gib"] * GIB for row in result["host_items"]}
    assert host["actor weights (fp32)"] == 4 * P_RANK
    assert host["gradients (fp32)"] == 4 * P_RANK
    assert host["reference model (bfloat16)"] == 2 * P_RANK
    assert host["AdamW states (exp_avg, exp_avg_sq)"] == 8 * P_RANK
    # Load: embedding + lm_head read whole (bf16) beat one layer's read (norms, fused qkv + bias, o,
    # gate + up + their fused copy).
    layer_read = 2 * H + (H + 2 * KV_DIM) * (H + 1) + H * H + 4 * INTER * H
    assert layer_read == 629_163_008 < 2 * VOCAB * H + H
    assert host["(load peak: largest HF read)"] == 3 * GIB + 2 * (2 * VOCAB * H + H)  # 5.90 GiB
    node = 8 * (3 * GIB + 18 * P_RANK) + 2 * GIB
    assert result["host_node_gib"] * GIB == node and result["host_fits"]  # 575 of 0.95 x 1007 GiB


def test_per_rank_count_matches_the_backend_mapping():
    """params_per_rank against engines/trainer/megatron_weights.hf_to_mcore, the backend's own HF ->
    megatron-core split (its layout is checked against megatron-core in tests/test_megatron_weights.py):
    the 32B shape at TP 8 and a tied shape at TP 2, on meta tensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engines.models import ARCH_PRESETS
    from engines.trainer.megatron_weights import QwenShape, hf_to_mcore
    from planner.shapes import shape_from_hf

    def rank_numel(preset, tp):
        hf_config = Qwen2Config(**preset)
        with torch.device("meta"):
            state = Qwen2ForCausalLM(hf_config).state_dict()
        split = hf_to_mcore(state, QwenShape.from_hf_config(hf_config), tp=tp)
        return sum(tensor.numel() for tensor in split.values())

    big = ARCH_PRESETS["32b"]
    layout = megatron_layout(_cfg())
    assert params_per_rank(shape_from_hf({**big, "model_type": "qwen2"}), layout) == rank_numel(big, 8) == P_RANK
    small = dict(ARCH_PRESETS["0.5b"], num_hidden_layers=2)
    assert small["tie_word_embeddings"]
    two = megatron_layout(_cfg("actor.megatron.tensor_model_parallel_size=2"))
    assert params_per_rank(shape_from_hf({**small, "model_type": "qwen2"}), two) == rank_numel(small, 2)


def test_two_nodes_replicate_the_optimizer_over_data_parallel_ranks():
    """Two nodes at TP 8: DP 2. Nothing of the state halves (no distributed optimizer); the clip's
    all-reduce over DP copies every gradient into one flat fp32 buffer in the optimizer step."""
    one, two = _items(plan(_cfg())), _items(plan(_cfg("trainer.nnodes=2")))
    for name in ("actor weights (fp32)", "gradients (fp32)", "AdamW states (exp_avg, exp_avg_sq)"):
        assert two[name] == one[name], name
    assert two["gradient all-reduce buffer"] == 4 * P_RANK
    result = plan(_cfg("trainer.nnodes=2"))
    assert result["samples_per_gpu_per_minibatch"] == 640
    assert result["trainer_phases_gib"]["optimizer_step"] * GIB == 22 * P_RANK + 4 * (HEADS // TP) * T * T


def test_recompute_off_keeps_every_layer():
    result = plan(_cfg("model.enable_gradient_checkpointing=false"))
    autocast_layer = (16 * H + 2 * (4 * H + 4 * INTER) // TP + 6 * (HEADS // TP) * T) * T
    assert _items(result)["activations, recompute off"] == LAYERS * autocast_layer + 8 * H * T  # 176.3 GiB
    assert _items(result)["attention score buffer"] == 4 * (HEADS // TP) * T * T  # fp32 forward (qkv bias)
    assert not result["fits"]


def test_layer_bytes_without_the_qkv_bias_and_in_fp32():
    """Per-token layer bytes on a small shape: autocast halves the matmul-side tensors, a score
    costs 6 B under autocast (fp32 softmax + bf16 cast) and 4 B in fp32; the norms' 16h stay whole."""
    shape = Shape(hidden=64, layers=2, heads=8, kv_heads=4, intermediate=128, vocab=256, tie=True, qkv_bias=False)
    layout = megatron_layout(_cfg())
    assert layer_bytes_per_token(shape, layout, 10, autocast=True) == 16 * 64 + 2 * (4 * 64 + 4 * 128) // 8 + 6 * 10
    assert layer_bytes_per_token(shape, layout, 10, autocast=False) == 16 * 64 + 4 * (4 * 64 + 4 * 128) // 8 + 4 * 10


def test_offload_switches_move_the_rollout_phase():
    kept = plan(_cfg("actor.param_offload=false", "actor.optimizer_offload=false"))
    now = plan(_cfg())
    # Nothing offloaded: the whole trainer state (18 B / parameter) and the buffer stay beside vLLM's budget.
    buffer = 4 * (HEADS // TP) * T * T
    assert kept["rollout_phase_gib"] * GIB == pytest.approx(18 * P_RANK + buffer + 0.6 * H20, rel=1e-12)
    assert now["rollout_phase_gib"] < kept["rollout_phase_gib"] and not kept["fits"]


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "actor.megatron.tensor_model_parallel_size=3",
            "actor.megatron.tensor_model_parallel_size*pipeline_model_parallel_size=3 must divide the 8 GPUs",
        ),
        ("actor.megatron.pipeline_model_parallel_size=2", "actor.megatron.pipeline_model_parallel_size=2: this build"),
        ("actor.megatron.sequence_parallel=true", "actor.megatron.sequence_parallel=true needs Transformer Engine"),
    ],
)
def test_layouts_the_backend_refuses_are_one_config_error(override, needle):
    """The planner models no pipeline stages or sequence parallelism: the config refuses them first."""
    with pytest.raises(ValueError) as error:
        _cfg(override)
    assert needle in str(error.value)
