"""MLflow outage policy: training goes on, metrics queue (memory + file) and land once, in order."""
import mlflow
import pytest

from configs.load import load_config
from tasks.tracking import Tracker, metric_key


def _cfg(tmp_path):
    return load_config("tiny-cpu", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])


def _steps(tracker, key):
    return [(m.step, m.value) for m in sorted(tracker.client.get_metric_history(tracker.run_id, key),
                                              key=lambda m: m.step)]


def test_metrics_queue_during_an_outage_and_land_once(tmp_path, monkeypatch):
    root = tmp_path / "run"
    tracker = Tracker(_cfg(tmp_path), root, {"recipe": "tiny-cpu"})
    tracker.log({"critic/score/mean": 0.1}, 1)
    real = mlflow.log_metrics

    def down(*a, **k):
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(mlflow, "log_metrics", down)
    tracker.log({"critic/score/mean": 0.2}, 2)
    tracker.log({"critic/score/mean": 0.3, "val-core/openai/gsm8k/reward/mean@1": 0.5}, 3)
    assert (root / "mlflow_pending.jsonl").read_text().count("\n") == 2
    monkeypatch.setattr(mlflow, "log_metrics", real)
    tracker.log({"critic/score/mean": 0.4}, 4)
    assert _steps(tracker, "critic/score/mean") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert _steps(tracker, metric_key("val-core/openai/gsm8k/reward/mean@1")) == [(3, 0.5)]
    assert not (root / "mlflow_pending.jsonl").exists()
    tracker.finish()


def test_queued_metrics_survive_the_process_and_are_sent_on_resume(tmp_path, monkeypatch):
    root = tmp_path / "run"
    tracker = Tracker(_cfg(tmp_path), root, {})
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    tracker.log({"actor/pg_loss": -0.5}, 1)
    tracker.finish("FAILED")  # the store is still down as the process ends: the file keeps the queue
    assert (root / "mlflow_pending.jsonl").exists()
    monkeypatch.undo()
    again = Tracker(_cfg(tmp_path), root, {})
    assert again.resumed and again.run_id == tracker.run_id
    assert _steps(again, "actor/pg_loss") == [(1, -0.5)]
    assert not (root / "mlflow_pending.jsonl").exists()
    again.finish()


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()
