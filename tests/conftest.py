"""Shared pieces for the end-to-end tests: real GSM8K, cached tiny model and data, tmp outputs."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
DEVICE = os.environ.get("GRPO_TEST_DEVICE", "cpu")  # cuda: run the device-aware tests on a GPU

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cached_inputs() -> list[str]:
    """Overrides that reuse the built tiny model and prepared parquet across tests (both content-cached)."""
    return [f"data.source={GSM8K}", f"data.dir={ROOT / 'data' / 'gsm8k-tiny'}",
            f"model.path={ROOT / 'models' / 'tiny-qwen2'}"]


def run_grpo(tmp_path: Path, *overrides: str, config: str = "tiny-cpu", timeout: int = 1200):
    """`grpo run` in a subprocess with its own MLflow store and checkpoint dir under tmp_path."""
    args = [sys.executable, "-m", "flows.cli", "run", config, *cached_inputs(),
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "run.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return res


def mlflow_run(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grpo-gsm8k")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return client, runs[0]


@pytest.fixture
def gsm8k():
    if not GSM8K.exists():
        pytest.skip(f"real GSM8K not found at {GSM8K}")
    return GSM8K


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, timeout: float = 120) -> None:
    import urllib.request

    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"server for {url} exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def stop(proc) -> None:
    """SIGTERM the process group (the server and what it started), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@contextlib.contextmanager
def prefect_server(home: Path, log: Path):
    """A real Prefect API server on loopback; yields the env that points clients at it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"{api}/health", proc)
        yield env
    finally:
        stop(proc)
