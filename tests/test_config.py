"""Config schema, recipe files and the CLI's answers to bad input (no Ray, no vLLM needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from configs.load import (
    ConfigError,
    flatten,
    load_config,
    parse_overrides,
    recipe_names,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
# The table of reference recipes the project was seeded with. It lies beside the repository (shared/, which
# CI also lays beside its clone), not in it: no product code reads it; this test checks that every recipe
# named there has a config here.
RECIPES_MD = ROOT.parent / "shared" / "docs" / "recipes.md"


def test_every_reference_recipe_has_a_config_that_validates():
    names = set(recipe_names())
    expected = (
        {line.split("|")[1].strip() for line in RECIPES_MD.read_text().splitlines() if line.startswith("| qwen2-")}
        if RECIPES_MD.exists()
        else set()
    )
    assert expected <= names and len(expected) == 12
    assert {"tiny-cpu", "smollm2-135m-cpu"} <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name and cfg.tracking.run_name == name


@pytest.mark.parametrize(
    "name,gpus,batch,micro,tp,util,n,lr",
    [
        ("qwen2-0.5b-lora-1xh100", 1, 116, 116, 1, 0.1, 5, 3e-5),
        ("qwen2-32b-lora-4xh100", 4, 180, 45, 4, 0.3, 5, 3e-5),
        ("qwen2-14b-4xh800", 4, 1024, 16, 4, 0.5, 5, 1e-6),
        ("qwen2-70b-32xh800", 32, 1024, 1, 16, 0.6, 5, 1e-6),
    ],
)
def test_recipes_carry_the_reference_hyperparameters(name, gpus, batch, micro, tp, util, n, lr):
    c = load_config(name)
    assert (c.world_size, c.data.train_batch_size, c.actor.ppo_micro_batch_size_per_gpu) == (gpus, batch, micro)
    assert (c.rollout.tensor_model_parallel_size, c.rollout.gpu_memory_utilization) == (tp, util)
    assert (c.rollout.n, c.actor.lr) == (n, lr)
    assert c.actor.use_kl_loss and c.actor.kl_loss_coef == 0.001 and c.actor.kl_loss_type == "low_var_kl"


def test_lora_recipe_fixes_the_reference_debug_leftover():
    c = load_config("qwen2-0.5b-lora-1xh100")
    assert c.data.train_batch_size == 116 and c.rollout.n == 5 and c.model.lora_rank == 32
    assert c.rollout.max_model_len == 1536 and c.trainer.save_freq == 20 and c.trainer.test_freq == 5


@pytest.mark.parametrize("bad", ["actor.lr=[1", "actor.lr={", 'data.dir="abc', "actor.lr=!!python/object:os.system ls"])
def test_an_override_value_that_is_not_yaml_is_one_error_line(bad):
    with pytest.raises(ConfigError) as e:
        parse_overrides([bad])
    assert "\n" not in str(e.value) and str(e.value).startswith(f"override '{bad}': its value is not valid YAML (")


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["rollout.n=4", "data.shuffle=false", "tracking.run_name=a=b"]) == {
        "rollout": {"n": 4},
        "data": {"shuffle": False},
        "tracking": {"run_name": "a=b"},
    }
    cfg = load_config("tiny-cpu", ["rollout.n=2", "actor.ppo_micro_batch_size_per_gpu=2", "actor.lr=1e-5"])
    assert cfg.rollout.n == 2 and cfg.actor.ppo_micro_batch_size_per_gpu == 2 and cfg.actor.lr == 1e-5
    flat = flatten(cfg)
    assert flat["rollout.n"] == "2" and flat["model.arch"] == "tiny"


@pytest.mark.parametrize(
    "overrides,line",
    [
        (["data.dir=a", "data.dir=b"], "data.dir given twice (a, b): give it once"),
        (["rollout.n=4", " rollout.n =4"], "rollout.n given twice (4, 4): give it once"),  # same value: still once
        (["data={dir: a}", "data.dir=b"], "override 'data.dir=b' conflicts with 'data={dir: a}': give one of them"),
        (["data.dir=b", "data={dir: a}"], "override 'data={dir: a}' conflicts with 'data.dir=b': give one of them"),
    ],
)
def test_a_key_given_twice_is_one_error_naming_both_values(overrides, line):
    """A repeated override used to take the last silently; which one was meant is not ours to guess."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", overrides)
    assert str(e.value) == line


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["actor.lrr=1"], "unknown key 'actor.lrr'"),
        (["nosuchsection.x=1"], "unknown key 'nosuchsection'"),
        (["actor.lr=fast"], "actor.lr"),
        (["rollout.n=0"], "rollout.n"),
        (["trainer.device=tpu"], "trainer.device"),
        (["data.train_batch_size=6"], "must be a multiple of actor.ppo_mini_batch_size=4"),
        (["actor.ppo_micro_batch_size_per_gpu=5"], "actor.ppo_micro_batch_size_per_gpu=5"),
        (
            [
                "actor.use_dynamic_bsz=true",
                "actor.ppo_max_token_len_per_gpu=100",
                "data.max_prompt_length=64",
                "rollout.max_response_length=64",
            ],
            "actor.ppo_max_token_len_per_gpu=100 must be at least data.max_prompt_length+rollout.max_response_length=128",
        ),
        (["actorlr"], "section.key=value"),
        (
            ["trainer.n_gpus_per_node=2", "actor.ulysses_sequence_parallel_size=4"],
            "actor.ulysses_sequence_parallel_size=4 must divide the 2 GPUs",
        ),
        (["actor.ulysses_sequence_parallel_size=2"], "must divide the 1 GPU of the run"),  # not "1 GPUs"
        (
            [
                "trainer.n_gpus_per_node=4",
                "actor.ppo_micro_batch_size_per_gpu=1",
                "rollout.tensor_model_parallel_size=3",
            ],
            "rollout.tensor_model_parallel_size=3 must divide trainer.n_gpus_per_node=4",
        ),
        (
            [
                "trainer.n_gpus_per_node=4",
                "trainer.nnodes=2",
                "actor.ppo_micro_batch_size_per_gpu=1",
                "rollout.tensor_model_parallel_size=6",
            ],
            "rollout.tensor_model_parallel_size=6 must divide trainer.n_gpus_per_node=4 (or be a multiple of it",
        ),
        # issue 13 (4): vLLM's context must hold the longest prompt and response
        (
            ["rollout.max_model_len=64"],
            "rollout.max_model_len=64 is less than data.max_prompt_length+rollout.max_response_length=",
        ),
        (["rollout.max_num_batched_tokens=100"], "rollout.max_num_batched_tokens=100 is less than the context length"),
        (
            ["rollout.max_num_batched_tokens=1024", "rollout.max_num_seqs=2048"],
            "rollout.max_num_batched_tokens=1024 is less than rollout.max_num_seqs=2048",
        ),
        # issue 13 (5): greedy sampling gives GRPO nothing to learn from
        (["rollout.temperature=0"], "rollout.temperature=0 samples greedily"),
        # a fresh clone's review: negative lengths and a zero frequency were accepted and did nothing
        # ... and a range error of a field whose -1 is a sentinel says what -1 means
        (["trainer.save_freq=-5"], "(got -5); -1 means checkpoint only at the last step (N >= 1: every N steps)"),
        (
            ["trainer.test_freq=-2"],
            "trainer.test_freq: Input should be greater than or equal to -1 (got -2); -1 means never",
        ),
        (["rollout.top_k=-7"], "rollout.top_k: Input should be greater than or equal to -1 (got -7); -1 means sample"),
        (["trainer.test_freq=0"], "trainer.test_freq=0 is not a frequency; use N >= 1 (every N steps) or -1"),
        (["trainer.save_freq=0"], "trainer.save_freq=0 is not a frequency"),
        (["actor.lr_warmup_steps=-5"], "-1 means derive it from actor.lr_warmup_steps_ratio (0: no warmup)"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("tiny-cpu", overrides)
    assert needle in str(e.value)


def test_context_length_of_a_lora_recipe():
    """issue 13 (4): max_model_len 1536 < 1024 + 1024; the recipe as shipped (512 + 1024) is fine."""
    cfg = load_config("qwen2-0.5b-lora-1xh100")
    assert cfg.rollout.max_model_len == cfg.data.max_prompt_length + cfg.rollout.max_response_length == 1536
    with pytest.raises(ConfigError) as e:
        load_config("qwen2-0.5b-lora-1xh100", ["data.max_prompt_length=1024"])
    assert (
        "rollout.max_model_len=1536 is less than data.max_prompt_length+rollout.max_response_length=2048"
        in str(e.value)
    ) and "\n" not in str(e.value)
    # chunked prefill on (CUDA): a smaller token budget is vLLM's to chunk; off, it must hold a whole prompt
    load_config("qwen2-0.5b-lora-1xh100", ["rollout.enable_chunked_prefill=true", "rollout.max_num_batched_tokens=512"])
    with pytest.raises(ConfigError, match="rollout.max_num_batched_tokens=512 is less than the context length 1536"):
        load_config("qwen2-0.5b-lora-1xh100", ["rollout.max_num_batched_tokens=512"])
    # greedy evaluation stays allowed
    assert load_config("tiny-cpu", ["rollout.val_temperature=0"]).rollout.val_temperature == 0


def test_malformed_yaml_and_unknown_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: {lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+, column \d+ \(.+\); fix the syntax"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config 'nope' not found"):
        load_config("nope")


def test_a_recipe_key_given_twice_a_folder_or_non_utf8_is_one_error_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("extends: tiny-cpu.yaml\nactor: {lr: 1.0e-4}\nrollout:\n  n: 4\n  n: 8\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML at line 5, column 3 \(key 'n' given twice"):
        load_config(str(twice))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="dir.yaml: not a file; give a recipe's YAML file"):
        load_config(str(tmp_path / "dir.yaml"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"\xff\xfeactor: {}\n")
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 0\); save the recipe as UTF-8"):
        load_config(str(latin))
    with pytest.raises(
        ConfigError, match=r"override 'data=\{dir: a, dir: b\}': its value is not valid YAML \(key 'dir'"
    ):
        parse_overrides(["data={dir: a, dir: b}"])


