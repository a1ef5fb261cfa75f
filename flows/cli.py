"""`grpo run|prep|eval|plan|recipes`: the flow from a shell, no Prefect server needed.

Input errors (config, paths, data, model files) print one line naming the input and exit 2,
before any Prefect, Ray or model work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _fail(msg: str) -> "None":
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _load(config: str, overrides: list[str]):
    from configs.load import load_config
    from flows.preflight import preflight

    cfg = load_config(config, overrides)
    preflight(cfg)
    return cfg


def cmd_run(args) -> None:
    cfg = _load(args.config, args.overrides)
    from flows.grpo import grpo
    from tasks.stages import prepare

    prepare(cfg)  # data and model errors surface here as one line; the flow's prep then hits the cache
    from flows.preflight import check_resumable

    check_resumable(cfg)  # a preset model's vocab is known once built: a foreign checkpoint in one line
    final = grpo(args.config, args.overrides)
    print(
        f"done: recipe {cfg.recipe}, checkpoints in {cfg.checkpoint_dir}, "
        f"final score {final.get('critic/score/mean', float('nan')):.3f}"
    )


def cmd_prep(args) -> None:
    cfg = _load(args.config, args.overrides)
    from tasks.stages import prep

    _, _, train, test = prep(cfg)
    print(f"prepared {len(train)} train / {len(test)} test rows in {cfg.data.dir}")


# What an eval of a checkpoint takes from the config its run recorded (flows/preflight.checkpoint_state):
# the dataset, its prepared dir (tokenized with the checkpoint's tokenizer), lengths, reward, eval settings.
EVAL_KEYS = tuple(
    """
    data.data_source data.source data.dir data.max_prompt_length data.filter_overlong_prompts
    data.val_max_samples rollout.max_response_length rollout.val_temperature
    reward.function reward.on_error reward.gsm8k_scorer reward.format_score
    """.split()
)


def eval_target(target: str, config: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) that evaluate `target`: a recipe's model, or a checkpoint's HF export
    (`.../global_step_N`, a LoRA run's merged) under the settings of recipe `config`, else of the
    config the checkpoint's run recorded (EVAL_KEYS over its recipe), else of tiny-cpu. An eval
    resumes nothing, so the training resume guard (a checkpoint dir left by another model or LoRA
    rank) is off: trainer.resume_mode=disable."""
    from pathlib import Path

    from configs.load import CONFIG_DIR, recipe_names, with_overrides
    from flows.evaluate import checkpoint_export
    from flows.preflight import recorded_config

    overrides = list(overrides)
    ckpt = Path(target)
    hf = checkpoint_export(ckpt)  # ValueError: a checkpoint without its export
    if hf is not None:
        run = recorded_config(ckpt)
        if config is None and run:
            config = run["recipe"] if run.get("recipe") in recipe_names() else "tiny-cpu"
            recorded = [f"{k}={'null' if run[k] == 'None' else run[k]}" for k in EVAL_KEYS if k in run]
            overrides = with_overrides(recorded, overrides)  # the user's keys over the run's
        elif config is None:
            config = "tiny-cpu"
            print(f"{target}: its checkpoint records no config (an earlier build); evaluating with --config {config}")
        overrides = with_overrides(overrides, [f"model.path={hf}", "model.source=hf", "model.lora_rank=0"])
    else:
        if not (ckpt.suffix in (".yaml", ".yml") and ckpt.is_file() or (CONFIG_DIR / f"{target}.yaml").is_file()):
            raise ValueError(
                f"grpo eval {target}: neither a recipe/YAML nor a checkpoint directory; give a YAML path, one of: "
                f"{', '.join(recipe_names())}, or a checkpoint's global_step_N (with its huggingface/ export)"
            )
        config = target
    return config, with_overrides(overrides, ["trainer.total_training_steps=1", "trainer.resume_mode=disable"])


def cmd_eval(args) -> None:
    """Evaluate a recipe's model, or a checkpoint's HF export (`.../global_step_N`)."""
    config, overrides = eval_target(args.target, args.config, args.overrides)
    cfg = _load(config, overrides)
    from envs import get_env
    from flows.evaluate import evaluate_model

    score = evaluate_model(config, overrides)
    env = get_env(cfg.data.data_source)
    # The headline is the env's accuracy only with the built-in reward; else reward.function's mean.
    what = f"reward.function {cfg.reward.function}" if cfg.reward.function else f"{env.name} accuracy"
    print(f"{env.name} test mean@1 = {score:.4f} ({what}; MLflow key {env.val_key()})")


def cmd_recipes(args) -> None:
    from configs.load import load_config, recipe_names

    for name in recipe_names():
        cfg = load_config(name)
        note = f"  [needs: {cfg.requires}]" if cfg.requires else ""
        print(f"{name:28s} {cfg.model.path:34s} {cfg.world_size} x {cfg.trainer.device}{note}")


def cmd_plan(args) -> None:
    """Per-GPU memory, FLOPs and step time from the model's shape: no GPU, no weights needed. Exit
    code: 0 if the verdict is FITS, 1 for DOES NOT FIT, INVALID or NOT MODELLED (2: bad input)."""
    import json

    from configs.load import load_config
    from planner import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, args.gpu, as_configured=args.as_configured)
    if args.json:
        print(json.dumps(p, indent=1))
    else:
        print(format_plan(p, plan(cfg, args.gpu, as_configured=not args.as_configured)))
    if p["verdict"] != "FITS":
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="grpo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (
        ("run", cmd_run, "train: the grpo flow"),
        ("prep", cmd_prep, "build model files and the dataset's parquet only"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="recipe name (see `grpo recipes`) or YAML path")
        s.add_argument("overrides", nargs="*", help="dotted key=value, e.g. actor.lr=1e-5")
        s.set_defaults(fn=fn)
    s = sub.add_parser("eval", help="test accuracy (mean@1) of a recipe's model or of a checkpoint dir")
    s.add_argument("target", help="recipe name/YAML, or a global_step_N checkpoint directory")
    s.add_argument("overrides", nargs="*")
    s.add_argument(
        "--config",
        default=None,
        help="recipe whose settings eval a checkpoint (default: the config its run recorded, else tiny-cpu)",
    )
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser(
        "plan",
        help="per-GPU memory / FLOPs / time estimate and fit verdict (no GPU needed; exit 1 unless it fits)",
    )
    s.add_argument("config", help="recipe name (see `grpo recipes`) or YAML path")
    s.add_argument("overrides", nargs="*", help="dotted key=value, e.g. actor.ppo_micro_batch_size_per_gpu=8")
    s.add_argument("--gpu", help="H100, H800, H200, H20 or A100 (default: from the recipe name, else H100)")
    s.add_argument(
        "--as-configured",
        action="store_true",
        help="model FSDP sharding and offload as the config states, not as the trainer does today",
    )
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    s.set_defaults(fn=cmd_plan)
    sub.add_parser("recipes", help="list recipes").set_defaults(fn=cmd_recipes)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Prefect's temporary local server: its telemetry heartbeat races the SQLite writer ("database
    # is locked" tracebacks) and phones home; neither is wanted for a local run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its start-up can exceed the 20 s default on a cold machine (first imports, migrations).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # `grpo prep` runs a bare task
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from engines.worker_group import CollectiveTimeout, WorkerOOMError

    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, WorkerOOMError, CollectiveTimeout) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
