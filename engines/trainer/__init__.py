"""Trainer backends: the interface a worker uses (`TrainerBackend`), chosen by `actor.strategy`.

    trainer = build_trainer(cfg)            # FSDP2 today (engines/trainer/fsdp.py: "fsdp", "fsdp2")

A backend is one module here whose class subclasses TrainerBackend and carries
`@TRAINERS.register("<strategy>")`; nothing else changes (engines/registry.py finds it).
"""

from __future__ import annotations

from configs.schema import GRPOConfig
from engines.registry import Registry
from engines.trainer.base import TrainerBackend, init_distributed
from engines.types import UpdateBatch

TRAINERS = Registry("actor.strategy", "engines.trainer")


def build_trainer(cfg: GRPOConfig, model_dir: str | None = None, **kwargs) -> TrainerBackend:
    """The backend `cfg.actor.strategy` names, holding the policy of `model_dir` (default
    cfg.model.path) on cfg.trainer.device. kwargs go to the backend (FSDP2: shard, master_dtype).
    Raises ValueError, one line, for a strategy this build has no backend for."""
    return TRAINERS.get(cfg.actor.strategy)(cfg, model_dir or cfg.model.path, **kwargs)


__all__ = ["TRAINERS", "TrainerBackend", "UpdateBatch", "build_trainer", "init_distributed"]
