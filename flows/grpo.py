"""GRPO on a dataset (data.data_source's env, envs/; GSM8K built in) as one Prefect flow: the single controller.

    prep -> for each step: rollout -> reward (+ advantages) -> update (+ weight sync)
                           -> checkpoint every save_freq -> eval every test_freq

The controller decides what happens; the Ray worker group (engines/) owns the model, optimizer,
reference and vLLM engine and does it. Every iteration lands in one MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.settings import get_current_settings
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from configs.load import load_config
from configs.schema import GRPOConfig
from configs.text import count
from envs import get_env
from flows.preflight import check_resumable, checkpoint_state, in_effect, preflight, resume_changes
from runtime import checkpoints
from runtime.killpoints import StepStages
from runtime.tracking import Tracker, clip_text
from tasks import stages

REQUIRED_STEP_METRICS = (
    "critic/score/mean",
    "actor/pg_loss",
    "actor/kl_loss",
    "actor/entropy",
    "actor/grad_norm",
    "actor/pg_clipfrac",
    "actor/lr",
    "response_length/mean",
    "timing_s/gen",
    "timing_s/update_actor",
    "timing_s/step",
    "perf/throughput",
)
SAMPLE_ROWS, SAMPLE_WIDTH = 8, 200  # the per-step sample table in MLflow: rows, characters per text cell


def step_metrics(samples: pd.DataFrame) -> dict[str, float]:
    lengths = samples["response_ids"].map(len)
    return {
        "critic/score/mean": samples["score"].mean(),
        "critic/score/max": samples["score"].max(),
        "critic/score/min": samples["score"].min(),
        "critic/advantages/mean": samples["advantage"].mean(),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/clip_ratio": (samples["finish_reason"] == "length").mean(),
        "prompt_length/mean": samples["prompt_ids"].map(len).mean(),
        "reward/errors": samples.attrs.get("reward_errors", 0),
    }


def sample_table(samples: pd.DataFrame, batch: pd.DataFrame, step: int) -> dict[str, list]:
    """A few of the step's samples for MLflow: the first prompts' whole groups (so advantages can
    be read against their group's scores), as many as fit SAMPLE_ROWS rows and at least one (at
    most 2 x SAMPLE_ROWS rows), text cut to SAMPLE_WIDTH characters."""
    prompts = list(dict.fromkeys(samples["row"]))
    group = int((samples["row"] == prompts[0]).sum())
    head = samples[samples["row"].isin(prompts[: max(1, SAMPLE_ROWS // group)])].head(2 * SAMPLE_ROWS)
    question = {row: m[-1]["content"] for row, m in zip(batch.index, batch["prompt"])}
    return {
        "step": [step] * len(head),
        "prompt": [clip_text(question[r], SAMPLE_WIDTH) for r in head["row"]],
        "response": [clip_text(t, SAMPLE_WIDTH) for t in head["response_text"]],
        "ground_truth": list(head["ground_truth"]),
        "score": [float(x) for x in head["score"]],
        "advantage": [float(x) for x in head["advantage"]],
        "finish_reason": list(head["finish_reason"]),
    }


def prefect_api_url() -> str | None:
    """The Prefect server this flow reports to; None for the temporary one a run without
    PREFECT_API_URL starts, which ends with the process (and its flow-run ids with it)."""
    return get_current_settings().api.url


def _tags(cfg: GRPOConfig) -> dict[str, str]:
    """MLflow tags linking the run to its Prefect flow run: id and UI address on a lasting server;
    on the temporary one only the name, with `prefect.server=ephemeral` (the id would name
    nothing once the run ends)."""
    tags = {
        "recipe": cfg.recipe,
        "prefect.flow_run_name": str(runtime.flow_run.name),
        "prefect.deployment": str(runtime.deployment.name or ""),
    }
    if prefect_api_url() is None:
        return {**tags, "prefect.server": "ephemeral (gone after the run: set PREFECT_API_URL to keep it)"}
    return {
        **tags,
        "prefect.server": str(prefect_api_url()),
        "prefect.flow_run_id": str(runtime.flow_run.id),
        "prefect.flow_run_url": str(runtime.flow_run.ui_url),
    }


def announce(tracker: Tracker, log) -> None:
    """Say once where the MLflow run is: in the flow run's log and as a Prefect artifact of it."""
    lines = tracker.where()
    for line in lines:
        log.info(line)
    try:
        create_markdown_artifact(
            key="mlflow-run",
            description="the MLflow run of this flow run",
            markdown=(f"**MLflow run** `{tracker.run_id}`\n\n" + "\n".join(f"- {line}" for line in lines[1:])),
        )
    except Exception as e:  # the link is a convenience: never stops training
        log.warning("could not record the MLflow run as a Prefect artifact (%s)", e)


