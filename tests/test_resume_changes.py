"""Resuming with changed overrides: one warning line per changed training key, naming the key, the
checkpoint's value, the config's value and which of them the run uses; the claim that the
optimizer's keys come back from the checkpoint is checked on a real trainer."""

import json

import pytest
import torch

from configs.load import flatten, load_config
from engines.trainer.fsdp import FSDPTrainer
from flows.preflight import (
    RESTORED,
    TRAINING_KEYS,
    check_resumable,
    checkpoint_state,
    in_effect,
    model_signature,
    resume_warnings,
)


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


def _state(ckpt, cfg, restored=None):
    """trainer_state.json as the flow writes it beside the trainer's files in global_step_<N>."""
    state = {**checkpoint_state(cfg, "run-id", restored), "global_step": int(ckpt.name.rsplit("_", 1)[1])}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_a_checkpoint_records_the_lr_in_effect_not_the_config_s(model_dir, tmp_path):
    """Resume with a changed actor.lr (the checkpoint's stays), then resume again with the first
    value back: the second checkpoint records the lr that trained it, so the second resume gives no
    warning, and one that changes it again names the value truly in effect."""
    ck2, ck4 = tmp_path / "global_step_2", tmp_path / "global_step_4"
    first = _trainer(model_dir, "actor.lr=1e-4")
    first.save(str(ck2 / "actor"))
    _state(ck2, load_config("tiny-cpu", ["actor.lr=1e-4"]))

    changed = load_config("tiny-cpu", ["actor.lr=5e-4"])
    assert resume_warnings(changed, ck2) == [
        "resuming from global_step_2 with a changed actor.lr: the checkpoint's 0.0001 stays in effect, not "
        "the config's 0.0005 (restored with the optimizer state); to train with 0.0005, start over: "
        "trainer.resume_mode=disable or another trainer.default_local_dir"
    ]
    second = _trainer(model_dir, "actor.lr=5e-4")
    second.load(str(ck2 / "actor"))
    assert second.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    restored = in_effect(ck2)
    second.save(str(ck4 / "actor"))
    _state(ck4, changed, restored)
    recorded = json.loads((ck4 / "trainer_state.json").read_text())["config"]
    assert recorded["actor.lr"] == "0.0001" and recorded["rollout.n"] == flatten(changed)["rollout.n"]

    back = load_config("tiny-cpu", ["actor.lr=1e-4"])
    assert resume_warnings(back, ck4) == []
    third = _trainer(model_dir, "actor.lr=1e-4")
    third.load(str(ck4 / "actor"))
    assert third.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    assert "the checkpoint's 0.0001 stays in effect, not the config's 0.0005" in resume_warnings(changed, ck4)[0]


def test_a_changed_dataset_or_model_warns_a_longer_run_does_not(tmp_path):
    cfg = load_config("tiny-cpu")
    ckpt = _checkpoint(tmp_path, cfg)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"] |= {"data.data_source": "other/dataset", "model.path": "models/other"}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    now = load_config("tiny-cpu", ["trainer.total_training_steps=40"])
    lines = resume_warnings(now, ckpt)
    assert [line.split(":")[0] for line in lines] == [
        "resuming from global_step_2 with a changed model.path",
        "resuming from global_step_2 with a changed data.data_source",
    ]
    assert f"training goes on from the checkpoint's weights (trained from models/other); {cfg.model.path}" in lines[0]
    assert f"the config's {cfg.data.data_source} takes effect from step 3" in lines[1]


def _model_files(path, **shape):
    """An HF model dir's config.json (all check_resumable reads) for the tiny preset."""
    from engines.models import ARCH_PRESETS

    path.mkdir(parents=True)
    conf = {"model_type": "qwen2", **ARCH_PRESETS["tiny"], "vocab_size": 1024, **shape}
    (path / "config.json").write_text(json.dumps(conf))
    return path


def _left_checkpoint(root, shape):
    """A checkpoint dir another run left, its model signature's shape `shape`."""
    (root / "global_step_2").mkdir(parents=True)
    sig = {"model.path": "models/tiny-other", "model.lora_rank": 0, "world_size": 1, "shape": shape}
    (root / "global_step_2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "model": sig}))
    (root / "latest_checkpointed_iteration.txt").write_text("2")


def test_a_checkpoint_of_another_vocabulary_is_refused_an_older_one_still_resumes(tmp_path):
    model = _model_files(tmp_path / "tiny")
    cfg = load_config("tiny-cpu", [f"model.path={model}", f"trainer.default_local_dir={tmp_path / 'ck'}"])
    shape = model_signature(cfg)["shape"]
    assert shape["vocab"] == 1024 and shape["tie_word_embeddings"] is True
    _left_checkpoint(tmp_path / "ck", {**shape, "vocab": 320})
    with pytest.raises(
        ValueError, match=r"another model \(shape: checkpoint .*'vocab': 320.* vs config .*'vocab': 1024"
    ):
        check_resumable(cfg)
    for key, other in (("intermediate", 512), ("kv_heads", 2), ("tie_word_embeddings", False)):
        cfg_other = load_config("tiny-cpu", [f"model.path={model}", f"trainer.default_local_dir={tmp_path / key}"])
        _left_checkpoint(tmp_path / key, {**shape, key: other})
        with pytest.raises(ValueError, match=f"'{key}': {other}"):
            check_resumable(cfg_other)
    # A checkpoint of an earlier build recorded no vocab nor tie: the shared facts match, it resumes.
    old = {k: v for k, v in shape.items() if k not in ("vocab", "tie_word_embeddings")}
    _left_checkpoint(tmp_path / "old", old)
    check_resumable(load_config("tiny-cpu", [f"model.path={model}", f"trainer.default_local_dir={tmp_path / 'old'}"]))
    # A preset model not built yet: its vocab is unknown until prep, so it is not compared yet.
    unbuilt = load_config(
        "tiny-cpu", [f"model.path={tmp_path / 'unbuilt'}", f"trainer.default_local_dir={tmp_path / 'ck'}"]
    )
    assert "vocab" not in model_signature(unbuilt)["shape"]
    check_resumable(unbuilt)
