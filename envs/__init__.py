"""Datasets as RL environments, by the reference framework's `data_source` string: the registry.

Each env is one module of this package whose `Env` subclass (envs/base.py) carries
`@ENVS.register("<data_source>")`; `data.data_source` picks it (gsm8k.py: "openai/gsm8k"). A name
not registered yet makes the registry import every module here once (engines/registry.py), so a new
dataset is one new file. The dataset-independent parts: prep.py (raw splits -> parquet, cached),
reward.py (the reward hook). Pure Python: no torch, no Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.registry import Registry

if TYPE_CHECKING:
    from configs.schema import GRPOConfig
    from envs.base import Env
    from envs.reward import RewardFn

ENVS = Registry("data.data_source", "envs")


def get_env(data_source: str) -> Env:
    """The env registered for `data_source` (a fresh instance; envs hold no state). Raises
    ValueError, one line naming data.data_source and the data sources this build has, if none is."""
    return ENVS.get(data_source)()


def reward_fn(cfg: GRPOConfig, for_eval: bool = False) -> RewardFn:
    """The run's reward: reward.function (imported, its signature checked) if set, else the built-in
    of data.data_source's env: for training under the reward.* options (`Env.reward`), for the eval
    its accuracy (`Env.compute_score`, never format_score). Raises ValueError (one line) for an
    unknown data source, a path that does not import or an option the env does not support."""
    from envs.reward import import_reward_fn

    if cfg.reward.function and cfg.reward.function.strip():
        return import_reward_fn(cfg.reward.function)
    env = get_env(cfg.data.data_source)
    return env.compute_score if for_eval else env.reward(cfg.reward)
