"""Resuming with changed overrides: a key of RESUME_MAY_CHANGE (the run's length, eval/save cadence,
logging, placement, memory switches) is one info line; any other changed key (the run's math) is
refused before any work in one line naming the key, both values and the fix. The values a
checkpoint records for the optimizer's keys are the ones in effect, checked on a real trainer."""

import json

import pytest
import torch

from configs.load import flatten, load_config, with_overrides
from engines.trainer.fsdp import FSDPTrainer
from flows.preflight import (
    RESTORED,
    RESUME_MAY_CHANGE,
    RUN_LENGTH,
    check_resumable,
    checkpoint_state,
    in_effect,
    model_signature,
    resume_changes,
)


def _checkpoint(tmp_path, cfg):
    """A checkpoint's trainer_state.json as the flow writes it (checkpoint_state)."""
    ckpt = tmp_path / "global_step_2"
    ckpt.mkdir(parents=True)
    state = {**checkpoint_state(cfg, "run-id"), "global_step": 2, "export_hf": False}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_a_changed_key_of_the_run_s_math_is_refused_in_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path, load_config("tiny-cpu", ["actor.lr=3e-5", "rollout.temperature=1.0"]))
    now = load_config(
        "tiny-cpu",
        ["actor.lr=1e-5", "rollout.temperature=0.7", "data.val_max_samples=4"],
    )
    with pytest.raises(ValueError) as e:
        resume_changes(now, ckpt)
    assert str(e.value) == (
        "trainer.default_local_dir=checkpoints/tiny-cpu: resuming from global_step_2 with a changed "
        "rollout.temperature (1.0 -> 0.7), actor.lr (3e-05 -> 1e-05) would change the run mid-way; to resume, "
        "give rollout.temperature=1.0 actor.lr=3e-05; to train with the new value, start a new run: another "
        "trainer.default_local_dir (or trainer.resume_mode=disable to start over there)"
    )
    # The same run, its eval subset and length changed: both may change, each said in an info line.
    same = load_config("tiny-cpu", ["actor.lr=3e-5", "data.val_max_samples=4", "trainer.total_training_steps=9"])
    assert resume_changes(same, ckpt) == [
        "resuming from global_step_2 with data.val_max_samples=4 (was 8): a key that may change on resume",
        "resuming from global_step_2 with trainer.total_training_steps=9 (was 3): a key that may change on resume",
    ]
    assert resume_changes(load_config("tiny-cpu", ["actor.lr=3e-5"]), ckpt) == []


@pytest.mark.parametrize(
    "override",
    [
        "model.path=models/other",
        "model.dtype=bfloat16",
        "data.source=/other/gsm8k",
        "data.train_batch_size=8",
        "data.max_prompt_length=128",
        "data.shuffle=false",
        "rollout.n=2",
        "rollout.top_p=0.9",
        "rollout.max_response_length=16",
        "actor.ppo_mini_batch_size=2",
        "actor.ppo_epochs=2",
        "actor.lr_warmup_steps=5",
        "actor.betas=[0.8,0.9]",
        "actor.clip_ratio_high=0.28",
        "actor.kl_loss_coef=0.01",
        "actor.loss_agg_mode=seq-mean-token-mean",
        "algorithm.norm_adv_by_std_in_grpo=false",
        "reward.gsm8k_scorer=lenient",
        "trainer.seed=2",
    ],
)
def test_the_run_s_math_may_not_change_on_resume(tmp_path, override):
    ckpt = _left(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"with a changed {key} \\(") as e:
        check_resumable(_in(tmp_path, override))
    assert "\n" not in str(e.value) and "another trainer.default_local_dir" in str(e.value)
    assert key not in RESUME_MAY_CHANGE and ckpt.is_dir()


@pytest.mark.parametrize(
    "override",
    [
        "trainer.total_training_steps=40",
        "trainer.total_epochs=3",
        "trainer.test_freq=1",
        "trainer.save_freq=1",
        "trainer.max_actor_ckpt_to_keep=2",
        "actor.param_offload=true",
        "actor.ppo_micro_batch_size_per_gpu=2",
        "model.enable_gradient_checkpointing=true",
        "rollout.gpu_memory_utilization=0.1",
        "rollout.val_temperature=0.5",
        "trainer.collective_timeout_s=60",
    ],
)
def test_what_may_change_on_resume_is_one_info_line(tmp_path, override):
    ckpt = _left(tmp_path)
    cfg = _in(tmp_path, override)
    check_resumable(cfg)  # no error
    key, value = override.split("=", 1)
    lines = resume_changes(cfg, ckpt)
    assert (
        len(lines) == 1 and lines[0].startswith(f"resuming from global_step_2 with {key}=") and key in RESUME_MAY_CHANGE
    )


