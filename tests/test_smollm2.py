"""The real SmolLM2-135M-Instruct (from PyPI, GGUF dequantized) trains 2 GRPO steps on CPU and
is evaluated on a GSM8K test subset before the first step and after the last, under the strict and
the flexible extraction (issue 14)."""

import subprocess
import sys

import pytest

from tests.conftest import GSM8K, ROOT, flow_env, mlflow_run, mlflow_uri

pytestmark = pytest.mark.slow


def test_smollm2_two_steps_and_eval(tmp_path, gsm8k):
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "smollm2-135m-cpu",
        f"data.source={GSM8K}",
        f"data.dir={ROOT / 'data' / 'gsm8k-smollm2'}",
        f"model.path={ROOT / 'models' / 'smollm2-135m-instruct'}",
        f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        "trainer.val_before_train=true",
        "data.val_max_samples=8",
    ]  # 8 prompts: the eval stays short
    res = subprocess.run(args, cwd=tmp_path, env=flow_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    client, run = mlflow_run(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "critic/score/mean")] == [1, 2]
    hist = {
        k: client.get_metric_history(run.info.run_id, f"val-{k}/mean_at_1")
        for k in ("core/openai/gsm8k/reward", "core/openai/gsm8k/reward_flexible", "aux/openai/gsm8k/format")
    }
    for key, h in hist.items():
        assert [m.step for m in h] == [0, 2], key
        assert all(m.value in {i / 8 for i in range(9)} for m in h), (key, h)  # a mean over 8 prompts
    print(
        "SmolLM2-135M-Instruct on 8 GSM8K test prompts, steps 0 and 2:",
        {k: [m.value for m in h] for k, h in hist.items()},
    )
