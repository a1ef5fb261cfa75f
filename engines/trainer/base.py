"""What a worker needs from a trainer backend (FSDP2 today, Megatron next), and the update batch.

Every method is called on every rank at once; a sharded backend's methods are collectives.
Token ids are plain lists, log-probs float32 numpy arrays: no tensor crosses into the worker group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import numpy as np

from engines.types import UpdateBatch


class TrainerBackend(ABC):
    """The policy (+ reference, optimizer) of one rank, and what the worker asks of it.

    Attributes every backend sets: `tokenizer` (HF), `is_lora` (bool: only an adapter trains and
    goes to the rollout), `n_params` (int, parameters of the policy, adapter included)."""

    tokenizer: object
    is_lora: bool
    n_params: int

    @abstractmethod
    def compute_log_prob(
        self, prompts: list[list[int]], responses: list[list[int]], ref: bool = False
    ) -> list[np.ndarray]:
        """Per-token log-probs (nats, float32, len(responses[i]) each) of each response after its
        prompt, under the policy (old_log_prob) or with ref=True the reference; logits divided by
        rollout.temperature. In the order given."""

    @abstractmethod
    def update(self, batch: UpdateBatch, seed: int, steps: list | None = None) -> dict[str, float]:
        """PPO epochs of the GRPO loss over `batch`, one optimizer step per entry of `steps`
        (index arrays into batch: engines/batching.minibatch_schedule). Returns `actor/*` and
        `perf/*` metrics averaged over the optimizer steps (loss metrics global over ranks).
        batch.old_log_probs None (an on-policy step, engines/batching.on_policy): the update's own
        log-probs, detached, are the old ones, and `training/rollout_probs_diff_*` comes from
        batch.rollout_log_probs; raises ValueError when that would be more than one optimizer step."""

    @abstractmethod
    def weights_for_rollout(self) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
        """Full fine-tuning: every weight, HF-named, whole, in the rollout dtype, one tensor at a
        time (a sharded backend gathers each in turn: every rank must drain it)."""

    @abstractmethod
    def save_adapter(self, out_dir: str) -> None:
        """LoRA: the adapter in peft format into out_dir (rank 0 writes; a collective when sharded)."""

    @abstractmethod
    def save_state(self, ckpt_dir: str) -> list[Path]:
        """Training state (weights or adapter, optimizer, scheduler, RNG) under ckpt_dir/actor,
        loadable at any world size; may run with the state on the host. Returns the files this rank
        wrote (the controller checksums them)."""

    @abstractmethod
    def save_exports(self, ckpt_dir: str, export_hf: bool = True) -> list[Path]:
        """The adapter (LoRA, ckpt_dir/actor/lora_adapter) and with export_hf a plain HF model dir
        (ckpt_dir/huggingface); needs the weights on the device. Returns the files this rank wrote."""

    @abstractmethod
    def load(self, ckpt_dir: str) -> None:
        """Restore save_state's checkpoint. Raises ValueError naming the checkpoint and the model
        when it does not fit."""

    # ---- memory between uses (actor.param_offload / actor.optimizer_offload) ----------------
    @abstractmethod
    def to_host(self) -> None:
        """What the config offloads (weights, reference, optimizer state) into host memory, before
        the rollout engine takes the device. A no-op off CUDA or with nothing offloaded."""

    @abstractmethod
    def to_device(self, optimizer: bool = False) -> None:
        """The weights back on the device for compute; with optimizer, the optimizer state too."""

    @property
    @abstractmethod
    def weights_on_host(self) -> bool:
        """Whether the weights are offloaded now (weights_for_rollout must bring them back)."""


def init_distributed(
    rank: int, world_size: int, master: tuple[str, int], device: str, timeout_s: float = 300.0
) -> None:
    """The trainer's process group: gloo on CPU; on CUDA nccl, with gloo for CPU-side counts.

    Made before vLLM starts, so each colocated engine sees it as an external data-parallel rank.
    master: (address, port) of rank 0's rendezvous. timeout_s (trainer.collective_timeout_s): how
    long a collective waits for a missing rank before it fails (gloo raises; NCCL's watchdog ends
    the process), instead of NCCL's 10 min or more.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master[0]}:{master[1]}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
