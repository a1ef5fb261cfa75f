"""Faults mid-run: a Ray worker SIGKILLed during training; the flow's retry rebuilds the worker
group from the last checkpoint and the run completes with each step logged once."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import cached_inputs, flow_env, mlflow_run, mlflow_uri

pytestmark = pytest.mark.slow


def test_killed_worker_is_rebuilt_from_the_last_checkpoint(tmp_path, gsm8k):
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "tiny-cpu",
        *cached_inputs(),
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
    ]
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(args, cwd=tmp_path, env=flow_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    # Kill once step 1's checkpoint is whole (a step's last act), so the retry has one to restore.
    while (
        "step 1/3" not in (tmp_path / "run.log").read_text()
        or not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    ):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.5)
    pids = subprocess.run(["pgrep", "-f", "ray::GRPOWorker"], capture_output=True, text=True).stdout.split()
    assert pids, "no worker process found"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    assert proc.wait(timeout=1200) == 0, (tmp_path / "run.log").read_text()[-5000:]
    text = (tmp_path / "run.log").read_text()
    assert "ActorDiedError" in text or "actor died" in text.lower()
    assert "resumed from" in text and "global_step_" in text

    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    for key in ("critic/score/mean", "timing_s/step"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key


def test_one_rank_killed_mid_update_recovers_from_the_checkpoint(tmp_path, gsm8k):
    """Two gloo ranks: rank 1's Ray actor is SIGKILLed inside step 2's update (GRPO_HANG_AT holds
    rank 1 for a few seconds at the start of every update, so the kill lands there, rank 0 waiting in
    the update's first collective). The flow's retry rebuilds the worker group from step 1's
    checkpoint, reuses step 2's persisted rollouts and completes; each step is in MLflow once."""
    import re

    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "tiny-cpu",
        *cached_inputs(),
        "trainer.n_gpus_per_node=2",
        "trainer.total_training_steps=2",
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
    ]
    log_path = tmp_path / "run.log"
    env = {**flow_env(), "GRPO_HANG_AT": "update_actor:1:4"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline, killed = time.time() + 1200, None
    hang = re.compile(r"hangpoint: rank 1 \(pid (\d+)\) sleeps")
    while killed is None:
        text = log_path.read_text()
        assert proc.poll() is None and time.time() < deadline, text[-4000:]
        done1 = (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
        pids = hang.findall(text)
        if done1 and len(pids) >= 2:  # step 1's checkpoint is whole and rank 1 entered step 2's update
            killed = int(pids[1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert proc.wait(timeout=1200) == 0, log_path.read_text()[-6000:]
    text = log_path.read_text()
    assert re.search(r"update_actor: rank [01] failed", text), text[-4000:]
    assert "resumed from" in text and "global_step_1" in text
    assert "step 2: reusing" in text, "step 2's persisted rollouts were generated again"

    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    for key in ("critic/score/mean", "timing_s/step", "actor/pg_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2], key


def test_too_little_host_ram_is_one_error_line_and_not_retried(tmp_path, gsm8k):
    """The worker group refuses a node with less RAM than planned (trainer.node_ram_gb=1 stands in
    for a small node); the flow's retry re-raises it at once instead of rebuilding the workers."""
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "tiny-cpu",
        *cached_inputs(),
        "trainer.node_ram_gb=1",
        f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
    ]
    res = subprocess.run(args, cwd=tmp_path, env=flow_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 2, (res.stdout + res.stderr)[-4000:]
    out = res.stdout + res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]  # Prefect's own lines may follow
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: host memory: node ") and "has 1.0 GiB (trainer.node_ram_gb" in errors[0]
    assert out.count("flow run not retried (a retry cannot mend it): host memory") == 1, out[-4000:]
    assert "worker group: rank" not in out  # no worker started