def test_a_longer_run_is_refused_where_the_lr_warmup_is_a_share_of_its_length(tmp_path):
    """actor.lr_warmup_steps_ratio x the run's updates: a longer run would stretch the warmup mid-way."""
    warm = ["actor.lr_warmup_steps_ratio=0.5"]
    _left(tmp_path, *warm)
    with pytest.raises(
        ValueError,
        match=r"trainer.total_training_steps \(3 -> 40\) would change the run mid-way; its "
        r"LR warmup is actor.lr_warmup_steps_ratio=0.5 of the run's length; to resume, give "
        r"trainer.total_training_steps=3;",
    ):
        check_resumable(_in(tmp_path, *warm, "trainer.total_training_steps=40"))
    assert set(RUN_LENGTH) <= set(RESUME_MAY_CHANGE)


def test_a_checkpoint_without_a_recorded_config_is_not_compared(tmp_path):
    ckpt = tmp_path / "global_step_2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "model": {}}))
    assert resume_changes(load_config("tiny-cpu", ["actor.lr=1e-5"]), ckpt) == []


def test_every_key_that_may_change_is_a_config_key():
    """A misspelt key would be refused on resume though meant to be allowed."""
    keys = set(flatten(load_config("tiny-cpu")))
    assert set(RESUME_MAY_CHANGE) <= keys and set(RESTORED) <= keys
    assert not set(RESTORED) & set(RESUME_MAY_CHANGE)


def _in(tmp_path, *overrides):
    """tiny-cpu with its checkpoints in tmp_path/ckpt, and `overrides`."""
    return load_config("tiny-cpu", [f"trainer.default_local_dir={tmp_path / 'ckpt'}", *overrides])


def _left(tmp_path, *overrides):
    """tmp_path/ckpt as a run of _in(tmp_path, *overrides) left it at step 2 (what check_resumable reads)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return _checkpoint(root, _in(tmp_path, *overrides))


def _trainer(model_dir, *overrides):
    cfg = load_config(
        "tiny-cpu", with_overrides(["rollout.n=2", "actor.ppo_mini_batch_size=4", "trainer.device=cpu"], overrides)
    )
    torch.manual_seed(0)
    return FSDPTrainer(cfg, model_dir, "cpu")


@pytest.mark.parametrize(
    "key, saved, changed",
    [("actor.lr", 3e-5, 1e-5), ("actor.betas", (0.9, 0.99), (0.8, 0.9)), ("actor.weight_decay", 0.1, 0.0)],
)
def test_the_keys_said_to_stay_come_back_from_the_checkpoint(model_dir, tmp_path, key, saved, changed):
    """Why a checkpoint records RESTORED's values as in effect (checkpoint_state): AdamW's param
    group and the LR scheduler's base rate after load are the saved ones, not the config's."""
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
    """A run that an earlier build resumed with a changed actor.lr trained on with the checkpoint's
    (the optimizer state restores it): its next checkpoint records the lr in effect, so resuming
    with that lr is no change, and with the config's that never took effect is refused, naming the
    value truly in effect."""
    ck2, ck4 = tmp_path / "global_step_2", tmp_path / "global_step_4"
    first = _trainer(model_dir, "actor.lr=1e-4")
    first.save(str(ck2 / "actor"))
    _state(ck2, load_config("tiny-cpu", ["actor.lr=1e-4"]))

    changed = load_config("tiny-cpu", ["actor.lr=5e-4"])
    with pytest.raises(ValueError, match=r"with a changed actor.lr \(0.0001 -> 0.0005\) would change the run"):
        resume_changes(changed, ck2)
    second = _trainer(model_dir, "actor.lr=5e-4")  # as the earlier build resumed it
    second.load(str(ck2 / "actor"))
    assert second.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    restored = in_effect(ck2)
    second.save(str(ck4 / "actor"))
    _state(ck4, changed, restored)
    recorded = json.loads((ck4 / "trainer_state.json").read_text())["config"]
    assert recorded["actor.lr"] == "0.0001" and recorded["rollout.n"] == flatten(changed)["rollout.n"]

    back = load_config("tiny-cpu", ["actor.lr=1e-4"])
    assert resume_changes(back, ck4) == []
    third = _trainer(model_dir, "actor.lr=1e-4")
    third.load(str(ck4 / "actor"))
    assert third.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match=r"actor.lr \(0.0001 -> 0.0005\)"):
        resume_changes(changed, ck4)


def test_a_changed_dataset_or_model_is_refused_a_longer_run_is_not(tmp_path):
    cfg = load_config("tiny-cpu")
    ckpt = _checkpoint(tmp_path, cfg)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"] |= {"data.data_source": "other/dataset", "model.path": "models/other"}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    now = load_config("tiny-cpu", ["trainer.total_training_steps=40"])
    with pytest.raises(ValueError) as e:
        resume_changes(now, ckpt)
    assert (
        f"with a changed data.data_source (other/dataset -> {cfg.data.data_source}), model.path (models/other -> "
        f"{cfg.model.path}) would change the run mid-way; to resume, give data.data_source=other/dataset "
        "model.path=models/other;"
    ) in str(e.value)
    assert resume_changes(now, _checkpoint(tmp_path / "b", cfg)) == [
        "resuming from global_step_2 with trainer.total_training_steps=40 (was 3): a key that may change on resume"
    ]


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