def run_cli(tmp_path, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def _bad_dataset_dirs(tmp_path):
    no_cols = tmp_path / "nocols"
    no_cols.mkdir()
    for split in ("train", "test"):
        pd.DataFrame({"question": ["q"], "text": ["a"]}).to_parquet(no_cols / f"{split}.parquet")
    bad_truth = tmp_path / "badtruth"
    bad_truth.mkdir()
    for split in ("train", "test"):
        (bad_truth / f"{split}.jsonl").write_text(json.dumps({"question": "q", "answer": "x #### five"}) + "\n")
    return no_cols, bad_truth


def _bad_model_dirs(tmp_path):
    partial = tmp_path / "partial-model"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    for name, text in (
        ("config.json", "{}"),
        ("model.safetensors", ""),
        ("tokenizer.json", "{}"),
        ("tokenizer_config.json", "{}"),
    ):
        (no_template / name).write_text(text)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("extends: tiny-cpu.yaml\nactor: {lr: [1,\n")
    return partial, no_template, bad_yaml


CASES = [
    "missing_data",
    "no_columns",
    "bad_truth",
    "unknown_key",
    "repeated_key",
    "ckpt_changed_math",
    "wrong_type",
    "missing_model",
    "partial_model",
    "no_chat_template",
    "malformed_yaml",
    "batch_divisibility",
    "unwritable_ckpt",
    "mlflow_unreachable",
    "lora_target",
    "gpu_recipe",
    "megatron_recipe",
    "multi_gpu_recipe",
    "empty_dataset",
    "all_prompts_overlong",
    "ckpt_other_model",
    "bad_reward_fn",
    "unknown_data_source",
]


def _recorded_checkpoint(tmp_path, model: str):
    """A checkpoint dir of a tiny-cpu run with rollout.n=2, its config recorded as the flow records it."""
    from flows.preflight import checkpoint_state

    root = tmp_path / "ckpt-n2"
    cfg = load_config("tiny-cpu", [model, "rollout.n=2", f"trainer.default_local_dir={root}"])
    (root / "global_step_2").mkdir(parents=True)
    state = {**checkpoint_state(cfg, "run-id"), "global_step": 2}
    (root / "global_step_2" / "trainer_state.json").write_text(json.dumps(state))
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return root


def _foreign_checkpoint(root: Path, **model) -> Path:
    """A checkpoint dir as another run left it: written for another model shape."""
    sig = {
        "model.path": "models/tiny-qwen2",
        "model.lora_rank": 0,
        "world_size": 1,
        "shape": {"hidden": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 384},
    }
    sig.update(model)
    (root / "global_step_2").mkdir(parents=True)
    (root / "global_step_2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "model": sig}))
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return root


@pytest.mark.slow  # a subprocess each: ~5 s of imports per case
@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input_one_clear_line_nothing_written(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    no_cols, bad_truth = _bad_dataset_dirs(tmp_path)
    partial, no_template, bad_yaml = _bad_model_dirs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    (empty / "test.jsonl").write_text("")
    other_model = _foreign_checkpoint(
        tmp_path / "ckpt-a", shape={"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864}
    )
    model = f"model.path={ROOT / 'models' / 'tiny-qwen2'}"
    args, needle = {
        "all_prompts_overlong": (
            [
                "run",
                "tiny-cpu",
                model,
                f"data.source={GSM8K}",
                f"data.dir={tmp_path / 'data'}",
                "data.max_prompt_length=8",
            ],
            "data.max_prompt_length=8",
        ),
        "bad_reward_fn": (["run", "tiny-cpu", "reward.function=nosuch.module:fn"], "module 'nosuch.module' not found"),
        "unknown_data_source": (
            ["run", "tiny-cpu", "data.data_source=my/dataset"],
            "data.data_source=my/dataset is not supported in this build (have: openai/gsm8k)",
        ),
        "ckpt_other_model": (
            ["run", "tiny-cpu", model, f"trainer.default_local_dir={other_model}"],
            "another model (shape",
        ),
        "ckpt_changed_math": (
            ["run", "tiny-cpu", model, f"trainer.default_local_dir={_recorded_checkpoint(tmp_path, model)}"],
            "resuming from global_step_2 with a changed rollout.n (2 -> 4) would change the run mid-way",
        ),
        "partial_model": (["run", "tiny-cpu", "model.source=hf", f"model.path={partial}"], "no weights"),
        "no_chat_template": (["run", "tiny-cpu", "model.source=hf", f"model.path={no_template}"], "chat template"),
        "malformed_yaml": (["run", str(bad_yaml)], "not valid YAML"),
        "batch_divisibility": (["run", "tiny-cpu", "data.train_batch_size=6"], "data.train_batch_size=6"),
        "unwritable_ckpt": (
            ["run", "tiny-cpu", "trainer.default_local_dir=/etc/hostname/ckpt"],
            "trainer.default_local_dir=/etc/hostname/ckpt",
        ),
        "mlflow_unreachable": (
            ["run", "tiny-cpu", "tracking.tracking_uri=http://127.0.0.1:9"],
            "tracking.tracking_uri=http://127.0.0.1:9",
        ),
        "lora_target": (
            ["run", "tiny-cpu", "model.lora_rank=8", "model.target_modules=[q_proj,qkv_proj]"],
            "['qkv_proj'] not in the model",
        ),
        "empty_dataset": (["run", "tiny-cpu", f"data.source={empty}"], str(empty)),
        "missing_data": (["run", "tiny-cpu", "data.source=/no/such/gsm8k"], "data.source=/no/such/gsm8k"),
        "no_columns": (["run", "tiny-cpu", f"data.source={no_cols}"], "answer"),
        "bad_truth": (["run", "tiny-cpu", f"data.source={bad_truth}"], "five"),
        "unknown_key": (["run", "tiny-cpu", "actor.lr_warmup=3"], "actor.lr_warmup"),
        "repeated_key": (["run", "tiny-cpu", "data.dir=a", "data.dir=b"], "data.dir given twice (a, b): give it once"),
        "wrong_type": (["run", "tiny-cpu", "rollout.n=many"], "rollout.n"),
        "missing_model": (["run", "tiny-cpu", "model.source=hf", "model.path=/no/model"], "model.path=/no/model"),
        "gpu_recipe": (["run", "qwen2-0.5b-lora-1xh100"], "needs 1 GPU"),
        "megatron_recipe": (["run", "qwen2-32b-megatron-8xh20"], "Megatron"),
        "multi_gpu_recipe": (["run", "qwen2-14b-4xh800"], "needs 4 GPUs"),
    }[case]
    res = run_cli(work, *args)
    assert res.returncode == 2, res.stderr[-2000:]
    # Progress bars of work done before the error (building a model) may come first.
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in res.stderr, res.stderr
    assert needle in errors[0], errors[0]
    assert list(work.iterdir()) == [], "a rejected run must write nothing"
    assert not (tmp_path / "data").exists(), "prep must not write parquet for rejected data"
    assert sorted(p.name for p in other_model.iterdir()) == ["global_step_2", "latest_checkpointed_iteration.txt"]


def test_eval_of_a_lora_checkpoint_is_not_refused_by_the_training_resume_guard(tmp_path):
    """issue 13 (10): `grpo eval checkpoints/<run>/global_step_N` of a LoRA run evaluates its merged
    HF export (model.lora_rank=0); the run's checkpoint dir holds lora_rank 8, which the training
    resume guard rightly refuses for a run, but an eval resumes nothing."""
    import shutil

    from engines.models import materialize
    from flows.cli import _load, eval_target

    model_dir = materialize(
        "random", str(tmp_path / "m" / "tiny"), corpus=[f"Tom has {i} apples. #### {i}" for i in range(200)]
    )
    root = _foreign_checkpoint(tmp_path / "ckpt", **{"model.lora_rank": 8})  # a LoRA run's checkpoint
    shutil.copytree(model_dir, root / "global_step_2" / "huggingface")
    base = [
        f"trainer.default_local_dir={root}",
        f"data.source={GSM8K}",
        f"data.dir={tmp_path / 'data'}",
        f"model.path={model_dir}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    with pytest.raises(ValueError, match="model.lora_rank: checkpoint 8 vs config 0"):
        _load("tiny-cpu", base)  # training there with another LoRA rank: refused, as before
    config, overrides = eval_target(str(root / "global_step_2"), "tiny-cpu", base)
    cfg = _load(config, overrides)
    assert cfg.model.path == str(root / "global_step_2" / "huggingface") and cfg.model.lora_rank == 0
    assert eval_target("tiny-cpu", "ignored", base)[0] == "tiny-cpu"  # a recipe: its own model


def test_top_k_below_minus_one_is_a_config_error():
    """vLLM takes -1/0 (all tokens) or k >= 1; -7 used to fail inside the engine after the run began."""
    with pytest.raises(ValueError, match="rollout.top_k"):
        load_config("tiny-cpu", ["rollout.top_k=-7"])
    assert load_config("tiny-cpu", ["rollout.top_k=-1"]).rollout.top_k == -1


@pytest.mark.parametrize(
    "overrides,line",
    [
        (
            ["algorithm.use_kl_in_reward=true"],
            "algorithm.use_kl_in_reward=true (a KL penalty in the reward) is not "
            "supported in this build; GRPO puts the KL in the loss: actor.use_kl_loss=true, actor.kl_loss_coef",
        ),
        (
            ["actor.megatron.tensor_model_parallel_size=8"],
            "actor.megatron.tensor_model_parallel_size=8 is read only by "
            "actor.strategy=megatron, not by actor.strategy=fsdp2; leave it unset (FSDP2 shards over every GPU)",
        ),
        (["algorithm.adv_estimator=gae"], "algorithm.adv_estimator=gae is not supported in this build (choose 'grpo')"),
        (
            ["rollout.layered_summon=true"],
            "unknown key 'rollout.layered_summon' (check the spelling; see configs/schema.py)",
        ),
    ],
)
def test_knobs_this_build_does_not_implement_are_one_error_line(overrides, line):
    """Issue 15 (6): a key is implemented or refused, never accepted and ignored. (actor.strategy and
    rollout.name name backends: tests/test_seams.py.)"""
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(line), msg


def test_format_score_is_for_the_builtin_reward_only():
    assert load_config("tiny-cpu", ["reward.format_score=0.1"]).reward.format_score == 0.1
    with pytest.raises(ValueError, match="reward.format_score"):
        load_config("tiny-cpu", ["reward.format_score=0.1", "reward.function=tests.toy_reward:letter_e_share"])
    with pytest.raises(ValueError, match="format_score"):
        load_config("tiny-cpu", ["reward.format_score=1.5"])


def test_readme_cli_examples_load():
    """A fresh clone's review: the README's `data.train_batch_size=64` example was refused by its own
    recipe. Every `grpo run|prep|plan <recipe> key=value ...` the README shows must load."""
    import re

    readme = (ROOT / "README.md").read_text()
    found = re.findall(r"grpo (?:run|prep|plan|eval) ([\w.-]+)((?: [a-z_]+\.[\w.]+=[^\s`]+)*)", readme)
    examples = [(name, args.split()) for name, args in found if name in recipe_names()]
    assert any(args for _, args in examples) and ("qwen2-0.5b-lora-1xh100" in dict(examples))
    for name, args in examples:
        load_config(name, args)  # ConfigError names the example that broke


def test_extends_a_missing_file_is_one_line_and_ours_are_found_anywhere(tmp_path):
    """A fresh clone's review: `extends:` of a missing file gave a raw errno message."""
    mine = tmp_path / "my.yaml"
    mine.write_text("extends: nosuch.yaml\nactor: {lr: 1.0e-5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(mine))
    msg = str(e.value)
    assert "\n" not in msg and "Errno" not in msg, msg
    assert msg.startswith(f"{mine}: `extends: nosuch.yaml` names a missing file ({tmp_path / 'nosuch.yaml'})")
    assert f"give a path relative to {tmp_path}" in msg and "tiny-cpu.yaml" in msg
    for parent in ("tiny-cpu.yaml", "tiny-cpu"):  # one of ours, from a recipe outside configs/
        mine.write_text(f"extends: {parent}\nactor: {{lr: 1.0e-5}}\n")
        cfg = load_config(str(mine))
        assert cfg.actor.lr == 1e-5 and cfg.model.arch == load_config("tiny-cpu").model.arch


@pytest.mark.parametrize(
    "override,line",
    [
        ("actor_rollout_ref.actor.lr=1e-5", "unknown key 'actor_rollout_ref.actor.lr' (verl's name; here: actor.lr)"),
        ("actor_rollout_ref.rollout.n=4", "unknown key 'actor_rollout_ref.rollout.n' (verl's name; here: rollout.n)"),
        (
            "actor_rollout_ref.model.path=m",
            "unknown key 'actor_rollout_ref.model.path' (verl's name; here: model.path)",
        ),
        ("actor_rollout_ref.actor.optim.lr=1e-5", "'actor_rollout_ref.actor.optim.lr' (verl's name; here: actor.lr)"),
        ("actor.fsdp_config.param_offload=true", "(verl's name; here: actor.param_offload)"),
        ("algorithm.kl_ctrl.kl_coef=0.01", "(verl's name; here: actor.kl_loss_coef; verl's kl_ctrl weighs a KL"),
        ("actor_rollout_ref.actor.nosuch=1", "but actor.nosuch is no key either; see configs/schema.py)"),
        ("data.train_batch_size=4", None),  # verl's data.* names are ours
    ],
)
def test_verl_names_point_to_ours(override, line):
    """A fresh clone's review: verl's full names (actor_rollout_ref.actor.lr, ...) got only
    'check the spelling'; an unknown key that is a verl name now names our key."""
    if line is None:
        load_config("tiny-cpu", [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [override])
    assert "\n" not in str(e.value) and line in str(e.value), str(e.value)


def test_every_config_field_is_documented():
    """Every knob says what it does where it is declared (its docstring is its pydantic description)."""
    from configs.schema import GRPOConfig

    undocumented = [k for k, f in GRPOConfig.model_fields.items() if not f.description]
    for section, f in GRPOConfig.model_fields.items():
        if hasattr(f.annotation, "model_fields"):
            undocumented += [f"{section}.{k}" for k, v in f.annotation.model_fields.items() if not v.description]
    assert undocumented == []


def test_no_recipe_repeats_the_defaults_its_file_name_gives():
    """tracking.run_name and trainer.default_local_dir default from the recipe's file name; a recipe
    that writes them again says one fact twice (and keeps the old name after a rename)."""
    import yaml

    from configs.load import CONFIG_DIR

    repeated = []
    for name in recipe_names():
        raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        tracking, trainer = raw.get("tracking") or {}, raw.get("trainer") or {}
        if tracking.get("run_name") == name:
            repeated.append(f"{name}: tracking.run_name")
        if trainer.get("default_local_dir") in (f"checkpoints/{name}", "checkpoints/${run_name}"):
            repeated.append(f"{name}: trainer.default_local_dir")
        if "run_name" not in tracking and "default_local_dir" not in trainer:
            cfg = load_config(name)
            assert (cfg.tracking.run_name, cfg.trainer.default_local_dir) == (name, f"checkpoints/{name}")
    assert repeated == []
