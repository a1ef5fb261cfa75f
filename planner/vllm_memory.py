"""`grpo plan`'s vLLM on one GPU: its budget and what fills it (weights, activations, KV cache).

vLLM may hold rollout.gpu_memory_utilization x the GPU's memory: its weights (bf16, its TP shard),
the activations its start-up profile run measured, and a KV cache of whatever is left. Any
trainer branch (planner/fsdp.py, planner/megatron.py) shares the GPU with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import GRPOConfig
from engines.models import VLLM_MAX_LORA_RANKS
from planner.hardware import GPU
from planner.items import GIB, Item
from planner.shapes import Shape

VLLM_NON_TORCH_GIB = 0.5
"""GiB of CUDA graphs, cuBLAS/NCCL workspaces inside vLLM's budget, not counted by torch (rough,
stated, not measured). It stays on the GPU while vLLM sleeps."""


@dataclass(frozen=True)
class RolloutMemory:
    """vLLM's bytes on one GPU. items: its table rows. budget: util x GPU memory. weights: its
    weights (+ a LoRA slot). activations: the profiled activation peak torch counts; other: that
    plus VLLM_NON_TORCH_GIB. kv_cache: budget - weights - other, negative when nothing is left."""

    items: list[Item]
    budget: float
    weights: float
    activations: int
    other: float
    kv_cache: float


def vllm_budget(cfg: GRPOConfig, gpu: GPU) -> float:
    """Bytes vLLM may take: rollout.gpu_memory_utilization x GPU memory (GPU.mem_gib x GIB)."""
    return cfg.rollout.gpu_memory_utilization * gpu.mem_gib * GIB


def vllm_lora_slot_rank(lora_rank: int) -> int:
    """The max_lora_rank vLLM is started with: the smallest rung of its ladder
    (engines.models.VLLM_MAX_LORA_RANKS) at or above model.lora_rank."""
    return next((rung for rung in VLLM_MAX_LORA_RANKS if lora_rank <= rung), 10**9)


def vllm_weights(shape: Shape, n_params: int, lora_rank: int, rollout_tp: int) -> Item:
    """vLLM's bf16 weights on one GPU: 2 B x P / TP, plus with LoRA one adapter slot at its
    max_lora_rank on every Linear, 2 B x Shape.lora_params(rank, all-linear) / TP."""
    nbytes = 2 * n_params / rollout_tp
    if lora_rank > 0:
        nbytes += 2 * shape.lora_params(vllm_lora_slot_rank(lora_rank), "all-linear") / rollout_tp
    return Item("vLLM weights (bf16)", "rollout", nbytes, f"/ TP {rollout_tp}" if rollout_tp > 1 else "whole model")


def vllm_profiled_tokens(cfg: GRPOConfig) -> int:
    """Tokens of vLLM's start-up profile run: rollout.max_num_batched_tokens, else its default
    max(max_model_len, 8192), max_model_len defaulting to prompt + response."""
    rollout = cfg.rollout
    seq = cfg.data.max_prompt_length + rollout.max_response_length
    return rollout.max_num_batched_tokens or max(rollout.max_model_len or seq, 8192)


def vllm_activation_bytes(cfg: GRPOConfig, shape: Shape) -> int:
    """Activation bytes of vLLM's profile run (rough, stated, not measured): per profiled token
    4 B x I / TP (the MLP's bf16 gate and up) + 8 B x h, plus 8 B x V per sequence of
    rollout.max_num_seqs (the sampler's logits)."""
    rollout = cfg.rollout
    tokens = vllm_profiled_tokens(cfg)
    per_token = 4 * shape.intermediate // rollout.tensor_model_parallel_size + 8 * shape.hidden
    return tokens * per_token + 8 * rollout.max_num_seqs * shape.vocab


def vllm_memory(cfg: GRPOConfig, shape: Shape, gpu: GPU, n_params: int) -> RolloutMemory:
    """vLLM's three rows (weights, activations + CUDA graphs, KV cache) and its budget's split."""
    rollout = cfg.rollout
    budget = vllm_budget(cfg, gpu)
    weights = vllm_weights(shape, n_params, cfg.model.lora_rank, rollout.tensor_model_parallel_size)
    activations = vllm_activation_bytes(cfg, shape)
    other = activations + VLLM_NON_TORCH_GIB * GIB
    kv_cache = budget - weights.nbytes - other
    items = [
        weights,
        Item("vLLM activations + CUDA graphs", "rollout", other, f"profiled at {vllm_profiled_tokens(cfg)} tokens"),
        Item(
            "vLLM KV cache",
            "rollout",
            max(kv_cache, 0),
            f"rest of util {rollout.gpu_memory_utilization} x {gpu.mem_gib:.1f} GiB",
        ),
    ]
    return RolloutMemory(items, budget, weights.nbytes, activations, other, kv_cache)
