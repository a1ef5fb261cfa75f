"""The real SmolLM2-135M-Instruct (from PyPI, GGUF dequantized) trains 2 GRPO steps on CPU and
is evaluated on a GSM8K test subset."""
import subprocess
import sys

import pytest

from tests.conftest import GSM8K, ROOT, flow_env, mlflow_run, mlflow_uri

pytestmark = pytest.mark.slow


def test_smollm2_two_steps_and_eval(tmp_path, gsm8k):
    args = [sys.executable, "-m", "flows.cli", "run", "smollm2-135m-cpu", f"data.source={GSM8K}",
            f"data.dir={ROOT / 'data' / 'gsm8k-smollm2'}", f"model.path={ROOT / 'models' / 'smollm2-135m-instruct'}",
            f"tracking.tracking_uri={mlflow_uri(tmp_path)}", f"trainer.default_local_dir={tmp_path / 'ckpt'}"]
    res = subprocess.run(args, cwd=tmp_path, env=flow_env(),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    client, run = mlflow_run(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "critic/score/mean")] == [1, 2]
    acc = client.get_metric_history(run.info.run_id, "val-core/openai/gsm8k/reward/mean_at_1")
    assert [m.step for m in acc] == [2]
    print(f"SmolLM2-135M-Instruct GSM8K mean@1 on 20 test prompts after 2 steps: {acc[0].value:.3f}")
