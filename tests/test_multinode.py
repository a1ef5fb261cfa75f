"""Two Ray nodes (two raylets on this machine, one CPU each) and `trainer.nnodes=2`: the flow
reaches the cluster through RAY_ADDRESS, places one rank on each node, and completes its steps."""

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, mlflow_run, run_grpo, stop

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def _nodes(env) -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def test_two_ray_nodes_one_rank_each(tmp_path, gsm8k, monkeypatch):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [head]
    try:
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while _nodes(env) < 1:
            assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        procs.append(
            subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{port}", *common],
                env=env,
                stdout=open(tmp_path / "node2.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        while _nodes(env) < 2:
            assert time.time() < deadline, (tmp_path / "node2.log").read_text()[-3000:]
            time.sleep(2)
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            monkeypatch.setenv(k, env[k])
        res = run_grpo(
            tmp_path,
            "trainer.nnodes=2",
            "trainer.n_gpus_per_node=1",
            "trainer.total_training_steps=1",
            "trainer.test_freq=-1",
        )
    finally:
        for p in reversed(procs):
            stop(p)
    text = res.stdout + res.stderr
    placed = dict(re.findall(r"rank (\d) on node ([0-9a-f]{8})", text))
    assert sorted(placed) == ["0", "1"] and len(set(placed.values())) == 2, f"ranks not on two nodes: {placed}"
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "actor/pg_loss")] == [1]
