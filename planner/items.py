"""What every memory branch of the planner shares: the GiB unit, one row of the itemised table,
the features of the trainer a plan models, and the summary a trainer branch hands to the phases.

The branches (planner/fsdp.py, planner/megatron.py, planner/vllm_memory.py, planner/host.py)
each compute their items as functions returning an `Item`; planner/memory.py adds vLLM's items
and the phases to a trainer branch's `TrainerMemory`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

GIB = 2**30
"""Bytes in one GiB: the unit of every table row, of GPU.mem_gib and of trainer.node_ram_gb."""


@dataclass(frozen=True)
class Item:
    """One row of the plan's table. nbytes: bytes on one GPU (or one rank's host RAM), printed in
    GiB (nbytes / GIB). phase: when the GPU holds it, "both" (rollout and training), "train",
    "rollout" or "-" (shown for comparison, not summed); None for a host row, which has no phase."""

    name: str
    phase: str | None
    nbytes: float
    note: str

    def row(self) -> dict:
        """The row as `grpo plan --json` prints it: item, phase (GPU rows only), gib, note."""
        if self.phase is None:
            return dict(item=self.name, gib=self.nbytes / GIB, note=self.note)
        return dict(item=self.name, phase=self.phase, gib=self.nbytes / GIB, note=self.note)


@dataclass(frozen=True)
class TrainerFeatures:
    """What the FSDP2 trainer (engines/trainer/) does with the knobs the schema has. The default,
    TRAINER_IMPLEMENTS, is the trainer of this build: flip a default when the trainer implements
    it; `grpo plan --as-configured` plans every one on (`all_on`); benchmarks/plan_check.py plans
    the older trainers its measurements ran on by passing other values. The Megatron branch reads
    none of them: it plans the configured layout and offload switches."""

    fsdp_shard: bool = True  # FSDP2 shards the trainer state over the world
    fused_adamw: bool = True  # torch AdamW(fused=True): no optimizer-step temporary
    param_offload: bool = True  # actor.param_offload moves weights (+ grads, reference) to host
    optimizer_offload: bool = True  # actor.optimizer_offload moves the AdamW moments to host
    dynamic_bsz: bool = True  # actor.use_dynamic_bsz cuts micro-batches by tokens
    remove_padding: bool = True  # model.use_remove_padding packs a micro-batch into one row
    fused_logprobs: bool = True  # model.use_fused_kernels: liger's chunked log-probs, no whole logits
    empty_cache_between_phases: bool = False  # the trainer releases its cached blocks for vLLM

    @classmethod
    def all_on(cls) -> TrainerFeatures:
        """Every feature on: the config's knobs as the config states them."""
        return cls(**{field.name: True for field in fields(cls)})


TRAINER_IMPLEMENTS = TrainerFeatures()


@dataclass(frozen=True)
class TrainerMemory:
    """A trainer branch's bytes on one GPU, for the phases (planner/memory.py).

    items: its table rows. resident: bytes kept between phases (weights, gradients, optimizer
    state, reference). offloaded: the part of resident that leaves for host RAM while vLLM
    generates. at_vllm_init: bytes the trainer holds when vLLM starts (after the load, before any
    gradient or moment exists). update / log_prob / optimizer_step: the peak of each phase.
    shard: the FSDP shard count (1 for a replica, and for Megatron, which splits by its layout).
    n_params: the model's parameters; n_trainable: those the optimizer updates."""

    items: list[Item]
    resident: float
    offloaded: float
    at_vllm_init: float
    update: float
    log_prob: float
    optimizer_step: float
    shard: int
    n_params: int
    n_trainable: int

    @property
    def peak(self) -> float:
        """Bytes at the trainer's peak: the largest of its three phases."""
        return max(self.update, self.log_prob, self.optimizer_step)
