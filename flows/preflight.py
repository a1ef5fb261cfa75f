"""Before any work: every check that needs no Ray and no accelerator, each error one line naming
the input and the fix (`preflight`), and whether a checkpoint left in trainer.default_local_dir
fits this config (`model_signature`, `check_resumable`); on resume, which keys changed since the
checkpoint: those of RESUME_MAY_CHANGE are said in an info line, any other is refused
(`resume_changes`, from the config each checkpoint records: `checkpoint_state`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from configs.load import flatten
from configs.schema import GRPOConfig
from configs.text import count
from engines.models import is_hub_id
from runtime import checkpoints
from runtime.tracking import check_tracking_uri


def preflight(cfg: GRPOConfig) -> None:
    """Checks that need no Ray and no accelerator; each error names the input and the fix."""
    if cfg.requires:
        raise ValueError(f"recipe '{cfg.recipe}' cannot run in this build: {cfg.requires}")
    from engines.rollout import ROLLOUTS
    from engines.trainer import TRAINERS

    TRAINERS.get(cfg.actor.strategy)  # a backend this build has: one line naming the key, else
    ROLLOUTS.get(cfg.rollout.name)
    from envs import get_env, reward_fn
    from envs.prep import load_raw

    env = get_env(cfg.data.data_source)  # a dataset this build has (envs/), else one line listing them
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
        if (
            cfg.world_size > 1
            and cfg.actor.strategy != "megatron"
            and not any(Path(cfg.model.path).glob("*.safetensors"))
        ):
            raise ValueError(
                f"model.path={cfg.model.path} has *.bin weights only: the sharded FSDP2 trainer "
                f"({cfg.world_size} ranks) reads each rank's shards from *.safetensors (engines/trainer/load.py); "
                "save the model again with save_pretrained (safetensors by default)"
            )
    if cfg.model.lora_rank > 0 and (
        cfg.model.source == "random" or cfg.model.source == "hf" and not is_hub_id(cfg.model.path)
    ):
        from engines.models import check_lora_targets

        check_lora_targets(
            cfg.model.target_modules,
            arch=cfg.model.arch,
            model_dir=cfg.model.path if cfg.model.source == "hf" else None,
        )
    check_model_fit(cfg)
    check_local_ray(cfg)
    for key, path in (("trainer.default_local_dir", cfg.checkpoint_dir), ("data.dir", cfg.data.dir)):
        _check_writable(key, Path(path))
    check_tracking_uri(cfg)
    check_resumable(cfg)
    reward_fn(cfg)  # a reward that does not import, or an option the env refuses: before any work
    src = cfg.data.source
    if not is_hub_id(src):
        if not Path(src).expanduser().exists():
            hub = f", or use the hub id {env.hub_repo}" if env.hub_repo else ""
            raise ValueError(
                f"data.source={src}: path does not exist; point it at a directory with train/test jsonl or parquet{hub}"
            )
        load_raw(env, src)  # columns, emptiness, the env's row checks: before any work


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
            "vocab": s.vocab,
            "tie_word_embeddings": s.tie,
        }
        if cfg.model.source == "random" and not (Path(cfg.model.path) / "config.json").is_file():
            del shape["vocab"]  # a preset not built yet: its vocab is the tokenizer's, trained at prep
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
    if saved:
        _check_same_model(cfg, saved, state_file.parent)
    resume_changes(cfg, state_file.parent)  # a changed key of the run's math: one line, before any work


def _check_same_model(cfg: GRPOConfig, saved: dict, ckpt: Path) -> None:
    want = model_signature(cfg)
    model_key = "shape" if saved.get("shape") and want["shape"] else "model.path"  # shapes when both known
    if model_key == "shape":  # only the facts both record: a checkpoint of an earlier build lacks some
        common = [k for k in want["shape"] if k in saved["shape"]]
        saved["shape"] = {k: saved["shape"][k] for k in common}
        want = {**want, "shape": {k: want["shape"][k] for k in common}}
    saved["actor.strategy"] = _state_format(saved.get("actor.strategy"))
    keys = (model_key, "model.lora_rank", "actor.strategy", "actor.megatron.tensor_model_parallel_size")
    diff = [k for k in keys if k in want and saved.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k}: checkpoint {saved.get(k)} vs config {want[k]}" for k in diff)
        raise ValueError(
            f"trainer.default_local_dir={cfg.trainer.default_local_dir}: its checkpoint "
            f"{ckpt.name} was written for another model ({what}); use another "
            "trainer.default_local_dir, or trainer.resume_mode=disable to start over there"
        )


# The keys whose value the LR scheduler and AdamW's param groups restore from the checkpoint
# (torch's load_state_dict): a checkpoint records the values in effect (checkpoint_state), which a
# run resumed by an earlier build with a changed one kept.
RESTORED = ("actor.lr", "actor.betas", "actor.weight_decay")

# The keys a resumed run may take a new value of: how the run is run, not what it computes. Its
# length (to extend it), when it evaluates, saves and rotates checkpoints, where and how it logs,
# where its ranks and engines are placed, memory switches (offload, checkpointing, the micro-batch:
# the loss's denominators are the mini-batch's, engines/trainer/actor.py), engine sizing, the
# eval-only keys, fault thresholds; the recipe's name (its keys are compared one by one);
# reward.on_error (a run that stopped on a reward error goes on, scoring such samples 0).
# actor.strategy: fsdp and fsdp2 are one backend; another state format is refused by
# check_resumable. Any other key that differs from the config the checkpoint recorded is refused
# before any work: the model, data, sampling, batch sizes, algorithm, loss, LR schedule, reward or
# seed would change mid-way, and the run would be neither the old one nor a new one.
RESUME_MAY_CHANGE = tuple(
    """
    recipe requires data.dir data.val_max_samples
    model.enable_gradient_checkpointing model.use_remove_padding
    rollout.tensor_model_parallel_size rollout.gpu_memory_utilization rollout.enforce_eager rollout.free_cache_engine
    rollout.calculate_log_probs rollout.max_num_seqs rollout.max_model_len rollout.max_num_batched_tokens
    rollout.enable_chunked_prefill rollout.load_format rollout.val_temperature
    actor.strategy actor.ppo_micro_batch_size_per_gpu actor.use_dynamic_bsz actor.ppo_max_token_len_per_gpu
    actor.param_offload actor.optimizer_offload actor.ulysses_sequence_parallel_size
    reward.on_error
    trainer.total_epochs trainer.total_training_steps trainer.save_freq trainer.test_freq trainer.val_before_train
    trainer.default_local_dir trainer.resume_mode trainer.max_actor_ckpt_to_keep trainer.export_hf
    trainer.n_gpus_per_node trainer.nnodes trainer.device trainer.node_ram_gb trainer.collective_timeout_s
    trainer.max_bad_steps
    """.split()
)
# Not tracking.*: a resumed run logs on into the MLflow run its checkpoint recorded, whose store,
# experiment and name are fixed (another store or experiment would split or break its history).
# The run's length: it may change, unless the LR warmup is a share of it (algos.warmup_lambda).
RUN_LENGTH = ("trainer.total_epochs", "trainer.total_training_steps")


def recorded_config(ckpt: Path) -> dict[str, str]:
    """The config checkpoint `ckpt` recorded (checkpoint_state); {} for one of an earlier build."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("config") or {}
    except (OSError, ValueError):
        return {}


