"""MLflow: the outage policy (training goes on, metrics queue in memory + file and land once, in
order) and what users expect of a run (tags, system metrics, inputs, where to find it)."""

import time

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_USER

from configs.load import load_config
from runtime.tracking import Tracker, clip_text, metric_key


def _cfg(tmp_path):
    return load_config("tiny-cpu", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])


def _steps(tracker, key):
    return [
        (m.step, m.value) for m in sorted(tracker.client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
    ]


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


def test_run_has_source_git_user_tags_system_metrics_inputs_and_says_where_it_is(tmp_path, monkeypatch):
    import subprocess

    import pandas as pd

    from runtime.tracking import CODE_DIR

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's own knob (default 10 s)
    tracker = Tracker(_cfg(tmp_path), tmp_path / "run", {"recipe": "tiny-cpu"})
    train = pd.DataFrame({"prompt": ["What is 2+3?", "And 4+4?"], "answer": ["5", "8"]})
    for _ in range(2):  # a resumed run logs its dataset once
        tracker.log_dataset(train, str(tmp_path / "train.parquet"), "gsm8k-train", "training")
    lines = tracker.where()
    db = tmp_path / "mlflow.db"
    assert tracker.run_id in lines[0] and f"sqlite:///{db}" in lines[0]
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in lines[1]
    assert f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}" in lines[1]
    assert lines[2].endswith(f"/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
    deadline = time.time() + 30  # the monitor's first sample after 0.5 s; generous for a loaded machine
    while not any(k.startswith("system/") for k in tracker.client.get_run(tracker.run_id).data.metrics):
        assert time.time() < deadline, "no system metrics"
        time.sleep(0.5)
    for _ in range(2):  # a step replayed after a resume: its table is not appended to
        tracker.log_table({"step": [1, 1], "score": [0.5, 0.0]}, "samples/step_000001.json")
    tracker.finish()

    table = tracker.client.load_table(tracker.experiment_id, "samples/step_000001.json", run_ids=[tracker.run_id])
    assert table["score"].tolist() == [0.5, 0.0]
    run = tracker.client.get_run(tracker.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags[MLFLOW_USER] and tags[MLFLOW_SOURCE_NAME] and tags["grpo.run_dir"] == str(tmp_path / "run")
    head = subprocess.run(["git", "-C", str(CODE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (not an exported tree): the commit the code runs at
        assert tags[MLFLOW_GIT_COMMIT] == head.stdout.strip()
    (inp,) = run.inputs.dataset_inputs
    assert (
        inp.dataset.name == "gsm8k-train"
        and len(inp.dataset.digest) == 8
        and [t.value for t in inp.tags] == ["training"]
        and str(tmp_path / "train.parquet") in inp.dataset.source
    )
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs


def test_clip_text():
    assert clip_text("a\n b  c", 10) == "a b c"
    assert clip_text("x" * 300, 80) == "x" * 79 + "\u2026" and len(clip_text("word " * 100, 120)) == 120


def test_flow_run_id_is_tagged_only_for_a_lasting_prefect_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.grpo import _tags

    cfg = _cfg(tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # `grpo run` without PREFECT_API_URL
        tags = _tags(cfg)
    assert "prefect.flow_run_id" not in tags and tags["prefect.server"].startswith("ephemeral")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        tags = _tags(cfg)
    assert {"prefect.flow_run_id", "prefect.flow_run_url"} <= set(tags)
    assert tags["prefect.server"] == "http://127.0.0.1:4200/api"


def test_sample_table_shows_whole_groups_with_clipped_text():
    import pandas as pd

    from flows.grpo import SAMPLE_ROWS, SAMPLE_WIDTH, sample_table

    batch = pd.DataFrame(
        {
            "prompt": [
                [{"role": "user", "content": "Q" * 500}],
                [{"role": "user", "content": "short"}],
                [{"role": "user", "content": "third"}],
            ]
        },
        index=[17, 4, 9],
    )
    n = 4  # rollout.n: 3 prompts x 4 samples, in prompt order
    samples = pd.DataFrame(
        {
            "row": [r for r in (17, 4, 9) for _ in range(n)],
            "response_text": ["r\n" * 300] * 12,
            "ground_truth": ["5"] * 12,
            "score": [1.0, 0.0, 0.0, 0.0] * 3,
            "advantage": [1.5, -0.5, -0.5, -0.5] * 3,
            "finish_reason": ["stop"] * 12,
        }
    )
    table = sample_table(samples, batch, step=3)
    assert len(table["prompt"]) == SAMPLE_ROWS == 8  # the first two groups, whole
    assert table["prompt"][4:] == ["short"] * 4 and len(table["prompt"][0]) == SAMPLE_WIDTH
    assert all(len(r) == SAMPLE_WIDTH and "\n" not in r for r in table["response"])
    assert table["advantage"][:4] == [1.5, -0.5, -0.5, -0.5] and table["step"] == [3] * 8
    three = samples.iloc[:9].assign(row=[17] * 3 + [4] * 3 + [9] * 3)  # rollout.n = 3: two whole groups
    assert len(sample_table(three, batch, step=1)["score"]) == 6
    one = samples.assign(row=[17] * 12)  # a group larger than SAMPLE_ROWS is shown whole
    assert len(sample_table(one, batch, step=1)["score"]) == 12


def test_step_lines_show_val_step_0_included():
    """A fresh clone's review: the eval before training (step 0) printed no line, so its `val=` was
    only in MLflow; it prints `step 0/N (before training) val=...`, and an eval step shows val= too."""
    from envs import get_env
    from flows.grpo import summary

    val = get_env("openai/gsm8k").val_key()
    assert val == "val-core/openai/gsm8k/reward/mean@1"  # the reference framework's name, as published
    assert summary(0, 20, {val: 0.25, "val-aux/openai/gsm8k/format/mean@1": 0.5}, val) == (
        "step 0/20 (before training) val=0.250"
    )
    keys = ["critic/score/mean", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "response_length/mean"]
    step = {**dict.fromkeys(keys, 0.1), "timing_s/gen": 1.0, "timing_s/update_actor": 2.0, "timing_s/step": 3.0}
    assert summary(10, 20, {**step, val: 0.5}, val).endswith("step=3.0s val=0.500")
    assert "val=" not in summary(3, 20, step, val)
