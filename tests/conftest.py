"""Shared pieces for the end-to-end tests: real GSM8K, cached tiny model and data, tmp outputs."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from configs.load import with_overrides
from engines.compile_cache import keyed_inductor_cache

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
DEVICE = os.environ.get("GRPO_TEST_DEVICE", "cpu")  # cuda: run the device-aware tests on a GPU

# |vLLM - trainer| per-token log-prob (nats) on CPU, both float32, for the tiny model (hidden 128,
# MLP 384, 2 layers, attention over <= ~300 positions, log-softmax over a ~1k vocabulary): a logit
# ends a chain of ~4.5k multiply-adds that the two implementations order differently (paged vs
# SDPA attention, fused ops). Rounding errors of n terms grow like sqrt(n) * u (Higham, Accuracy
# and Stability of Numerical Algorithms, 2nd ed., s. 3.5): sqrt(4.5e3) * 2^-24 * |logit| (<= 10)
# = 4e-5, so 1e-4 (measured ~1.5e-6). The worst-case n * u bound (2.7e-3) is never approached.
# The mistake it guards against, a weight sync missed or applied to the wrong tensor, moves
# log-probs by > 5e-4 (tests/test_parity.py asserts that before each sync).
VLLM_LOGP_ATOL_CPU = 1e-4

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
keyed_inductor_cache()  # flow subprocesses and in-process vLLM inherit it (engines/compile_cache.py)


def cached_inputs() -> list[str]:
    """Overrides that reuse the built tiny model and prepared parquet across tests (both content-cached)."""
    return [
        f"data.source={GSM8K}",
        f"data.dir={ROOT / 'data' / 'gsm8k-tiny'}",
        f"model.path={ROOT / 'models' / 'tiny-qwen2'}",
    ]


# Started once per test session and shared, rather than once per `grpo run`: a new SQLite MLflow
# store runs MLflow's schema migrations (seconds), and a flow run without PREFECT_API_URL starts
# Prefect's temporary server (seconds). Each test still gets its own store (a copy) and flow runs.
_SESSION: dict = {}


def mlflow_uri(directory: Path) -> str:
    """The sqlite:/// URI of a fresh MLflow store `directory`/mlflow.db (a copy of one migrated once)."""
    db = directory / "mlflow.db"
    if not db.exists():
        if "mlflow" not in _SESSION:
            template = Path(tempfile.mkdtemp(prefix="grpo-test-mlflow-")) / "mlflow.db"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                    f"sqlite:///{template}",
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
            _SESSION["mlflow"] = template
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_SESSION["mlflow"], db)
    return f"sqlite:///{db}"


def flow_env() -> dict[str, str]:
    """Environment for a flow subprocess: this process's environment as it is now (a test may have
    set RAY_ADDRESS, say), the repository on PYTHONPATH, and the session's Prefect server."""
    if "prefect" not in _SESSION:
        home = Path(tempfile.mkdtemp(prefix="grpo-test-prefect-"))
        server = prefect_server(home, home / "server.log")
        _SESSION["prefect"] = (server, {k: v for k, v in server.__enter__().items() if k.startswith("PREFECT_")})
    return {**os.environ, "PYTHONPATH": str(ROOT), **_SESSION["prefect"][1]}


def pytest_sessionfinish(session, exitstatus):
    if "prefect" in _SESSION:
        _SESSION.pop("prefect")[0].__exit__(None, None, None)


def run_grpo(tmp_path: Path, *overrides: str, config: str = "tiny-cpu", timeout: int = 1200):
    """`grpo run` in a subprocess with its own MLflow store and checkpoint dir under tmp_path."""
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        config,
        *with_overrides(
            [
                *cached_inputs(),
                f"tracking.tracking_uri={mlflow_uri(tmp_path)}",
                f"trainer.default_local_dir={tmp_path / 'ckpt'}",
            ],
            overrides,
        ),
    ]
    env = flow_env()
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


# Text for the tiny model's tokenizer in the unit tests that need a real (random-init) model.
CORPUS = [f"Tom has {i} apples and buys {i + 3} more. #### {2 * i + 3}" for i in range(300)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random-init Qwen2 (engines/models.py materialize, source=random) built once per session."""
    from engines.models import materialize

    return materialize("random", str(tmp_path_factory.mktemp("m") / "tiny"), corpus=CORPUS)


@pytest.fixture
def gsm8k():
    if not GSM8K.exists():
        pytest.skip(f"real GSM8K not found at {GSM8K}")
    return GSM8K


def free_port() -> int:
    """A TCP port free on loopback now (for a server or a process group's rendezvous)."""
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
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"{api}/health", proc)
        yield env
    finally:
        stop(proc)
