"""Resuming with changed overrides: one warning line per changed training key, naming the key, the
checkpoint's value, the config's value and which of them the run uses; the claim that the
optimizer's keys come back from the checkpoint is checked on a real trainer."""

import json

import pytest
import torch

from configs.load import flatten, load_config
from engines.trainer.fsdp import FSDPTrainer
from flows.preflight import RESTORED, TRAINING_KEYS, checkpoint_state, resume_warnings


def _checkpoint(tmp_path, cfg):
    """A checkpoint's trainer_state.json as the flow writes it (checkpoint_state)."""
    ckpt = tmp_path / "global_step_2"
    ckpt.mkdir()
    state = {**checkpoint_state(cfg, "run-id"), "global_step": 2, "export_hf": False}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_each_changed_training_key_is_one_warning_line(tmp_path):
    ckpt = _checkpoint(tmp_path, load_config("tiny-cpu", ["actor.lr=3e-5", "rollout.temperature=1.0"]))
    # Changed: one key the checkpoint restores, one the config sets; not training keys: the run name
    # and the eval subset.
    now = load_config(
        "tiny-cpu",
        ["actor.lr=1e-5", "rollout.temperature=0.7", "tracking.run_name=other", "data.val_max_samples=4"],
    )
    assert resume_warnings(now, ckpt) == [
        "resuming from global_step_2 with a changed actor.lr: the checkpoint's 3e-05 stays in effect, not "
        "the config's 1e-05 (restored with the optimizer state); to train with 1e-05, start over: "
        "trainer.resume_mode=disable or another trainer.default_local_dir",
        "resuming from global_step_2 with a changed rollout.temperature: the config's 0.7 takes effect from "
        "step 3 (the checkpoint was written with 1.0)",
    ]
    assert resume_warnings(load_config("tiny-cpu", ["actor.lr=3e-5", "tracking.run_name=x"]), ckpt) == []


def test_a_checkpoint_without_a_recorded_config_gives_no_warning(tmp_path):
    ckpt = tmp_path / "global_step_2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "model": {}}))
    assert resume_warnings(load_config("tiny-cpu", ["actor.lr=1e-5"]), ckpt) == []


def test_every_training_key_is_a_config_key():
    """A misspelt key would never warn."""
    assert set(TRAINING_KEYS) <= set(flatten(load_config("tiny-cpu"))) and set(RESTORED) <= set(TRAINING_KEYS)


def _trainer(model_dir, *overrides):
    cfg = load_config("tiny-cpu", ["rollout.n=2", "actor.ppo_mini_batch_size=4", "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    return FSDPTrainer(cfg, model_dir, "cpu")


@pytest.mark.parametrize(
    "key, saved, changed",
    [("actor.lr", 3e-5, 1e-5), ("actor.betas", (0.9, 0.99), (0.8, 0.9)), ("actor.weight_decay", 0.1, 0.0)],
)
def test_the_keys_said_to_stay_come_back_from_the_checkpoint(model_dir, tmp_path, key, saved, changed):
    """RESTORED's warning says the checkpoint's value stays: AdamW's param group and the LR
    scheduler's base rate after load are the saved ones, not the config's."""
    fmt = lambda v: f"[{v[0]},{v[1]}]" if isinstance(v, tuple) else str(v)  # noqa: E731
    first = _trainer(model_dir, f"{key}={fmt(saved)}")
    first.save(str(tmp_path / "ck"))
    resumed = _trainer(model_dir, f"{key}={fmt(changed)}")
    name = key.split(".")[1]
    group = resumed.optimizer.param_groups[0]
    assert group["initial_lr" if name == "lr" else name] == pytest.approx(changed)
    resumed.load(str(tmp_path / "ck"))
    group = resumed.optimizer.param_groups[0]
    assert group["initial_lr" if name == "lr" else name] == pytest.approx(saved), key
    if name == "lr":
        assert resumed.scheduler.base_lrs == pytest.approx([saved])
    assert key in RESTORED
