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
    args = [sys.executable, "-m", "flows.cli", "run", "tiny-cpu", *cached_inputs(), "trainer.save_freq=1",
            "trainer.test_freq=-1", f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}"]
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(args, cwd=tmp_path, env=flow_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    # Kill once step 1's checkpoint is whole (a step's last act), so the retry has one to restore.
    while "step 1/3" not in (tmp_path / "run.log").read_text() or \
            not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists():
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
