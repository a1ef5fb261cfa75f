"""The real `grpo run` flow, instrumented: step breakdown (timing_s/*) and Prefect + MLflow overhead.

    python benchmarks/flow_breakdown.py --out benchmarks/results/flow-0.5b-lora.json -- \
        qwen2-0.5b-lora-1xh100 model.source=random model.arch=0.5b model.path=models/random-qwen2-0.5b ...

Runs flows.cli in this process (the Ray workers, trainer and vLLM, are separate processes as
always) with four measurements added from outside, changing nothing in the flow:
  * each Prefect task call (rollout, reward, update, checkpoint, evaluate) is timed twice: around
    the task call (what the flow sees) and inside the task function; the difference is Prefect's
    orchestration (task-run creation, state changes, result handling) for that call;
  * Tracker.log (MLflow log_metrics of the step's ~40 metrics) is timed: it runs after the
    flow has taken timing_s/step;
  * the metrics dict of each step is recorded as the flow hands it to MLflow (timing_s/*, perf/*);
  * peak GPU memory in use (nvidia-smi, all processes) during the run.
Per step: overhead = sum(task call - task body) + Tracker.log, reported in ms and as a share of
timing_s/step. The JSON is rewritten after every step, so a run cut short keeps its steps.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import _common as C

TASKS = ("rollout", "score", "update", "save_checkpoint", "evaluate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if C.SRC != C.ROOT:
        # Ray workers put the driver's working directory first on their sys.path: run from the
        # snapshot so that they import the same code as this process (paths: give them absolute).
        import os

        a.out = os.path.abspath(a.out)
        os.chdir(C.SRC)

    from configs.load import load_config

    cfg = load_config(a.recipe, a.overrides)
    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    rec = {
        "recipe": a.recipe,
        "overrides": a.overrides,
        "env": C.gpu_info(),
        "config": {
            "arch": cfg.model.arch,
            "source": cfg.model.source,
            "lora_rank": cfg.model.lora_rank,
            "dtype": cfg.model.dtype,
            "gradient_checkpointing": cfg.model.enable_gradient_checkpointing,
            "train_batch_size": cfg.data.train_batch_size,
            "n": cfg.rollout.n,
            "max_prompt_length": cfg.data.max_prompt_length,
            "max_response_length": cfg.rollout.max_response_length,
            "ppo_mini_batch_size": cfg.actor.ppo_mini_batch_size,
            "ppo_micro_batch_size_per_gpu": cfg.actor.ppo_micro_batch_size_per_gpu,
            "use_kl_loss": cfg.actor.use_kl_loss,
            "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
            "max_num_seqs": cfg.rollout.max_num_seqs,
            "max_model_len": cfg.rollout.max_model_len,
            "enforce_eager": cfg.rollout.enforce_eager,
            "world_size": cfg.world_size,
        },
        "gpu_total_gib": total_gib,
        "vllm_reservation_gib": cfg.rollout.gpu_memory_utilization * total_gib if total_gib else None,
        "steps": [],
        "task_calls": [],
        "tracker_logs": [],
        "one_time": {},
    }
    state = {"step": 0, "t_start": time.perf_counter(), "metrics": {}}

    import runtime.tracking as trk
    import tasks.stages as st

    def save():
        C.write_json(a.out, rec)

    for name in TASKS:
        task = getattr(st, name)
        body = task.fn

        def make_body(body=body, name=name):
            @functools.wraps(body)
            def timed_body(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return body(*args, **kwargs)
                finally:
                    state.setdefault(f"body_{name}", 0.0)
                    state[f"body_{name}"] += time.perf_counter() - t

            return timed_body

        object.__setattr__(task, "fn", make_body())

        def make_call(task=task, name=name):
            def call(*args, **kwargs):
                if name == "rollout":
                    state["step"] += 1
                state[f"body_{name}"] = 0.0
                t = time.perf_counter()
                try:
                    return task(*args, **kwargs)
                finally:
                    outer = time.perf_counter() - t
                    rec["task_calls"].append(
                        {
                            "step": state["step"],
                            "task": name,
                            "call_s": outer,
                            "body_s": state[f"body_{name}"],
                            "prefect_overhead_s": outer - state[f"body_{name}"],
                        }
                    )

            # The flow names some task runs per step (stages.score.with_options(...)): the same timing.
            call.with_options = lambda **options: make_call(task.with_options(**options), name)
            return call

        setattr(st, name, make_call())

    orig_log, orig_init, orig_finish = trk.Tracker.log, trk.Tracker.__init__, trk.Tracker.finish

    def log(self, metrics, step):
        t = time.perf_counter()
        try:
            return orig_log(self, metrics, step)
        finally:
            dt = time.perf_counter() - t
            rec["tracker_logs"].append({"step": step, "n_metrics": len(metrics), "log_s": dt})
            if "timing_s/step" in metrics:
                state["metrics"][step] = dict(metrics)
                print(
                    f"[breakdown] step {step}: step {metrics['timing_s/step']:.2f} s, mlflow log {1000 * dt:.1f} ms",
                    flush=True,
                )
            elif step in state["metrics"]:
                state["metrics"][step].update(metrics)  # e.g. a later timing_s/save_checkpoint
            summarize()
            save()

    def summarize():
        """Per step: the metrics the flow logged, Prefect's share of each task call, MLflow's log time."""
        rows = []
        for step, metrics in sorted(state["metrics"].items()):
            calls = [c for c in rec["task_calls"] if c["step"] == step]
            logs = [x["log_s"] for x in rec["tracker_logs"] if x["step"] == step]
            prefect, mlf = sum(c["prefect_overhead_s"] for c in calls), sum(logs)
            step_s = metrics["timing_s/step"]
            rows.append(
                {
                    "step": step,
                    "metrics": metrics,
                    "tracker_log_s": mlf,
                    "prefect_task_overhead_s": prefect,
                    "tasks": {c["task"]: {k: c[k] for k in ("call_s", "body_s", "prefect_overhead_s")} for c in calls},
                    "overhead_ms": 1000 * (prefect + mlf),
                    "overhead_share_of_step": (prefect + mlf) / step_s,
                }
            )
        rec["steps"] = rows

    def init(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return orig_init(self, *args, **kwargs)
        finally:
            rec["one_time"]["tracker_init_s"] = time.perf_counter() - t
            rec["one_time"]["flow_start_to_tracker_init_end_s"] = time.perf_counter() - state["t_start"]

    def finish(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return orig_finish(self, *args, **kwargs)
        finally:
            rec["one_time"]["tracker_finish_s"] = time.perf_counter() - t

    trk.Tracker.log, trk.Tracker.__init__, trk.Tracker.finish = log, init, finish

    from flows import cli

    save()
    rc = 0
    with C.SmiSampler() as smi:
        try:
            cli.main(["run", a.recipe, *a.overrides])
        except SystemExit as e:
            rc = e.code or 0
        except BaseException as e:  # noqa: BLE001
            rec["error"] = repr(e)[:2000]
            rc = 1
    rec["flow_wall_s"] = time.perf_counter() - state["t_start"]
    rec["returncode"] = rc
    rec.update(smi.summary())
    summarize()
    steps = rec["steps"]
    if steps:
        rec["max_memory_allocated_gib"] = max(s["metrics"].get("perf/max_memory_allocated_gb", 0) for s in steps)
        last = steps[-1]
        rec["last_step_overhead_ms"] = last["overhead_ms"]
        rec["last_step_overhead_share"] = last["overhead_share_of_step"]
    save()
    print(f"[breakdown] wrote {a.out} (rc={rc})", flush=True)
    sys.exit(rc if isinstance(rc, int) else 1)


if __name__ == "__main__":
    main()
