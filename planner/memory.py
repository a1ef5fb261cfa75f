"""`grpo plan`'s GPU memory: what one GPU holds, item by item, in each phase of a step.

Pure arithmetic on config numbers: no CUDA, no model weights, no network. The trainer's items come
from its backend's branch (planner/fsdp.py for actor.strategy fsdp/fsdp2, planner/megatron.py for
megatron), vLLM's from planner/vllm_memory.py; here they become the phases and the peak.

Peak, the number that must fit on one GPU, is trainer peak + vLLM's budget (util x GPU memory):
- torch.cuda.max_memory_allocated counts vLLM's blocks even while vLLM sleeps (its CuMem pool
  unmaps memory behind torch's back: vllm-project/vllm#17117, #33625), so it reads the same sum;
- without offload, the trainer's cached blocks stay reserved when vLLM wakes for the next
  rollout: the same sum must fit. With offload (or empty_cache between phases) the trainer
  releases its cache, so peak = max(rollout phase, training phase).
"""

from __future__ import annotations

from typing import Any

from configs.schema import GRPOConfig
from planner.fsdp import LOGIT_BYTES, LogitBytes, fsdp_trainer_memory
from planner.hardware import GPU
from planner.items import GIB, TrainerFeatures, TrainerMemory
from planner.megatron import MEGATRON_STRATEGY, megatron_trainer_memory
from planner.shapes import Shape
from planner.vllm_memory import VLLM_NON_TORCH_GIB, RolloutMemory, vllm_memory


def trainer_memory(
    cfg: GRPOConfig,
    shape: Shape,
    features: TrainerFeatures,
    micro: int,
    fsdp: bool | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> TrainerMemory:
    """The trainer branch of cfg.actor.strategy: Megatron's, else FSDP2's (which also plans an
    unmodelled strategy, as an FSDP2 replica: planner/__init__.py says NOT MODELLED then)."""
    if cfg.actor.strategy == MEGATRON_STRATEGY:
        return megatron_trainer_memory(cfg, shape, micro)
    return fsdp_trainer_memory(cfg, shape, features, micro, fsdp, logit_bytes)


def phase_bytes(
    trainer: TrainerMemory, rollout: RolloutMemory, releases_cache: bool, vllm_sleeps: bool = True
) -> tuple[float, float]:
    """(rollout phase, training phase) bytes on one GPU.

    releases_cache (offload, or empty_cache between phases; engines/trainer/offload.py empties the
    cache): the rollout phase holds what stays resident and vLLM's budget, the training phase the
    trainer's peak and vLLM's non-torch part (level-1 sleep: weights to host, KV freed). Else the
    trainer's cached blocks stay reserved when vLLM wakes: resident + budget, and peak + budget.
    vllm_sleeps False (rollout.free_cache_engine false: vLLM stays awake between steps): its whole
    budget, weights and KV cache, stays on the GPU while the trainer works: peak + budget."""
    resident = trainer.resident - trainer.offloaded if releases_cache else trainer.resident
    if releases_cache and vllm_sleeps:
        return resident + rollout.budget, trainer.peak + VLLM_NON_TORCH_GIB * GIB
    return resident + rollout.budget, trainer.peak + rollout.budget


def gpu_memory(
    cfg: GRPOConfig,
    shape: Shape,
    gpu: GPU,
    features: TrainerFeatures,
    micro: int,
    fsdp: bool | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> dict[str, Any]:
    """Itemised per-GPU memory for a micro-batch of `micro` samples, the phase totals and the peak
    (every `*_gib` in GiB). fsdp: the FSDP branch runs FSDP2 (default: when sharded over several
    GPUs; True also plans FSDP2 on one GPU). features, logit_bytes: the trainer modelled
    (planner/items.py TrainerFeatures, planner/fsdp.py LogitBytes)."""
    trainer = trainer_memory(cfg, shape, features, micro, fsdp, logit_bytes)
    rollout = vllm_memory(cfg, shape, gpu, trainer.n_params)
    releases_cache = features.empty_cache_between_phases or bool(trainer.offloaded)
    rollout_phase, train_phase = phase_bytes(trainer, rollout, releases_cache, cfg.rollout.free_cache_engine)
    peak = max(rollout_phase, train_phase)
    total = gpu.mem_gib * GIB
    # vLLM starts after the trainer loads: its budget must fit beside what the trainer holds then.
    vllm_init_ok = trainer.at_vllm_init + rollout.budget <= total
    return dict(
        items=[item.row() for item in trainer.items + rollout.items],
        shard=trainer.shard,
        n_params=trainer.n_params,
        n_trainable=trainer.n_trainable,
        seq_len=cfg.data.max_prompt_length + cfg.rollout.max_response_length,
        trainer_phases_gib=dict(
            update=trainer.update / GIB, log_prob=trainer.log_prob / GIB, optimizer_step=trainer.optimizer_step / GIB
        ),
        trainer_resident_gib=trainer.resident / GIB,
        trainer_peak_gib=trainer.peak / GIB,
        vllm_budget_gib=rollout.budget / GIB,
        vllm_weights_gib=rollout.weights / GIB,
        vllm_kv_gib=max(rollout.kv_cache, 0) / GIB,
        rollout_phase_gib=rollout_phase / GIB,
        train_phase_gib=train_phase / GIB,
        peak_gib=peak / GIB,
        # vLLM's non-torch part is not torch's: max_memory_allocated sees its activations only.
        torch_max_allocated_gib=(trainer.peak + rollout.budget - rollout.other + rollout.activations) / GIB,
        vllm_init_ok=vllm_init_ok,
        vllm_awake=not cfg.rollout.free_cache_engine,
        vllm_kv_ok=rollout.kv_cache > 0,
        fits=peak <= total and rollout.kv_cache > 0 and vllm_init_ok,
    )


def largest_micro_batch(
    cfg: GRPOConfig,
    shape: Shape,
    gpu: GPU,
    features: TrainerFeatures,
    cap: int = 1 << 16,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> int:
    """Largest micro-batch (samples) whose plan fits, up to cap; 0 when not even 1 does. Memory
    grows with the micro-batch, so bisect."""

    def fits(micro: int) -> bool:
        return gpu_memory(cfg, shape, gpu, features, micro, logit_bytes=logit_bytes)["fits"]

    if not fits(1):
        return 0
    low, high = 1, cap  # low fits; every size above high does not
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low