# ---- the flow ----------------------------------------------------------------------------------
# Failures a retry of the flow run cannot mend (bad input, a worker killed for host memory): the
# retry, which Prefect runs in this process, raises the same error at once instead of rebuilding
# the workers to fail the same way.
_FINAL: dict[str, BaseException] = {}


# A failed run (a worker killed, a node lost) is retried once in place: the retry restores the
# newest valid checkpoint and reuses every persisted rollout, so it costs at most the lost step.
@flow(name="grpo", log_prints=True, retries=1, retry_delay_seconds=5)
def grpo(config: str = "tiny-cpu", overrides: list[str] | None = None) -> dict[str, float]:
    """Train a policy with GRPO. `config`: recipe name or YAML path; `overrides`: ["key=value", ...]."""
    from engines.worker_group import WorkerGroup, WorkerOOMError, check_resources

    run_id = str(runtime.flow_run.id)
    if run_id in _FINAL:
        err = _FINAL.pop(run_id)
        print(f"flow run not retried (a retry cannot mend it): {err}")
        raise err
    cfg = load_config(config, overrides or [])
    preflight(cfg)
    log = get_run_logger()
    env = get_env(cfg.data.data_source)
    model_dir, tokenizer, train, test = stages.prep(cfg)
    check_resumable(cfg)  # again, now that a preset model is built: its vocab is known, before Ray
    if cfg.data.val_max_samples:
        test = test.iloc[: cfg.data.val_max_samples]
    total = stages.total_steps(cfg, len(train))
    root = Path(cfg.checkpoint_dir)
    try:  # a cluster too small for the ranks: before the MLflow run and the checkpoint dir exist
        check_resources(cfg)
    except ValueError as e:
        _FINAL[run_id] = e
        raise
    tracker = Tracker(cfg, root, _tags(cfg))
    announce(tracker, log)
    for df, split, context in ((train, "train", "training"), (test, "test", "evaluation")):
        tracker.log_dataset(df, df.attrs.get("path", cfg.data.dir), dataset_name(env, split), context)
    workers, status = None, "FAILED"
    try:
        workers = WorkerGroup(stages.with_total_steps(cfg, total), model_dir)  # the LR schedule's length
        start, restored = 0, {}
        ckpt = checkpoints.newest_valid(root) if cfg.trainer.resume_mode == "auto" else None
        if cfg.trainer.resume_mode == "disable":  # start over: reuse nothing an earlier run persisted
            stages.set_aside_rollouts(root, log)
        if ckpt is not None:
            workers.load_checkpoint(str(ckpt))
            start, restored = checkpoints.step_of(ckpt), in_effect(ckpt)
            log.info("resumed from %s", ckpt)
            for line in resume_changes(cfg, ckpt):  # a changed key of the run's math: refused (ValueError)
                log.info(line)
        # Steps after the checkpoint that a killed run had already logged are replayed, not re-logged.
        logged = tracker.logged_steps("timing_s/step") if tracker.resumed else set()
        if cfg.trainer.val_before_train and start == 0 and 0 not in tracker.logged_steps(env.val_key()):
            tqdm.write(summary(0, total, _evaluate(workers, tokenizer, test, cfg, tracker, step=0), env.val_key()))
        last: dict[str, float] = {}
        # The bar only on a terminal (disable=None); log lines go above it, not into it.
        bar = tqdm(
            range(start + 1, total + 1),
            desc="grpo",
            unit="step",
            file=sys.stderr,
            initial=start,
            total=total,
            disable=None,
        )
        with logging_redirect_tqdm():  # Prefect logs through the root logger's console handler
            for step in bar:
                this = StepStages(step)  # each block: timed (timing_s/*) and a kill point
                batch = train.iloc[stages.step_rows(len(train), cfg, step)]
                with this.stage("rollout", timed="gen"):
                    samples = stages.rollout(workers, tokenizer, batch, cfg, step, root)
                with this.stage("reward", timed="reward"):
                    samples = stages.score.with_options(task_run_name=f"reward-step-{step}")(samples, cfg)
                with this.stage("update"):  # timed inside, per sub-stage
                    metrics = stages.update(workers, samples, cfg, step)
                if metrics.get("actor/skipped_steps", 0) > cfg.trainer.max_bad_steps > 0:
                    raise RuntimeError(
                        f"step {step}: {count(int(metrics['actor/skipped_steps']), 'update')} skipped for a "
                        f"non-finite grad norm (> trainer.max_bad_steps={cfg.trainer.max_bad_steps})"
                    )
                last_step = step == total
                if cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or last_step):
                    with this.stage("eval", timed="testing"):
                        metrics.update(_evaluate(workers, tokenizer, test, cfg, tracker, step=step, log_now=False))
                timing = {**this.timing, "timing_s/step": this.elapsed()}
                tokens = int(samples["response_ids"].map(len).sum() + samples["prompt_ids"].map(len).sum())
                last = {
                    **step_metrics(samples),
                    **metrics,
                    **timing,
                    "perf/throughput": tokens / timing["timing_s/step"] / cfg.world_size,
                    "perf/total_num_tokens": tokens,
                    **workers.memory(),
                }
                if step not in logged:
                    with this.stage("logging"):
                        tracker.log_table(sample_table(samples, batch, step), f"samples/step_{step:06d}.json")
                        tracker.log(last, step)
                bar.write(summary(step, total, last, env.val_key()))
                # The checkpoint is the step's last act: once it exists, every output of its step
                # (rollouts, update, eval, metrics) is on disk or in MLflow, so a resume leaves no gap.
                if cfg.trainer.save_freq > 0 and step % cfg.trainer.save_freq == 0 or last_step:
                    with this.stage("checkpoint", timed="save_checkpoint"):
                        stages.save_checkpoint(
                            workers,
                            cfg,
                            step,
                            root,
                            checkpoint_state(cfg, tracker.run_id, restored),
                            last_step,
                        )
                    tracker.log({"timing_s/save_checkpoint": this.timing["timing_s/save_checkpoint"]}, step)
        status = "FINISHED"
        return last
    except (ValueError, WorkerOOMError) as e:
        _FINAL[run_id] = e
        raise
    finally:  # a retry of this flow run, in this process, starts clean
        if workers is not None:
            workers.shutdown()
        tracker.finish(status)


