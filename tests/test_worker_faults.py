"""Faults of a rank, seen from the controller, with real Ray actors and a real gloo process group:
a rank hung before a collective (GRPO_HANG_AT) makes the stage fail within
trainer.collective_timeout_s naming the stage and the ranks; a worker killed by Ray's memory
monitor becomes one WorkerOOMError line, not retried. The actors here run the project's
init_distributed, hang_point and gather; they are not GRPOWorkers (no model, no vLLM), which keeps
the test to seconds."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from engines.worker_group import OOM_GRACE_S, CollectiveTimeout, WorkerOOMError, gather
from tests.conftest import ROOT, free_port

TIMEOUT_S = 3.0  # trainer.collective_timeout_s for the test: short, yet far above gloo's set-up time
HANG_S = 60.0  # the hung rank sleeps far longer than the test may take


class Rank:
    def __init__(self, rank: int, master: tuple[str, int]):
        from engines.trainer import init_distributed

        self.rank = rank
        init_distributed(rank, 2, master, "cpu", timeout_s=TIMEOUT_S)

    def ready(self) -> int:
        return self.rank

    def update_actor(self) -> int:
        import torch
        import torch.distributed as dist

        from runtime.killpoints import hang_point

        hang_point("update_actor", self.rank)
        t = torch.ones(1)
        dist.all_reduce(t)
        return int(t.item())

    def save_checkpoint(self, work_s: float) -> int:
        time.sleep(work_s)
        return self.rank


@pytest.fixture(scope="module")
def ranks():
    """Two ranks in one gloo process group; rank 1 hangs in update_actor (GRPO_HANG_AT)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 ranks + a group
    master = ("127.0.0.1", free_port())
    env = {"env_vars": {"GRPO_HANG_AT": f"update_actor:1:{HANG_S}", "PYTHONPATH": str(ROOT)}}
    actors = [ray.remote(Rank).options(num_cpus=1, runtime_env=env).remote(r, master) for r in range(2)]
    assert ray.get([a.ready.remote() for a in actors], timeout=120) == [0, 1]  # started, group made
    yield actors
    ray.shutdown()


def test_a_rank_working_alone_after_the_others_answered_is_not_cut_short(ranks):
    # rank 0 returns at once; rank 1 works 2 collective timeouts longer (as rank 0 writes the HF
    # export alone): no deadline applies once a rank has answered. Runs before the hang test, which
    # keeps rank 1 asleep.
    t0 = time.monotonic()
    assert gather(
        [a.save_checkpoint.remote(2 * TIMEOUT_S if r == 1 else 0) for r, a in enumerate(ranks)], "save_checkpoint"
    ) == [0, 1]
    assert time.monotonic() - t0 >= 2 * TIMEOUT_S


def test_a_hung_rank_fails_the_stage_within_the_collective_timeout(ranks):
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout) as e:
        gather([a.update_actor.remote() for a in ranks], "update_actor")
    took = time.monotonic() - t0
    msg = str(e.value)
    print(f"failed after {took:.1f} s: {msg}")
    # rank 0 waits in all_reduce for rank 1, which sleeps: gloo gives up after TIMEOUT_S
    assert msg.startswith("update_actor: rank 0 failed in a collective") and "rank [1] had not answered" in msg
    assert "\n" not in msg
    # + OOM_GRACE_S: after the first failure the controller looks that long for a peer's OOM kill
    assert TIMEOUT_S <= took < TIMEOUT_S + OOM_GRACE_S + 5, f"{took:.1f} s for a {TIMEOUT_S} s collective timeout"


def test_a_node_with_less_ram_than_planned_is_refused_in_one_line(ranks, tmp_path):
    """The worker group weighs each Ray node's RAM against the host plan before any worker starts;
    trainer.node_ram_gb stands in for what the node reports."""
    import psutil
    import ray

    from configs.load import load_config
    from engines.worker_group import WorkerGroup, host_plan, node_memory_gib

    cfg = load_config("tiny-cpu", ["trainer.node_ram_gb=1", "model.path=/nonexistent/tiny"])
    plan = host_plan(cfg, str(tmp_path), 1)  # no config.json there: the tiny preset's shape
    assert plan["host_node_gib"] > 0.95 * 1  # tiny-cpu: > 3 GiB (process, Ray, KV cache share)
    with pytest.raises(ValueError) as e:
        WorkerGroup(cfg, str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("host memory: node ") and f"needs {plan['host_node_gib']:.1f} GiB" in msg
    assert "has 1.0 GiB (trainer.node_ram_gb" in msg and "fewer ranks per node" in msg
    # Without the override the node's own total is used: psutil, read on the node.
    assert ray.get(ray.remote(node_memory_gib).remote()) == pytest.approx(psutil.virtual_memory().total / 2**30)


OOM_SCRIPT = textwrap.dedent("""
    import os, time
    # Ray's memory monitor, set before Ray starts: kill workers once the node uses more than 2% of
    # its memory, checked every 100 ms. Any machine is past that, so the first running worker dies.
    os.environ["RAY_memory_usage_threshold"] = "0.02"
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    import ray
    from engines.worker_group import gather
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_restarts=0)
    class Hog:
        def update_actor(self):
            x = bytearray(200 << 20)  # 200 MB, touched
            time.sleep(30)
            return len(x)

    try:
        gather([Hog.remote().update_actor.remote()], "update_actor", plan_gib=42.0)
    except Exception as e:
        print("RAISED", type(e).__name__, "|", str(e))
""")


@pytest.mark.slow  # its own Ray instance: ~20 s
def test_a_worker_killed_by_rays_memory_monitor_is_one_line_and_not_transient(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("RAISED")), None)
    assert line, res.stdout[-2000:] + res.stderr[-3000:]
    kind, msg = line.removeprefix("RAISED ").split(" | ", 1)
    print(msg)
    assert kind == WorkerOOMError.__name__
    assert msg.startswith("update_actor: rank 0 was killed by Ray's memory monitor (node memory ")
    assert " GB used; the plan needs 42.0 GiB per node" in msg and "not retried" in msg
    assert "Top 10 memory users" not in msg  # Ray's dump stays out

    # and the tasks' retry condition does not retry it (nor a hung stage), but does a dead actor
    from prefect.states import Failed

    from tasks.stages import transient

    assert not transient(None, None, Failed(data=WorkerOOMError(msg)))
    assert not transient(None, None, Failed(data=CollectiveTimeout("update_actor: ...")))
    assert transient(None, None, Failed(data=RuntimeError("update_actor: rank 1 failed: ActorDiedError")))
