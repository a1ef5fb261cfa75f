"""The flow's stages as Prefect tasks (prep, rollout, reward, update, checkpoint, evaluate): thin
wrappers that call the env (envs/, picked by data.data_source), the worker group, and persist outputs.

Retries only where a retry is safe: rollout and eval are pure functions of (weights, seeds);
checkpoints are written atomically; the policy update mutates optimizer state, so it never retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from configs.schema import GRPOConfig
from engines import algos, batching
from engines.types import SamplingSpec, UpdateBatch
from envs import get_env, reward_fn
from envs.prep import load_raw
from envs.prep import prepare as prepare_rows
from envs.reward import score_samples
from runtime import checkpoints
from runtime.atomic import atomic_write
from runtime.killpoints import StepStages, kill_point
from runtime.tracking import clip_text


def transient(task, task_run, state) -> bool:
    """Retry infrastructure hiccups (a dead actor, a timeout), never bad input (ValueError), a
    worker killed for host memory (the retry needs the same memory) or a stage a rank hung in (the
    process group is broken: the flow's retry rebuilds it)."""
    from engines.worker_group import CollectiveTimeout, WorkerOOMError

    try:
        state.result()
    except (ValueError, WorkerOOMError, CollectiveTimeout):
        return False
    except Exception:
        return True
    return True


# ---- prep: model files and parquet ----------------------------------------------------------
def prepare(cfg: GRPOConfig, log=logging.getLogger("grpo")):
    """Build (once) the model files and data.data_source's train/test parquet; both are cached by
    content. Returns (model dir, tokenizer, train rows, test rows)."""
    from transformers import AutoTokenizer

    from engines.models import materialize, tokenizer_fingerprint

    env = get_env(cfg.data.data_source)
    with kill_point("prep"):
        corpus = None
        if cfg.model.source == "random":  # its tokenizer is trained on the env's train text
            corpus = env.tokenizer_corpus(load_raw(env, cfg.data.source)["train"])
        model_dir = materialize(cfg.model.source, cfg.model.path, arch=cfg.model.arch, corpus=corpus)
        tok = AutoTokenizer.from_pretrained(model_dir)
        result = prepare_rows(
            env,
            cfg.data.source,
            cfg.data.dir,
            prompt_length=lambda m: len(chat_ids(tok, m)),
            max_prompt_length=cfg.data.max_prompt_length,
            overlong="filter" if cfg.data.filter_overlong_prompts else "error",
            tokenizer_fingerprint=tokenizer_fingerprint(tok),
        )
    log.info(
        "prep: %d train / %d test prompts (%d / %d over max_prompt_length=%d filtered)%s",
        result.n_train,
        result.n_test,
        result.filtered_train,
        result.filtered_test,
        cfg.data.max_prompt_length,
        " [cached]" if result.cached else "",
    )
    train, test = pd.read_parquet(result.train_path), pd.read_parquet(result.test_path)
    train.attrs["path"], test.attrs["path"] = str(result.train_path), str(result.test_path)  # MLflow inputs
    if len(train) < cfg.data.train_batch_size:
        raise ValueError(
            f"data.train_batch_size={cfg.data.train_batch_size} exceeds the {len(train)} train "
            "prompts left after filtering; lower it or raise data.max_prompt_length"
        )
    return model_dir, tok, train, test


@task(name="prep", retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NONE)
def prep(cfg: GRPOConfig):
    return prepare(cfg, get_run_logger())


# ---- data ---------------------------------------------------------------------------------------
def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def step_rows(n_rows: int, cfg: GRPOConfig, step: int) -> np.ndarray:
    """Row indices of the train set for `step` (1-based): epoch-wise permutation seeded by trainer.seed."""
    bs = cfg.data.train_batch_size
    per_epoch = n_rows // bs
    epoch, pos = divmod(step - 1, per_epoch)
    order = (
        np.random.default_rng(cfg.trainer.seed + epoch).permutation(n_rows) if cfg.data.shuffle else np.arange(n_rows)
    )
    return order[pos * bs : (pos + 1) * bs]


def total_steps(cfg: GRPOConfig, n_rows: int) -> int:
    """The run's length in steps: trainer.total_training_steps, else trainer.total_epochs x the
    full batches of the n_rows train rows per epoch (the leftover rows of an epoch are dropped)."""
    return cfg.trainer.total_training_steps or cfg.trainer.total_epochs * (n_rows // cfg.data.train_batch_size)


def with_total_steps(cfg: GRPOConfig, total: int) -> GRPOConfig:
    """cfg with trainer.total_training_steps = total: what the workers get, so that the LR warmup
    of an epoch-based run (actor.lr_warmup_steps_ratio) knows the run's length."""
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"total_training_steps": total})})


