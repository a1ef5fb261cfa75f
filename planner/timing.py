"""`grpo plan`'s FLOPs and seconds per stage of a step, from the shape and the GPU's datasheet
(planner/hardware.py: the same FLOP count as the trainer's perf/mfu/actor) at assumed
efficiencies: worst case, every response at max length."""

from __future__ import annotations

import math
from typing import Any

from configs.schema import GRPOConfig
from engines.batching import on_policy
from planner.hardware import GPU, forward_flops
from planner.items import GIB
from planner.shapes import Shape

ASSUMED_MFU = 0.40
"""Share of dense bf16 peak a training/prefill matmul pass reaches (stated, not measured)."""
ASSUMED_BW_EFF = 0.70
"""Share of HBM bandwidth a vLLM decode step reaches (stated, not measured)."""


def step_timing(cfg: GRPOConfig, shape: Shape, gpu: GPU, mem: dict, micro: int) -> dict[str, Any]:
    """FLOPs (whole step, all GPUs) and seconds per stage (per GPU, all GPUs in parallel)."""
    actor, rollout, model = cfg.actor, cfg.rollout, cfg.model
    world, rollout_tp = cfg.world_size, rollout.tensor_model_parallel_size
    n_params, layers, hidden = mem["n_params"], shape.layers, shape.hidden
    prompt, resp = cfg.data.max_prompt_length, rollout.max_response_length
    seq = prompt + resp
    samples = cfg.data.train_batch_size * rollout.n
    peak = gpu.bf16_tflops * 1e12
    forward = forward_flops(n_params, layers, hidden, [seq] * samples)  # every sample at full length
    old_pass = 0 if on_policy(samples, cfg) else 1  # an on-policy step has no old_log_prob pass
    flops = {
        "gen": forward,
        "old_log_prob": old_pass * forward,
        "ref": forward,
        "update_actor": actor.ppo_epochs * 3 * forward,
    }  # forward + backward, as perf/mfu/actor counts
    # gen: prefill is compute-bound; decode re-reads weights and the live KV cache each token.
    engines = world // rollout_tp
    per_engine = math.ceil(samples / engines)
    kv_seqs = mem["vllm_kv_gib"] * GIB / shape.kv_bytes_per_token(rollout_tp) / (rollout.max_model_len or seq)
    conc = max(1, min(per_engine, rollout.max_num_seqs, int(kv_seqs)))
    waves = math.ceil(per_engine / conc)
    step_bytes = mem["vllm_weights_gib"] * GIB + conc * (prompt + resp / 2) * shape.kv_bytes_per_token(rollout_tp)
    step_s = max(
        step_bytes / (gpu.hbm_tbs * 1e12 * ASSUMED_BW_EFF), 2 * n_params / rollout_tp * conc / (peak * ASSUMED_MFU)
    )
    prefill_s = 2 * n_params * per_engine * prompt / rollout_tp / (peak * ASSUMED_MFU)
    lora, checkpointing = model.lora_rank > 0, model.enable_gradient_checkpointing
    # hardware passes per token relative to one forward: LoRA skips weight grads; checkpointing recomputes
    passes = (2 if lora else 3) + (1 if checkpointing else 0)
    seconds = {
        "gen": prefill_s + waves * resp * step_s,
        "old_log_prob": old_pass * forward / world / (peak * ASSUMED_MFU),
        "ref": forward / world / (peak * ASSUMED_MFU) if actor.use_kl_loss else 0.0,
        "update_actor": actor.ppo_epochs * passes * forward / world / (peak * ASSUMED_MFU),
    }
    if not lora:  # bf16 copy of each weight into vLLM: read fp32 + write bf16 on the GPU
        seconds["update_weights"] = 6 * n_params / rollout_tp / (gpu.hbm_tbs * 1e12 * ASSUMED_BW_EFF)
    seconds["step"] = sum(seconds.values())
    flops["step"] = sum(flops.values())
    return dict(
        flops=flops,
        time_s=seconds,
        gen_concurrency=conc,
        gen_waves=waves,
        kv_full_seqs=kv_seqs,
        predicted_mfu_update=flops["update_actor"] / world / seconds["update_actor"] / peak,
    )