def in_effect(ckpt: Path) -> dict[str, str]:
    """The RESTORED keys' values a run resumed from `ckpt` trains with: the checkpoint's own, not
    the config's. Read once at resume (a later save may rotate `ckpt` away)."""
    saved = recorded_config(ckpt)
    return {k: saved[k] for k in RESTORED if k in saved}


def checkpoint_state(cfg: GRPOConfig, mlflow_run_id: str | None, restored: dict[str, str] | None = None) -> dict:
    """What the flow writes into each checkpoint's trainer_state.json beside the step: the MLflow
    run to go on logging into, the model signature (check_resumable) and the whole config as
    dotted keys -> strings (configs.load.flatten; resume_changes) as the run uses it: `restored`
    (in_effect of the checkpoint it resumed from) overrides the config's RESTORED keys."""
    config = {**flatten(cfg), **{k: v for k, v in (restored or {}).items() if k in RESTORED}}
    return {"mlflow_run_id": mlflow_run_id, "model": model_signature(cfg), "config": config}


def resume_changes(cfg: GRPOConfig, ckpt: Path) -> list[str]:
    """The keys whose value in cfg differs from the config checkpoint `ckpt` (global_step_<N>)
    recorded: one info line each for RESUME_MAY_CHANGE's; any other is a ValueError, one line naming
    each such key, both values and the fix. Nothing for a checkpoint of an earlier build, which
    recorded no config, nor for a key it did not record."""
    saved = recorded_config(ckpt)
    now = flatten(cfg)
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    warmup_share = cfg.actor.lr_warmup_steps < 0 and cfg.actor.lr_warmup_steps_ratio > 0
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE or warmup_share and k in RUN_LENGTH]
    if refused:
        what = ", ".join(f"{k} ({changed[k][0]} -> {changed[k][1]})" for k in refused)
        why = (
            f"; its LR warmup is actor.lr_warmup_steps_ratio={cfg.actor.lr_warmup_steps_ratio} of the run's length"
            if warmup_share and set(refused) & set(RUN_LENGTH)
            else ""
        )
        back = " ".join(f"{k}={changed[k][0]}" for k in refused)
        raise ValueError(
            f"trainer.default_local_dir={cfg.trainer.default_local_dir}: resuming from {ckpt.name} with a changed "
            f"{what} would change the run mid-way{why}; to resume, give {back}; to train with the new value, "
            "start a new run: another trainer.default_local_dir (or trainer.resume_mode=disable to start over there)"
        )
    return [
        f"resuming from {ckpt.name} with {k}={new} (was {old}): a key that may change on resume"
        for k, (old, new) in changed.items()
    ]


