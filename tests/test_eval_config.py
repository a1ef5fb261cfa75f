"""`grpo eval CHECKPOINT` (flows/cli.eval_target): without --config, the dataset, its prepared dir,
the lengths and eval settings are those the checkpoint's run recorded (trainer_state.json's
config); a checkpoint of an earlier build falls back to tiny-cpu with one printed line; an
explicit --config wins; a target that is neither recipe nor checkpoint is one error line."""

import json

import pytest

from configs.load import flatten, load_config
from flows.cli import eval_target, main
from flows.preflight import checkpoint_state

RUN = [
    "data.dir=/runs/other/data",
    "data.max_prompt_length=200",
    "rollout.max_response_length=64",
    "data.val_max_samples=7",
]


def _checkpoint(tmp_path, config=True):
    ckpt = tmp_path / "checkpoints" / "global_step_3"
    (ckpt / "huggingface").mkdir(parents=True)
    state = {"global_step": 3, "model": {}}
    if config:
        state = {**checkpoint_state(load_config("tiny-cpu", RUN), "run-id"), **state, "model": {}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_eval_of_a_checkpoint_takes_the_config_its_run_recorded(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    config, overrides = eval_target(str(ckpt), None, ["data.val_max_samples=5"])
    cfg = load_config(config, overrides)
    assert (cfg.data.dir, cfg.data.max_prompt_length, cfg.rollout.max_response_length) == ("/runs/other/data", 200, 64)
    assert cfg.data.val_max_samples == 5, "an override on the command line wins"
    assert cfg.data.data_source == load_config("tiny-cpu", RUN).data.data_source
    assert cfg.model.path == str(ckpt / "huggingface") and cfg.model.source == "hf"
    assert capsys.readouterr().out == ""
    # --config given: its settings, as before.
    cfg = load_config(*eval_target(str(ckpt), "tiny-cpu", []))
    assert cfg.data.dir == load_config("tiny-cpu").data.dir and cfg.model.path == str(ckpt / "huggingface")


def test_eval_of_a_checkpoint_without_a_recorded_config_says_it_uses_tiny_cpu(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, config=False)
    cfg = load_config(*eval_target(str(ckpt), None, []))
    assert flatten(cfg)["data.dir"] == flatten(load_config("tiny-cpu"))["data.dir"]
    assert capsys.readouterr().out.splitlines() == [
        f"{ckpt}: its checkpoint records no config (an earlier build); evaluating with --config tiny-cpu"
    ]


def test_eval_of_neither_a_recipe_nor_a_checkpoint_is_one_line(tmp_path, capsys):
    assert eval_target("tiny-cpu", None, [])[0] == "tiny-cpu"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "nosuch")])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: grpo eval {tmp_path / 'nosuch'}: neither a recipe/YAML nor a checkpoint directory")
    assert "tiny-cpu" in line and "global_step_N" in line


def test_layered_overrides_let_the_later_win():
    """What the code layers on purpose (an eval's recorded settings, then the user's, then forced keys)."""
    from configs.load import load_config, with_overrides
    from flows.cli import eval_target

    assert with_overrides(["data.dir=a", "rollout.n=4"], ["data.dir=b"]) == ["rollout.n=4", "data.dir=b"]
    _, overrides = eval_target("tiny-cpu", None, ["trainer.resume_mode=auto", "data.dir=d"])
    assert overrides == ["data.dir=d", "trainer.total_training_steps=1", "trainer.resume_mode=disable"]
    assert load_config("tiny-cpu", overrides).trainer.resume_mode == "disable"