def _seed(cfg: GRPOConfig, step: int, row: int) -> int:
    return (cfg.trainer.seed * 1_000_003 + step * 10_007 + int(row)) % (2**31 - 1)


# ---- stages -------------------------------------------------------------------------------------
FINGERPRINT_KEY = b"grpo.rollout_fingerprint"


def rollout_fingerprint(cfg: GRPOConfig, tokenizer, prompts: list[list[int]], rows) -> dict:
    """What a step's rollouts depend on besides the policy's weights (which the checkpoint
    restores): model, tokenizer, sampling parameters, seed and the prompts (token ids, with the
    train-set rows whose numbers seed each prompt). Stored in the step's parquet metadata."""
    r = cfg.rollout
    digest = lambda obj: hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]  # noqa: E731
    return {
        "model.path": cfg.model.path,
        "model.source": cfg.model.source,
        "model.arch": cfg.model.arch,
        "model.dtype": cfg.model.dtype,
        "model.lora_rank": cfg.model.lora_rank,
        "tokenizer": digest(
            [
                str(getattr(tokenizer, "name_or_path", "")),
                len(tokenizer),
                getattr(tokenizer, "chat_template", None) or "",
            ]
        ),
        "rollout.n": r.n,
        "rollout.temperature": r.temperature,
        "rollout.top_p": r.top_p,
        "rollout.top_k": r.top_k,
        "rollout.max_response_length": r.max_response_length,
        "trainer.seed": cfg.trainer.seed,
        "prompt_ids": digest([[int(i) for i in rows], prompts]),
    }


def write_rollouts(path: Path, samples: pd.DataFrame, fingerprint: dict) -> None:
    """The step's samples as parquet (atomically), with their fingerprint in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(samples, preserve_index=False)
    meta = {**(table.schema.metadata or {}), FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata(meta), tmp))


def set_aside_rollouts(root: Path, log) -> int:
    """A fresh start (trainer.resume_mode=disable) in a directory an earlier run used: that run's
    persisted rollouts (another policy made them) move to rollouts/superseded/ so that no later
    resume of this run reuses them; nothing is deleted. Returns how many files moved."""
    files = sorted((root / "rollouts").glob("step_*.parquet"))
    if files:
        aside = root / "rollouts" / "superseded"
        aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for f in files:
            f.rename(aside / f"{f.stem}-{stamp}{f.suffix}")
        log.warning(
            "trainer.resume_mode=disable: %d rollout file(s) of an earlier run in %s moved to %s",
            len(files),
            root / "rollouts",
            aside,
        )
    return len(files)


def reusable_rollouts(path: Path, fingerprint: dict, n_samples: int, log) -> pd.DataFrame | None:
    """The persisted samples at `path` if they were made with this fingerprint, else None.

    Samples made otherwise (another model, tokenizer, sampling parameter, n, seed or prompts; or
    written before fingerprints existed) are moved to rollouts/superseded/ (nothing written is
    lost) with a warning naming what changed, and the caller generates the step again."""
    import pyarrow.parquet as pq

    if not path.exists():
        return None
    saved = json.loads((pq.read_schema(path).metadata or {}).get(FINGERPRINT_KEY, b"{}"))
    changed = [
        f"{k} ({saved[k]} -> {v})" if k in saved else f"{k} (unrecorded)"
        for k, v in fingerprint.items()
        if saved.get(k) != v
    ]
    done = None if changed else pd.read_parquet(path)
    if done is not None and len(done) != n_samples:
        changed = [f"sample count ({len(done)} -> {n_samples})"]
    if not changed:
        return done
    aside = path.parent / "superseded" / f"{path.stem}-{time.strftime('%Y%m%dT%H%M%S')}{path.suffix}"
    aside.parent.mkdir(exist_ok=True)
    path.rename(aside)
    log.warning(
        "%s was generated with another %s; generating the step again (the old file is now %s)",
        path,
        ", ".join(changed),
        aside,
    )
    return None


@task(
    name="rollout",
    task_run_name="rollout-step-{step}",
    retries=2,
    retry_condition_fn=transient,
    retry_delay_seconds=5,
    cache_policy=NONE,
)
def rollout(workers, tokenizer, batch: pd.DataFrame, cfg: GRPOConfig, step: int, out: Path) -> pd.DataFrame:
    """Sample rollout.n responses per prompt with vLLM; persist them as parquet.

    A step's rollouts already on disk (written before a crash) are reused if their fingerprint
    (rollout_fingerprint) matches: the policy that made them is the one just restored, and
    generation is the dearest stage. Otherwise they are set aside and generated again.
    """
    path = out / f"rollouts/step_{step:06d}.parquet"
    log = get_run_logger()
    prompts = [chat_ids(tokenizer, m) for m in batch["prompt"]]
    fingerprint = rollout_fingerprint(cfg, tokenizer, prompts, batch.index)
    if cfg.trainer.resume_mode == "auto":
        done = reusable_rollouts(path, fingerprint, len(batch) * cfg.rollout.n, log)
        if done is not None:
            log.info("step %d: reusing %d persisted rollouts from %s", step, len(done), path)
            return done
    sampling = SamplingSpec.for_training(cfg, [_seed(cfg, step, i) for i in batch.index])
    samples = pd.DataFrame(workers.generate(prompts, sampling))  # engines/types.py: GENERATED columns
    src = batch.reset_index().rename(columns={"index": "row"})
    samples["row"] = src["row"].to_numpy()[samples["prompt_index"]]
    samples["prompt_ids"] = [prompts[i] for i in samples["prompt_index"]]
    samples["data_source"] = src["data_source"].to_numpy()[samples["prompt_index"]]
    samples["ground_truth"] = [src["reward_model"][i]["ground_truth"] for i in samples["prompt_index"]]
    if "extra_info" in src:
        samples["extra_info"] = [src["extra_info"][i] for i in samples["prompt_index"]]
    write_rollouts(path, samples, fingerprint)
    log.info("step %d: generated %d rollouts into %s", step, len(samples), path)
    return samples


def reward_extra_info(extra_infos, finish_reasons) -> list[dict]:
    """What a reward function gets as extra_info: the dataset row's extra_info (as the reference
    framework passes it) plus the sample's vLLM `finish_reason` ("stop" or "length")."""
    extra_infos = [None] * len(finish_reasons) if extra_infos is None else list(extra_infos)
    return [{**(e if isinstance(e, dict) else {}), "finish_reason": f} for e, f in zip(extra_infos, finish_reasons)]


