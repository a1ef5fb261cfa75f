"""GRPO on GSM8K as one Prefect flow: the single controller.

    prep -> for each step: rollout -> reward (+ advantages) -> update (+ weight sync)
                           -> checkpoint every save_freq -> eval every test_freq

The controller decides what happens; the Ray worker group (engines/) owns the model, optimizer,
reference and vLLM engine and does it. Every iteration lands in one MLflow run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.settings import get_current_settings
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from configs.load import load_config
from configs.schema import GRPOConfig
from engines.models import is_hub_id
from tasks import checkpoints, stages
from tasks.killpoints import StepStages, kill_point
from tasks.prep import load_raw_gsm8k, prepare_gsm8k
from tasks.tracking import Tracker, check_tracking_uri, clip_text

REQUIRED_STEP_METRICS = (
    "critic/score/mean", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm",
    "actor/pg_clipfrac", "actor/lr", "response_length/mean", "timing_s/gen", "timing_s/update_actor",
    "timing_s/step", "perf/throughput")
VAL_METRIC = "val-core/openai/gsm8k/reward/mean@1"
SAMPLE_ROWS, SAMPLE_WIDTH = 8, 200  # the per-step sample table in MLflow: rows, characters per text cell


# ---- before any work: fail early, naming the input ------------------------------------------------
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
                f"recipe '{cfg.recipe}' needs {cfg.world_size} GPU(s) (trainer.device=cuda) but this machine "
                f"has {have}; run it on a GPU machine or a Ray cluster (RAY_ADDRESS), or use a *-cpu recipe")
    if cfg.model.source == "hf" and not is_hub_id(cfg.model.path):
        from engines.models import check_hf_dir

        try:  # config, weights, tokenizer, chat template
            check_hf_dir(Path(cfg.model.path))
        except ValueError as e:
            raise ValueError(f"model.path={cfg.model.path}: {e}") from None
    if cfg.model.lora_rank > 0 and (cfg.model.source == "random" or
                                    cfg.model.source == "hf" and not is_hub_id(cfg.model.path)):
        from engines.models import check_lora_targets

        check_lora_targets(cfg.model.target_modules, arch=cfg.model.arch,
                           model_dir=cfg.model.path if cfg.model.source == "hf" else None)
    for key, path in (("trainer.default_local_dir", cfg.checkpoint_dir), ("data.dir", cfg.data.dir)):
        _check_writable(key, Path(path))
    check_tracking_uri(cfg)
    check_resumable(cfg)
    from tasks.reward import load_reward_fn

    load_reward_fn(cfg.reward.function, cfg.reward.gsm8k_scorer)  # a reward that does not import: before any work
    src = cfg.data.source
    if not is_hub_id(src):
        if not Path(src).expanduser().exists():
            raise ValueError(f"data.source={src}: path does not exist; point it at a directory with "
                             "train/test jsonl or parquet, or use the hub id openai/gsm8k")
        load_raw_gsm8k(src)  # columns, emptiness, ground truths: checked before any work


def model_signature(cfg: GRPOConfig) -> dict:
    """What a checkpoint must match to be resumed by this config: model shape and LoRA (the world
    size is recorded, not required: checkpoints reshard). The shape is the planner's (local
    config.json, preset or published table); None if unknown."""
    from planner.shapes import model_shape

    try:
        s, _ = model_shape(cfg)
        shape = {"hidden": s.hidden, "layers": s.layers, "heads": s.heads, "kv_heads": s.kv_heads,
                 "intermediate": s.intermediate}
    except ValueError:  # a hub model outside the planner's table: its path stands in
        shape = None
    return {"model.path": cfg.model.path, "shape": shape, "model.lora_rank": cfg.model.lora_rank,
            "world_size": cfg.world_size}


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
    diff = [k for k in (model_key, "model.lora_rank") if saved.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k}: checkpoint {saved.get(k)} vs config {want[k]}" for k in diff)
        raise ValueError(
            f"trainer.default_local_dir={cfg.trainer.default_local_dir}: its checkpoint "
            f"{state_file.parent.name} was written for another model ({what}); use another "
            "trainer.default_local_dir, or trainer.resume_mode=disable to start over there")


def _check_writable(key: str, path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (nothing is created here)."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path}: {p} is not a writable directory; choose a writable location")


def prepare(cfg: GRPOConfig, log=logging.getLogger("grpo")):
    """Build (once) the model files and the train/test parquet; both are cached by content."""
    from transformers import AutoTokenizer

    from engines.models import materialize

    with kill_point("prep"):
        corpus = None
        if cfg.model.source == "random":  # its tokenizer is trained on the GSM8K train text
            raw = load_raw_gsm8k(cfg.data.source)["train"]
            corpus = list(raw["question"] + " " + raw["answer"])
        model_dir = materialize(cfg.model.source, cfg.model.path, arch=cfg.model.arch, corpus=corpus)
        tok = AutoTokenizer.from_pretrained(model_dir)
        result = prepare_gsm8k(
            cfg.data.source, cfg.data.dir, prompt_length=lambda m: len(stages.chat_ids(tok, m)),
            max_prompt_length=cfg.data.max_prompt_length,
            overlong="filter" if cfg.data.filter_overlong_prompts else "error",
            tokenizer_fingerprint=f"{model_dir}:{len(tok)}:{tok.chat_template}")
    log.info("prep: %d train / %d test prompts (%d / %d over max_prompt_length=%d filtered)%s", result.n_train,
             result.n_test, result.filtered_train, result.filtered_test, cfg.data.max_prompt_length,
             " [cached]" if result.cached else "")
    train, test = pd.read_parquet(result.train_path), pd.read_parquet(result.test_path)
    train.attrs["path"], test.attrs["path"] = str(result.train_path), str(result.test_path)  # MLflow inputs
    if len(train) < cfg.data.train_batch_size:
        raise ValueError(f"data.train_batch_size={cfg.data.train_batch_size} exceeds the {len(train)} train "
                         "prompts left after filtering; lower it or raise data.max_prompt_length")
    return model_dir, tok, train, test


@task(name="prep", retries=2, retry_delay_seconds=5, retry_condition_fn=stages.transient, cache_policy=NONE)
def prep(cfg: GRPOConfig):
    return prepare(cfg, get_run_logger())


def step_metrics(samples: pd.DataFrame) -> dict[str, float]:
    lengths = samples["response_ids"].map(len)
    return {"critic/score/mean": samples["score"].mean(), "critic/score/max": samples["score"].max(),
            "critic/score/min": samples["score"].min(),
            "critic/advantages/mean": samples["advantage"].mean(),
            "response_length/mean": lengths.mean(), "response_length/max": lengths.max(),
            "response_length/clip_ratio": (samples["finish_reason"] == "length").mean(),
            "prompt_length/mean": samples["prompt_ids"].map(len).mean(),
            "reward/errors": samples.attrs.get("reward_errors", 0)}


def sample_table(samples: pd.DataFrame, batch: pd.DataFrame, step: int) -> dict[str, list]:
    """A few of the step's samples for MLflow: the first prompts' whole groups (so advantages can
    be read against their group's scores), as many as fit SAMPLE_ROWS rows and at least one (at
    most 2 x SAMPLE_ROWS rows), text cut to SAMPLE_WIDTH characters."""
    prompts = list(dict.fromkeys(samples["row"]))
    group = int((samples["row"] == prompts[0]).sum())
    head = samples[samples["row"].isin(prompts[: max(1, SAMPLE_ROWS // group)])].head(2 * SAMPLE_ROWS)
    question = {row: m[-1]["content"] for row, m in zip(batch.index, batch["prompt"])}
    return {"step": [step] * len(head), "prompt": [clip_text(question[r], SAMPLE_WIDTH) for r in head["row"]],
            "response": [clip_text(t, SAMPLE_WIDTH) for t in head["response_text"]],
            "ground_truth": list(head["ground_truth"]), "score": [float(x) for x in head["score"]],
            "advantage": [float(x) for x in head["advantage"]], "finish_reason": list(head["finish_reason"])}


def prefect_api_url() -> str | None:
    """The Prefect server this flow reports to; None for the temporary one a run without
    PREFECT_API_URL starts, which ends with the process (and its flow-run ids with it)."""
    return get_current_settings().api.url


def _tags(cfg: GRPOConfig) -> dict[str, str]:
    """MLflow tags linking the run to its Prefect flow run: id and UI address on a lasting server;
    on the temporary one only the name, with `prefect.server=ephemeral` (the id would name
    nothing once the run ends)."""
    tags = {"recipe": cfg.recipe, "prefect.flow_run_name": str(runtime.flow_run.name),
            "prefect.deployment": str(runtime.deployment.name or "")}
    if prefect_api_url() is None:
        return {**tags, "prefect.server": "ephemeral (gone after the run: set PREFECT_API_URL to keep it)"}
    return {**tags, "prefect.server": str(prefect_api_url()), "prefect.flow_run_id": str(runtime.flow_run.id),
            "prefect.flow_run_url": str(runtime.flow_run.ui_url)}


def announce(tracker: Tracker, log) -> None:
    """Say once where the MLflow run is: in the flow run's log and as a Prefect artifact of it."""
    lines = tracker.where()
    for line in lines:
        log.info(line)
    try:
        create_markdown_artifact(key="mlflow-run", description="the MLflow run of this flow run", markdown=(
            f"**MLflow run** `{tracker.run_id}`\n\n" + "\n".join(f"- {line}" for line in lines[1:])))
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
    from engines.worker_group import WorkerGroup, WorkerOOMError

    run_id = str(runtime.flow_run.id)
    if run_id in _FINAL:
        err = _FINAL.pop(run_id)
        print(f"flow run not retried (a retry cannot mend it): {err}")
        raise err
    cfg = load_config(config, overrides or [])
    preflight(cfg)
    log = get_run_logger()
    model_dir, tokenizer, train, test = prep(cfg)
    if cfg.data.val_max_samples:
        test = test.iloc[: cfg.data.val_max_samples]
    total = stages.total_steps(cfg, len(train))
    root = Path(cfg.checkpoint_dir)
    tracker = Tracker(cfg, root, _tags(cfg))
    announce(tracker, log)
    for df, name, context in ((train, "gsm8k-train", "training"), (test, "gsm8k-test", "evaluation")):
        tracker.log_dataset(df, df.attrs.get("path", cfg.data.dir), name, context)
    workers, status = None, "FAILED"
    try:
        workers = WorkerGroup(stages.with_total_steps(cfg, total), model_dir)  # the LR schedule's length
        start = 0
        ckpt = checkpoints.newest_valid(root) if cfg.trainer.resume_mode == "auto" else None
        if cfg.trainer.resume_mode == "disable":  # start over: reuse nothing an earlier run persisted
            stages.set_aside_rollouts(root, log)
        if ckpt is not None:
            workers.load_checkpoint(str(ckpt))
            start = checkpoints.step_of(ckpt)
            log.info("resumed from %s", ckpt)
        # Steps after the checkpoint that a killed run had already logged are replayed, not re-logged.
        logged = tracker.logged_steps("timing_s/step") if tracker.resumed else set()
        if cfg.trainer.val_before_train and start == 0 and 0 not in tracker.logged_steps(VAL_METRIC):
            _evaluate(workers, tokenizer, test, cfg, tracker, step=0)
        last: dict[str, float] = {}
        # The bar only on a terminal (disable=None); log lines go above it, not into it.
        bar = tqdm(range(start + 1, total + 1), desc="grpo", unit="step", file=sys.stderr,
                   initial=start, total=total, disable=None)
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
                    raise RuntimeError(f"step {step}: {int(metrics['actor/skipped_steps'])} updates skipped for a "
                                       f"non-finite grad norm (> trainer.max_bad_steps={cfg.trainer.max_bad_steps})")
                last_step = step == total
                if cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or last_step):
                    with this.stage("eval", timed="testing"):
                        metrics.update(_evaluate(workers, tokenizer, test, cfg, tracker, step=step, log_now=False))
                timing = {**this.timing, "timing_s/step": this.elapsed()}
                tokens = int(samples["response_ids"].map(len).sum() + samples["prompt_ids"].map(len).sum())
                last = {**step_metrics(samples), **metrics, **timing,
                        "perf/throughput": tokens / timing["timing_s/step"] / cfg.world_size,
                        "perf/total_num_tokens": tokens, **workers.memory()}
                if step not in logged:
                    with this.stage("logging"):
                        tracker.log_table(sample_table(samples, batch, step), f"samples/step_{step:06d}.json")
                        tracker.log(last, step)
                bar.write(summary(step, total, last))
                # The checkpoint is the step's last act: once it exists, every output of its step
                # (rollouts, update, eval, metrics) is on disk or in MLflow, so a resume leaves no gap.
                if cfg.trainer.save_freq > 0 and step % cfg.trainer.save_freq == 0 or last_step:
                    with this.stage("checkpoint", timed="save_checkpoint"):
                        stages.save_checkpoint(workers, cfg, step, root, {"mlflow_run_id": tracker.run_id,
                                                                          "model": model_signature(cfg)}, last_step)
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


def summary(step: int, total: int, m: dict[str, float]) -> str:
    val = f" val={m[VAL_METRIC]:.3f}" if VAL_METRIC in m else ""
    return (f"step {step}/{total} score={m['critic/score/mean']:.3f} pg_loss={m['actor/pg_loss']:+.4f} "
            f"kl={m['actor/kl_loss']:.4f} entropy={m['actor/entropy']:.3f} "
            f"len={m['response_length/mean']:.0f} gen={m['timing_s/gen']:.1f}s "
            f"update={m['timing_s/update_actor']:.1f}s step={m['timing_s/step']:.1f}s{val}")


if __name__ == "__main__":  # vLLM spawns engine processes: entry points need this guard
    grpo(sys.argv[1] if len(sys.argv) > 1 else "tiny-cpu", sys.argv[2:])
