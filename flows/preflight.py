"""Before any work: every check that needs no Ray and no accelerator, each error one line naming
the input and the fix (`preflight`), and whether a checkpoint left in trainer.default_local_dir
fits this config (`model_signature`, `check_resumable`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from configs.schema import GRPOConfig
from configs.text import count
from engines.models import is_hub_id
from runtime import checkpoints
from runtime.tracking import check_tracking_uri
from tasks.prep import load_raw_gsm8k


def preflight(cfg: GRPOConfig) -> None:
    """Checks that need no Ray and no accelerator; each error names the input and the fix."""
    if cfg.requires:
        raise ValueError(f"recipe '{cfg.recipe}' cannot run in this build: {cfg.requires}")
    from engines.rollout import ROLLOUTS
    from engines.trainer import TRAINERS

    TRAINERS.get(cfg.actor.strategy)  # a backend this build has: one line naming the key, else
    ROLLOUTS.get(cfg.rollout.name)
    if cfg.trainer.device == "cuda" and not os.environ.get("RAY_ADDRESS"):
        from engines.worker_group import local_gpu_count

        have = local_gpu_count()
        if have < cfg.world_size:
            raise ValueError(
                f"recipe '{cfg.recipe}' needs {count(cfg.world_size, 'GPU')} (trainer.device=cuda) but this machine "
                f"has {have}; run it on a GPU machine or a Ray cluster (RAY_ADDRESS), or use a *-cpu recipe"
            )
    if cfg.model.source == "hf" and not is_hub_id(cfg.model.path):
        from engines.models import check_hf_dir

        try:  # config, weights, tokenizer, chat template
            check_hf_dir(Path(cfg.model.path))
        except ValueError as e:
            raise ValueError(f"model.path={cfg.model.path}: {e}") from None
    if cfg.model.lora_rank > 0 and (
        cfg.model.source == "random" or cfg.model.source == "hf" and not is_hub_id(cfg.model.path)
    ):
        from engines.models import check_lora_targets

        check_lora_targets(
            cfg.model.target_modules,
            arch=cfg.model.arch,
            model_dir=cfg.model.path if cfg.model.source == "hf" else None,
        )
    for key, path in (("trainer.default_local_dir", cfg.checkpoint_dir), ("data.dir", cfg.data.dir)):
        _check_writable(key, Path(path))
    check_tracking_uri(cfg)
    check_resumable(cfg)
    from tasks.reward import load_reward_fn

    load_reward_fn(cfg.reward.function, cfg.reward.gsm8k_scorer)  # a reward that does not import: before any work
    src = cfg.data.source
    if not is_hub_id(src):
        if not Path(src).expanduser().exists():
            raise ValueError(
                f"data.source={src}: path does not exist; point it at a directory with "
                "train/test jsonl or parquet, or use the hub id openai/gsm8k"
            )
        load_raw_gsm8k(src)  # columns, emptiness, ground truths: checked before any work


def model_signature(cfg: GRPOConfig) -> dict:
    """What a checkpoint must match to be resumed by this config: model shape and LoRA (the world
    size is recorded, not required: checkpoints reshard). The shape is the planner's (local
    config.json, preset or published table); None if unknown."""
    from planner.shapes import model_shape

    try:
        s, _ = model_shape(cfg)
        shape = {
            "hidden": s.hidden,
            "layers": s.layers,
            "heads": s.heads,
            "kv_heads": s.kv_heads,
            "intermediate": s.intermediate,
        }
    except ValueError:  # a hub model outside the planner's table: its path stands in
        shape = None
    sig = {
        "model.path": cfg.model.path,
        "shape": shape,
        "model.lora_rank": cfg.model.lora_rank,
        "world_size": cfg.world_size,
        "actor.strategy": _state_format(cfg.actor.strategy),
    }
    if cfg.actor.strategy == "megatron":  # its state is per tensor-parallel rank (megatron_checkpoint.py)
        sig["actor.megatron.tensor_model_parallel_size"] = cfg.actor.megatron.tensor_model_parallel_size
    return sig


def _state_format(strategy: str | None) -> str:
    """The training-state format a backend writes: fsdp and fsdp2 (and checkpoints from before the
    key was recorded) write DCP shards, megatron per-tp-rank files."""
    return "fsdp2" if strategy in (None, "fsdp") else strategy


def check_resumable(cfg: GRPOConfig) -> None:
    """A checkpoint left in trainer.default_local_dir by another model is named before any work,
    not discovered as a shape error once the workers are up."""
    root = Path(cfg.checkpoint_dir)
    latest = checkpoints.read_latest(root)
    state_file = checkpoints.step_dir(root, latest) / "trainer_state.json" if latest is not None else None
    if cfg.trainer.resume_mode != "auto" or state_file is None or not state_file.is_file():
        return
    try:
        saved = json.loads(state_file.read_text()).get("model")
    except ValueError:
        return  # a damaged checkpoint: newest_valid() names it and falls back at resume
    if not saved:
        return
    want = model_signature(cfg)
    model_key = "shape" if saved.get("shape") and want["shape"] else "model.path"  # shapes when both known
    saved["actor.strategy"] = _state_format(saved.get("actor.strategy"))
    keys = (model_key, "model.lora_rank", "actor.strategy", "actor.megatron.tensor_model_parallel_size")
    diff = [k for k in keys if k in want and saved.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k}: checkpoint {saved.get(k)} vs config {want[k]}" for k in diff)
        raise ValueError(
            f"trainer.default_local_dir={cfg.trainer.default_local_dir}: its checkpoint "
            f"{state_file.parent.name} was written for another model ({what}); use another "
            "trainer.default_local_dir, or trainer.resume_mode=disable to start over there"
        )


def _check_writable(key: str, path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (nothing is created here)."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path}: {p} is not a writable directory; choose a writable location")
