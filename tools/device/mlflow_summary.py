"""Print every metric of the newest MLflow run, one row per step: `python tools/device/mlflow_summary.py URI [RUN_NAME]`."""

import sys

from mlflow import MlflowClient


def main(uri: str, run_name: str | None = None) -> None:
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    query = f"attributes.run_name = '{run_name}'" if run_name else ""
    run = client.search_runs(exps, query, order_by=["attributes.start_time DESC"], max_results=1)[0]
    rows: dict[int, dict[str, float]] = {}
    for key in sorted(run.data.metrics):
        for m in client.get_metric_history(run.info.run_id, key):
            rows.setdefault(m.step, {})[key] = m.value
    print(f"run {run.info.run_name} ({run.info.run_id}) status={run.info.status}")
    for step in sorted(rows):
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(rows[step].items())))


if __name__ == "__main__":
    main(*sys.argv[1:])
