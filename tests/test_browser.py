"""The MLflow UI in a real browser: two demo runs (two learning rates) in one store, `mlflow ui`
on it, headless Chromium (Debian's `chromium` package) renders the runs page's chart view and the
compare page, and the charts are in the rendered DOM. Skipped where Chromium is not installed
(`apt-get install chromium`, or GRPO_CHROMIUM=/path/to/chromium)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, run_grpo, stop, wait_http

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("GRPO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
PLOT = "js-plotly-plot"  # the container of every chart MLflow's UI draws (plotly.js)


def rendered_dom(url: str) -> str:
    """The DOM of `url` after its scripts ran: Chromium headless, --dump-dom. The virtual time
    budget lets the page's fetches and renders finish (60 s of page time, about 5 s of real time
    on 2 cores); the window is tall so that lazily drawn charts are in view."""
    res = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,3000",
            "--virtual-time-budget=60000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found: apt-get install chromium "
    "(Debian's package), or set GRPO_CHROMIUM=/path/to/chromium",
)
def test_mlflow_runs_and_compare_pages_draw_the_demo_runs_charts(tmp_path, gsm8k):
    names = {"lr-2e-3": "2.0e-3", "lr-5e-4": "5.0e-4"}
    for name, lr in names.items():  # the demo, shortened: charts need a few points, not 20
        run_grpo(
            tmp_path,
            f"actor.lr={lr}",
            f"tracking.run_name={name}",
            "trainer.total_training_steps=4",
            "trainer.test_freq=2",
            f"trainer.default_local_dir={tmp_path / name}",
            config="tiny-cpu-demo",
        )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grpo-gsm8k")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(names)
    port = free_port()
    ui = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=open(tmp_path / "mlflow-ui.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", ui)
        # The runs page as the README gives it, in chart view: a chart per metric, both runs in each.
        page = rendered_dom(
            f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
        )
        assert page.count(PLOT) >= 5 and "critic/score/mean" in page, "no metric charts on the runs page"
        assert all(name in page for name in names)
        # The compare page of the two runs: its parallel-coordinates chart and both runs.
        ids = ", ".join(f'"{i}"' for i in runs.values())
        page = rendered_dom(f'{base}/#/compare-runs?runs=[{ids}]&experiments=["{exp.experiment_id}"]')
        assert PLOT in page and "Comparing 2 Runs" in page and all(i in page for i in runs.values())
    finally:
        stop(ui)
