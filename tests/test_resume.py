"""A run stopped after step 2 and started again resumes from its checkpoint: same MLflow run, each
step logged once, finished rollouts not generated again, final weights bitwise equal to an
uninterrupted run (CPU)."""
import shutil

import pytest
from safetensors.torch import load_file

from tests.conftest import mlflow_run, run_grpo

pytestmark = pytest.mark.slow
FAST = ["trainer.test_freq=-1", "trainer.save_freq=1", "reward.function=tests.toy_reward:letter_e_share"]


def test_resume_after_step_2_matches_uninterrupted(tmp_path, gsm8k):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    run_grpo(straight, *FAST, "trainer.total_training_steps=3")
    run_grpo(resumed, *FAST, "trainer.total_training_steps=2")
    # As if the first run had been killed after generating step 3: its rollouts are on disk.
    shutil.copy(straight / "ckpt" / "rollouts" / "step_000003.parquet", resumed / "ckpt" / "rollouts")
    rollouts = {s: (resumed / "ckpt" / "rollouts" / f"step_{s:06d}.parquet").stat().st_mtime_ns for s in (1, 2, 3)}
    res = run_grpo(resumed, *FAST, "trainer.total_training_steps=3")
    assert "resumed from" in res.stdout + res.stderr and "step 3: reusing 16 persisted rollouts" in res.stdout + res.stderr

    client, run = mlflow_run(resumed)  # exactly one MLflow run
    for key in ("critic/score/mean", "actor/pg_loss", "timing_s/step"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key
    for step, mtime in rollouts.items():  # no finished rollout was generated again
        assert (resumed / "ckpt" / "rollouts" / f"step_{step:06d}.parquet").stat().st_mtime_ns == mtime

    a = load_file(straight / "ckpt" / "global_step_3" / "actor" / "model.safetensors")
    b = load_file(resumed / "ckpt" / "global_step_3" / "actor" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not a[k].equal(b[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"
    s1 = load_file(straight / "ckpt" / "global_step_1" / "actor" / "model.safetensors")
    assert any(not s1[k].equal(a[k]) for k in a), "training did not move the weights: the check would be empty"
