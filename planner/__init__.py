"""`grpo plan`: per-GPU memory, FLOPs and step time of a recipe, and the host RAM of a rank and a
node, from config numbers alone (no CUDA, no weights, no network; never runs on a worker).

    memory.py       what one GPU holds in each phase: a trainer branch + vLLM, the peak
    fsdp.py         the FSDP2 trainer's items (actor.strategy fsdp/fsdp2), activations, logits
    megatron.py     the Megatron trainer's items (actor.strategy megatron): its TP x DP layout
    vllm_memory.py  vLLM's budget, weights, activations and KV cache on one GPU
    host.py         what one rank and one node hold in host RAM (offload, vLLM asleep, load peak)
    items.py        the GiB unit, a table row, the trainer features a plan models
    timing.py       FLOPs and seconds per stage
    hardware.py     the GPU table and the FLOP count, shared with the trainer's perf/mfu/actor
    shapes.py       the model's shape: config.json, a preset, or a published hub config
    report.py       the table `grpo plan` prints"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from configs.schema import GRPOConfig
from engines.models import head_split_problem
from planner.fsdp import FSDP_STRATEGIES, LOGIT_BYTES, LogitBytes
from planner.hardware import gpu_of
from planner.host import host_memory
from planner.items import TRAINER_IMPLEMENTS, TrainerFeatures
from planner.megatron import MEGATRON_STRATEGY, megatron_layout
from planner.memory import gpu_memory, largest_micro_batch
from planner.report import format_plan
from planner.shapes import Shape, model_shape
from planner.timing import step_timing

__all__ = ["LOGIT_BYTES", "LogitBytes", "TRAINER_IMPLEMENTS", "TrainerFeatures", "format_plan", "plan"]


def modelled(cfg: GRPOConfig) -> bool:
    """Whether the planner has a branch for this trainer backend: FSDP2 or Megatron (whose LoRA
    configs/schema.py refuses, so planner/megatron.py plans full fine-tuning only)."""
    return cfg.actor.strategy in FSDP_STRATEGIES or cfg.actor.strategy == MEGATRON_STRATEGY


def megatron_split_problem(cfg: GRPOConfig, shape: Shape) -> str | None:
    """Why Megatron's tensor parallelism cannot split this model (None when it can), by the
    backend's own rule (engines/trainer/megatron_weights.py QwenShape.check_tp: TP divides the
    key-value heads, the attention heads, the vocabulary and the intermediate size)."""
    from engines.trainer.megatron_weights import QwenShape

    split = QwenShape(
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.head_size,
        shape.vocab,
        shape.tie,
    )
    try:
        split.check_tp(cfg.actor.megatron.tensor_model_parallel_size)
    except ValueError as error:
        return str(error)
    return None


def shape_problems(cfg: GRPOConfig, shape: Shape) -> list[str]:
    """Head-count divisibility the config alone cannot check (it needs the model's shape): each
    one a reason the run would be refused at start-up, so the plan's verdict is INVALID."""
    ulysses = head_split_problem(
        "actor.ulysses_sequence_parallel_size", cfg.actor.ulysses_sequence_parallel_size, shape.heads, shape.kv_heads
    )
    vllm_tp = head_split_problem(
        "rollout.tensor_model_parallel_size", cfg.rollout.tensor_model_parallel_size, shape.heads, shape.kv_heads
    )
    megatron = megatron_split_problem(cfg, shape) if cfg.actor.strategy == MEGATRON_STRATEGY else None
    return [problem for problem in (ulysses, vllm_tp and f"{vllm_tp} (vLLM refuses it)", megatron) if problem]


def samples_per_rank(cfg: GRPOConfig) -> int:
    """Samples one data-parallel rank gets per mini-batch: ppo_mini_batch_size x rollout.n over the
    data-parallel ranks (FSDP2: world / Ulysses; Megatron: world / TP, the GPUs of one model
    replica sharing its samples). A micro-batch must divide it (configs/schema.py)."""
    actor = cfg.actor
    samples = actor.ppo_mini_batch_size * cfg.rollout.n
    if actor.strategy == MEGATRON_STRATEGY:
        return samples // megatron_layout(cfg).data_parallel
    return samples * actor.ulysses_sequence_parallel_size // cfg.world_size


def largest_dividing(limit: int, total: int) -> int:
    """Largest divisor of total that is at most limit (0 if limit < 1): a micro-batch must divide
    the samples one rank gets per mini-batch (configs/schema.py)."""
    return next((divisor for divisor in range(min(limit, total), 0, -1) if total % divisor == 0), 0)


def plan(
    cfg: GRPOConfig,
    gpu: str | None = None,
    *,
    as_configured: bool = False,
    micro_batch: int | None = None,
    fsdp: bool | None = None,
    features: TrainerFeatures | None = None,
    logit_bytes: LogitBytes = LOGIT_BYTES,
) -> dict[str, Any]:
    """Every number of the plan, as a dict (GiB, seconds, FLOPs): for tables and for benchmarks.

    gpu: a GPUS name (default: from the recipe's name, else H100). as_configured: every feature on.
    micro_batch: samples per micro-batch (default: the config's, or its token budget's with
    actor.use_dynamic_bsz). fsdp: plan FSDP2 even on one GPU (planner/fsdp.py). features: the
    trainer modelled (default TRAINER_IMPLEMENTS; benchmarks/plan_check.py plans older trainers
    so). logit_bytes: the FSDP trainer's logits bytes per element (likewise). Raises ValueError for
    a model shape or GPU it does not know, or a Megatron layout the world cannot hold."""
    features_now = TrainerFeatures.all_on() if as_configured else (features or TRAINER_IMPLEMENTS)
    shape, shape_src = model_shape(cfg)
    gpu_spec, gpu_src = gpu_of(cfg, gpu)
    actor = cfg.actor
    micro = micro_batch or actor.ppo_micro_batch_size_per_gpu
    if micro_batch is None and features_now.dynamic_bsz and actor.use_dynamic_bsz:
        # The trainer's budget counts padded tokens, rows x (longest prompt + longest response)
        # (engines/batching.py): at full-length samples, as planned here, that many rows (>= 1, the
        # config checks). Shorter prompts let more rows in, so the response logits (rows x R x vocab)
        # of a real micro-batch can exceed this plan's.
        micro = (
            actor.ppo_max_token_len_per_gpu
            * actor.ulysses_sequence_parallel_size
            // (cfg.data.max_prompt_length + cfg.rollout.max_response_length)
        )
    mem = gpu_memory(cfg, shape, gpu_spec, features_now, micro, fsdp, logit_bytes=logit_bytes)
    host = host_memory(cfg, shape, mem["shard"])
    gpu_fits = mem.pop("fits")
    fits = gpu_fits and host["host_fits"]
    problems = shape_problems(cfg, shape)
    is_modelled = modelled(cfg)
    per_rank = samples_per_rank(cfg)
    largest = largest_micro_batch(cfg, shape, gpu_spec, features_now, logit_bytes=logit_bytes)
    megatron = asdict(megatron_layout(cfg)) if actor.strategy == MEGATRON_STRATEGY else None
    return dict(
        verdict="NOT MODELLED" if not is_modelled else "INVALID" if problems else "FITS" if fits else "DOES NOT FIT",
        problems=problems,
        modelled=is_modelled,
        gpu_fits=gpu_fits,
        fits=fits,
        **host,
        recipe=cfg.recipe,
        strategy=actor.strategy,
        requires=cfg.requires,
        mode="as-configured" if as_configured else "current trainer",
        features=asdict(features_now),
        gpu=asdict(gpu_spec),
        gpu_source=gpu_src,
        shape=asdict(shape),
        shape_source=shape_src,
        world_size=cfg.world_size,
        tp=cfg.rollout.tensor_model_parallel_size,
        **({"megatron": megatron} if megatron else {}),
        micro_batch=micro,
        samples_per_gpu_per_minibatch=per_rank,
        largest_micro_batch=largest,
        # What ppo_micro_batch_size_per_gpu may be set to: fits and divides per_rank (dynamic bsz: by tokens).
        largest_valid_micro_batch=largest if actor.use_dynamic_bsz else largest_dividing(largest, per_rank),
        **mem,
        **step_timing(cfg, shape, gpu_spec, mem, micro),
    )