@task(name="reward", retries=1, retry_condition_fn=transient, cache_policy=NONE)
def score(samples: pd.DataFrame, cfg: GRPOConfig) -> pd.DataFrame:
    """Rule reward (or the configured function) per sample; then GRPO group-normalised advantages."""
    import torch

    fn = reward_fn(cfg)
    extra = reward_extra_info(samples.get("extra_info"), samples["finish_reason"])
    scores, n_errors = score_samples(
        fn,
        list(samples["data_source"]),
        list(samples["response_text"]),
        list(samples["ground_truth"]),
        extra,
        on_error=cfg.reward.on_error,
    )
    samples = samples.assign(score=scores)
    estimator = algos.ADV_ESTIMATORS[cfg.algorithm.adv_estimator]
    adv = estimator(
        torch.tensor(scores, dtype=torch.float32),
        list(samples["prompt_index"]),
        norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
    )
    samples["advantage"] = adv.numpy()
    samples.attrs["reward_errors"] = n_errors
    return samples


@task(name="update", task_run_name="update-step-{step}", retries=0, cache_policy=NONE)
def update(workers, samples: pd.DataFrame, cfg: GRPOConfig, step: int) -> dict[str, float]:
    """old log-probs -> reference log-probs -> PPO epochs -> push weights to vLLM, each timed.

    An on-policy step (one mini-batch, one PPO epoch: engines/batching.on_policy) has no
    old_log_prob pass: the update uses its own log-probs, detached, and reports the
    rollout_probs_diff check against them itself."""
    prompts, responses = list(samples["prompt_ids"]), list(samples["response_ids"])
    prompts = [list(p) for p in prompts]
    responses = [list(r) for r in responses]
    this = StepStages(step)  # the update's sub-stages, timed (the flow's update stage is the kill point)
    old = None
    if not batching.on_policy(len(prompts), cfg):
        with this.stage(timed="old_log_prob"):
            old = workers.compute_log_prob(prompts, responses)
    ref = None
    if cfg.actor.use_kl_loss:
        with this.stage(timed="ref"):
            ref = workers.compute_log_prob(prompts, responses, ref=True)
    batch = UpdateBatch(
        prompts=prompts,
        responses=responses,
        old_log_probs=old,
        ref_log_probs=ref,
        advantages=samples["advantage"].to_numpy(np.float32).tolist(),
        truncated=(samples["finish_reason"] == "length").tolist(),  # actor.mask_truncated_completions
        rollout_log_probs=None
        if old is not None
        else [np.asarray(x, np.float32) for x in samples["rollout_log_probs"]],
    )
    with this.stage(timed="update_actor"):
        metrics = workers.update_actor(batch, seed=cfg.trainer.seed + step)
    with this.stage(timed="update_weights"):
        workers.sync_weights()
    # How far vLLM's sampling log-probs are from the trainer's: a live check of weight sync.
    diffs = [
        np.abs(np.asarray(a) - np.asarray(b))
        for a, b in zip(samples["rollout_log_probs"], old or [])
        if len(a) == len(b) and len(a)
    ]
    if diffs:
        diffs = np.concatenate(diffs)
        metrics["training/rollout_probs_diff_mean"] = float(diffs.mean())
        metrics["training/rollout_probs_diff_max"] = float(diffs.max())
    return {**metrics, **this.timing}