def _evaluate(workers, tokenizer, test, cfg, tracker, step: int, log_now: bool = True) -> dict[str, float]:
    metrics, table = stages.evaluate(workers, tokenizer, test, cfg, step)
    tracker.log_table(table, f"eval/step_{step:06d}.json")
    if log_now:
        tracker.log(metrics, step)
    return metrics


def dataset_name(env, split: str) -> str:
    """A split's name among the MLflow run's inputs: the data source's last part, e.g. gsm8k-train."""
    return f"{env.data_source.rsplit('/', 1)[-1]}-{split}"


def summary(step: int, total: int, m: dict[str, float], val_key: str) -> str:
    """A step's console line; `val=` is the eval's headline `val_key` (Env.val_key()) on steps
    that have it; step 0 (trainer.val_before_train) has only the eval."""
    val = f" val={m[val_key]:.3f}" if val_key in m else ""
    if "critic/score/mean" not in m:
        return f"step {step}/{total} (before training){val}"
    return (
        f"step {step}/{total} score={m['critic/score/mean']:.3f} pg_loss={m['actor/pg_loss']:+.4f} "
        f"kl={m['actor/kl_loss']:.4f} entropy={m.get('actor/entropy', float('nan')):.3f} "
        f"len={m['response_length/mean']:.0f} gen={m['timing_s/gen']:.1f}s "
        f"update={m['timing_s/update_actor']:.1f}s step={m['timing_s/step']:.1f}s{val}"
    )


if __name__ == "__main__":  # vLLM spawns engine processes: entry points need this guard
    grpo(sys.argv[1] if len(sys.argv) > 1 else "tiny-cpu", sys.argv[2:])
