"""Flow `grpo-eval`: test accuracy (greedy mean@1, the env's headline metric) of a model, outside training."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow

from configs.load import load_config, with_overrides
from envs import get_env
from flows.preflight import preflight
from tasks import stages
from tasks.stages import prep


@flow(name="grpo-eval", log_prints=True)
def evaluate_model(config: str = "tiny-cpu", overrides: list[str] | None = None) -> float:
    from engines.worker_group import WorkerGroup

    cfg = load_config(config, with_overrides(overrides or [], ["trainer.resume_mode=disable"]))  # no resume guard
    preflight(cfg)
    model_dir, tokenizer, _, test = prep(cfg)
    if cfg.data.val_max_samples:
        test = test.iloc[: cfg.data.val_max_samples]
    workers = WorkerGroup(cfg, model_dir)
    try:
        metrics, _ = stages.evaluate(workers, tokenizer, test, cfg, step=0)
    finally:
        workers.shutdown()
    return metrics[get_env(cfg.data.data_source).val_key()]


def checkpoint_export(target: Path) -> Path | None:
    """The HF export of a checkpoint directory (global_step_<N>/huggingface); None if target is not
    a checkpoint. Raises ValueError naming trainer.export_hf when the checkpoint has no export."""
    hf = target / "huggingface"
    if hf.is_dir():
        return hf
    if not target.is_dir() or not (re.fullmatch(r"global_step_\d+", target.name) or (target / "actor").is_dir()):
        return None
    raise ValueError(
        f"{target} has no HF export (huggingface/): checkpoints get one as trainer.export_hf says "
        "(default last: the final step's only); evaluate that one, or train with "
        "trainer.export_hf=every_save"
    )
