"""The user's path: a real Prefect server on loopback, a process work pool and worker,
`prefect deploy --all` from prefect.yaml, `prefect deployment run grpo/tiny-cpu`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    cached_inputs,
    free_port,
    mlflow_run,
    mlflow_uri,
    stop,
    wait_http,
)

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


def test_prefect_deployment_run_reaches_completed(tmp_path, gsm8k):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, *args):
        p = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=open(logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(p)
        return p

    def cli(*args, timeout=300):
        res = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout

    try:
        server = start("server", PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_http(f"{api}/health", server)
        cli("work-pool", "create", "grpo-process", "--type", "process")
        out = cli("--no-prompt", "deploy", "--all")
        assert "grpo/tiny-cpu" in out and "grpo/qwen2-14b-4xh800" in out
        start("worker", PREFECT, "worker", "start", "--pool", "grpo-process", "--limit", "1")
        overrides = cached_inputs() + [
            f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}",
            "trainer.total_training_steps=2",
            "trainer.test_freq=2",
        ]
        out = cli(
            "deployment",
            "run",
            "grpo/tiny-cpu",
            "--params",
            json.dumps({"overrides": overrides}),
            "--watch",
            "--watch-timeout",
            "1200",
            timeout=1300,
        )
        assert "Completed" in out, out[-3000:]
        artifact = cli("artifact", "inspect", "eval-tiny-cpu-step-2")
        assert "GSM8K eval at step 2" in artifact and "ground_truth" in artifact
    finally:
        for p in procs:
            stop(p)

    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.deployment"] == "tiny-cpu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "critic/score/mean")] == [1, 2]
