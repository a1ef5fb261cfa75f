"""Rollout engines: the interface a worker uses (`RolloutEngine`), chosen by `rollout.name`.

    rollout = build_rollout(cfg)            # vLLM today (engines/rollout/vllm.py: "vllm")

An engine is one module here whose class subclasses RolloutEngine and carries
`@ROLLOUTS.register("<name>")`; nothing else changes (engines/registry.py finds it).
"""

from __future__ import annotations

from configs.schema import GRPOConfig
from engines.registry import Registry
from engines.rollout.base import RolloutEngine

ROLLOUTS = Registry("rollout.name", "engines.rollout")


def build_rollout(cfg: GRPOConfig, model_dir: str | None = None, rank: int = 0) -> RolloutEngine:
    """The engine `cfg.rollout.name` names, serving the model of `model_dir` (default cfg.model.path)
    on cfg.trainer.device, as rank `rank` of the run (engines spread over tensor-parallel ranks need
    it). Raises ValueError, one line, for a name this build has no engine for."""
    return ROLLOUTS.get(cfg.rollout.name)(cfg, model_dir or cfg.model.path, rank)


__all__ = ["ROLLOUTS", "RolloutEngine", "build_rollout"]