def _check_writable(key: str, path: Path) -> None:
    """The nearest existing ancestor must be a directory this process can create entries in: a
    probe directory is made there and removed (os.access says yes for root even on /proc or a
    read-only mount; nothing is left behind)."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    why = "not a directory" if not p.is_dir() else _probe_write(p)
    if why:
        raise ValueError(f"{key}={path}: {p} is not a writable directory ({why}); choose a writable location")


def _probe_write(directory: Path) -> str | None:
    """Why nothing can be created in `directory` (None if a probe directory could be made and removed)."""
    try:
        probe = tempfile.mkdtemp(prefix=".grpo-write-probe-", dir=directory)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.rmdir(probe)
    return None


def check_local_ray(cfg: GRPOConfig) -> None:
    """A CPU run on the local Ray (no RAY_ADDRESS) gets one CPU per core of this machine
    (engines/worker_group.py local_ray_cpus) and needs one per rank: more ranks are refused here,
    in the words of the flow's check_resources, not once Ray is up. GPUs: preflight's own check."""
    if cfg.trainer.device != "cpu" or os.environ.get("RAY_ADDRESS"):
        return
    from engines.worker_group import check_rank_count, local_ray_cpus

    check_rank_count(cfg, local_ray_cpus(), "the local Ray (one CPU per core of this machine) has")


def check_model_fit(cfg: GRPOConfig) -> None:
    """What the config asks of the model's shape and context, before any work, from its config.json
    fields (planner.shapes.model_config: a local config.json, a preset or the published table; a
    hub model outside the table is left to the backends): every parallel size must split its heads
    (planner.shape_problems, the rules the backends refuse at start-up: Ulysses, vLLM's tensor
    parallelism, Megatron's), and the context vLLM is given must fit the model's (context_problem)."""
    from planner import shape_problems
    from planner.shapes import model_config, shape_from_hf

    try:
        conf, source = model_config(cfg)
        shape = shape_from_hf(conf)
    except (ValueError, KeyError):  # unknown (hub) model, or config.json without the size fields
        return
    problems = [problem.partition("; ") for problem in shape_problems(cfg, shape)]
    if problems:  # each: what cannot split, (the shape's source), the fix
        raise ValueError(
            "; ".join(
                f"{what} (the model's shape from {source}); {fix or 'choose a size that does'}"
                for what, _, fix in problems
            )
        )
    problem = context_problem(cfg, conf, source)
    if problem:
        raise ValueError(problem)


# vLLM's rule for the longest context a model allows (vllm/config/model.py, _get_and_verify_max_len):
# the smallest of these config.json fields and the tokenizer's model_max_length, times the RoPE
# scaling factor unless its type already counts it in max_position_embeddings.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def context_limit(conf: dict, model_dir: Path | None = None) -> tuple[int, str] | None:
    """(tokens, what sets them) of the longest context the model of config.json fields `conf` (its
    tokenizer's files in `model_dir`, if local) allows, by vLLM's rule; None if no field says."""
    found = [(conf[k], f"{k}={conf[k]}") for k in CONTEXT_KEYS if isinstance(conf.get(k), int)]
    tokenizer = model_dir / "tokenizer_config.json" if model_dir is not None else None
    if tokenizer is not None and tokenizer.is_file():
        try:
            n = json.loads(tokenizer.read_text()).get("model_max_length")
        except ValueError:
            n = None
        if isinstance(n, int):
            found.append((n, f"the tokenizer's model_max_length={n}"))
    if not found:
        return None
    limit, what = min(found)
    rope = conf.get("rope_scaling") or conf.get("rope_parameters") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if (
        isinstance(factor, (int, float))
        and factor > 0
        and (rope.get("rope_type") or rope.get("type")) not in PRESCALED_ROPE
    ):
        limit, what = int(limit * factor), f"{what} x rope_scaling factor {factor}"
    return limit, what


def context_problem(cfg: GRPOConfig, conf: dict, source: str) -> str | None:
    """Why the context vLLM gets (rollout.max_model_len, else data.max_prompt_length +
    rollout.max_response_length) exceeds what the model allows (context_limit), naming the keys,
    the numbers and the fix; None if it fits, if unknown, or with VLLM_ALLOW_LONG_MAX_MODEL_LEN
    (vLLM then allows it, warning)."""
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true"):
        return None
    local = Path(source).parent if source.endswith("config.json") else None
    found = context_limit(conf, local)
    prompt, response, set_len = cfg.data.max_prompt_length, cfg.rollout.max_response_length, cfg.rollout.max_model_len
    want = set_len or prompt + response
    if found is None or want <= found[0]:
        return None
    limit, what = found
    if prompt + response > limit:
        fix = (
            f"lower rollout.max_response_length to at most {limit - prompt}"
            if prompt < limit
            else f"lower data.max_prompt_length and rollout.max_response_length to at most {limit} together"
        )
        if set_len:
            fix += f" and rollout.max_model_len to at most {limit} (or null)"
    else:
        fix = f"lower rollout.max_model_len to at most {limit} (or null)"
    asked = (
        f"rollout.max_model_len={set_len}"
        if set_len
        else f"data.max_prompt_length+rollout.max_response_length={prompt}+{response}={want}"
    )
    return f"{asked} is more than the model's context of {limit} tokens ({what}, {source}): vLLM refuses it; {fix}"
