"""Flow `grpo-eval`: GSM8K test accuracy (greedy mean@1) of a model, outside training."""
from __future__ import annotations

from prefect import flow

from configs.load import load_config
from flows.grpo import VAL_METRIC, preflight, prep
from tasks import stages


@flow(name="grpo-eval", log_prints=True)
def evaluate_model(config: str = "tiny-cpu", overrides: list[str] | None = None) -> float:
    from engines.worker_group import WorkerGroup

    cfg = load_config(config, [*(overrides or []), "trainer.resume_mode=disable"])  # no training resume guard
    preflight(cfg)
    model_dir, tokenizer, _, test = prep(cfg)
    if cfg.data.val_max_samples:
        test = test.iloc[: cfg.data.val_max_samples]
    workers = WorkerGroup(cfg, model_dir)
    try:
        metrics, _ = stages.evaluate(workers, tokenizer, test, cfg, step=0)
    finally:
        workers.shutdown()
    return metrics[VAL_METRIC]