@task(
    name="checkpoint",
    task_run_name="checkpoint-step-{step}",
    retries=2,
    retry_condition_fn=transient,
    retry_delay_seconds=5,
    cache_policy=NONE,
)
def save_checkpoint(workers, cfg: GRPOConfig, step: int, root: Path, state: dict, last_step: bool = False) -> Path:
    """global_step_<N>: model/adapter, optimizer, scheduler, RNG (workers) + trainer state (here);
    the HF export as trainer.export_hf says. The workers checksum what they wrote."""
    export = cfg.trainer.export_hf == "every_save" or (cfg.trainer.export_hf == "last" and last_step)

    def fill(tmp: Path) -> dict:
        files = workers.save_checkpoint(str(tmp), export_hf=export)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "global_step": step, "export_hf": export}))
        return files

    return checkpoints.write(root, step, fill, keep=cfg.trainer.max_actor_ckpt_to_keep)


@task(
    name="evaluate",
    task_run_name="eval-step-{step}",
    retries=2,
    retry_condition_fn=transient,
    retry_delay_seconds=5,
    cache_policy=NONE,
)
def evaluate(workers, tokenizer, test: pd.DataFrame, cfg: GRPOConfig, step: int) -> tuple[dict, dict]:
    """Test accuracy, greedy mean@1, and a sample table shown as a Prefect artifact.

    The headline `val-core/<data_source>/reward/mean@1` (env.val_key()) is reward.function's mean,
    or with the built-in reward the env's accuracy (GSM8K: the reference scorer's strict `#### N`,
    comparable with published numbers; never reward.format_score); with the built-in reward the
    env adds its own metrics (Env.val_metrics; GSM8K: flexible, format, lenient)."""
    env = get_env(cfg.data.data_source)
    prompts = [chat_ids(tokenizer, m) for m in test["prompt"]]
    sampling = SamplingSpec.for_eval(cfg, [_seed(cfg, 0, i) for i in test.index])
    out = sorted(workers.generate(prompts, sampling), key=lambda r: r["prompt_index"])
    texts = [o["response_text"] for o in out]
    truths = [rm["ground_truth"] for rm in test["reward_model"]]
    extra = reward_extra_info(test.get("extra_info"), [o["finish_reason"] for o in out])
    args = (list(test["data_source"]), texts, truths, extra)
    scores, _ = score_samples(reward_fn(cfg, for_eval=True), *args, on_error=cfg.reward.on_error)
    metrics = {env.val_key(): float(np.mean(scores))}
    table = {
        "question": [m[0]["content"][:300] for m in test["prompt"]],
        "response": texts,
        "ground_truth": truths,
        "score": scores,
    }
    if cfg.reward.function is None:
        more_metrics, more_columns = env.val_metrics(*args, cfg.reward, on_error=cfg.reward.on_error)
        metrics.update(more_metrics)
        table.update(more_columns)
    # The Prefect table shows 10 rows with text cut to fit a cell; MLflow's table has them all.
    shown = [
        {
            k: clip_text(v[i], 80 if k == "question" else 120) if isinstance(v[i], str) else v[i]
            for k, v in table.items()
        }
        for i in range(min(10, len(texts)))
    ]
    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.tracking.run_name.lower()).strip("-")
    create_table_artifact(
        key=f"eval-{slug}-step-{step}",
        table=shown,
        description=f"{env.name} eval at step {step}: mean@1 = {metrics[env.val_key()]:.3f} on {len(texts)} prompts",
    )
    return metrics, table
