"""MLflow: one run per training run, params = the resolved config, metrics per step.

A resumed training run logs into the same MLflow run: its id is kept beside the checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from configs.load import flatten
from configs.schema import GRPOConfig
from tasks.atomic import atomic_text

DEFAULT_URI = "sqlite:///mlflow.db"
log = logging.getLogger(__name__)


def metric_key(name: str) -> str:
    """MLflow rejects '@' in keys: `mean@1` is logged as `mean_at_1`."""
    return name.replace("@", "_at_")


def tracking_uri(cfg: GRPOConfig) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_tracking_uri(cfg: GRPOConfig) -> None:
    """Before any work: a SQLite store must be creatable, a server must answer within seconds."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).expanduser().absolute().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"tracking.tracking_uri={uri}: directory {parent} does not exist or is not "
                             "writable; point it at a writable place")
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except OSError as e:
            raise ValueError(f"tracking.tracking_uri={uri}: no MLflow server answers there ({e}); start it "
                             "(mlflow server --host 127.0.0.1) or unset it to log to sqlite:///mlflow.db") from None


class Tracker:
    def __init__(self, cfg: GRPOConfig, run_root: Path, tags: dict[str, str]):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient()
        exp = mlflow.set_experiment(cfg.tracking.experiment)
        id_file = run_root / "mlflow_run.json"
        run_dir = str(run_root.expanduser().absolute())
        run_id = None
        if cfg.trainer.resume_mode == "auto":  # resume_mode=disable starts a fresh MLflow run
            if id_file.exists():
                run_id = json.loads(id_file.read_text())["run_id"]
            else:  # killed between creating the run and writing its id: an empty run with our tag
                found = self.client.search_runs([exp.experiment_id], f"tags.`grpo.run_dir` = '{run_dir}'",
                                                order_by=["attributes.start_time DESC"], max_results=1)
                if found and not found[0].data.params and not found[0].data.metrics:
                    run_id = found[0].info.run_id
        self.resumed = bool(run_id and self._exists(run_id))
        if not self.resumed:
            run_id = self.client.create_run(exp.experiment_id, run_name=cfg.tracking.run_name,
                                            tags={"grpo.run_dir": run_dir}).info.run_id
            run_root.mkdir(parents=True, exist_ok=True)
            atomic_text(id_file, json.dumps({"run_id": run_id}))
        mlflow.start_run(run_id=run_id)
        if not self.client.get_run(run_id).data.params:  # a new run, or one killed before its params
            mlflow.log_params(flatten(cfg))
            mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        mlflow.set_tags(tags)
        self.run_id = run_id
        self._pending_file = run_root / "mlflow_pending.jsonl"
        self._pending: list[tuple[int, dict[str, float]]] = []
        if self.resumed and self._pending_file.exists():
            for line in self._pending_file.read_text().splitlines():
                row = json.loads(line)
                first = next(iter(row["metrics"]), None)
                # Killed after the store took a queued step but before the queue file was rewritten.
                if first is None or row["step"] in self.logged_steps(first):
                    continue
                self._pending.append((row["step"], row["metrics"]))
            self.flush()

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # a deleted run or another store: start a fresh one
            return False

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric_key(key))}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Metrics never stop training: while the store does not answer they queue (in memory and
        in <run dir>/mlflow_pending.jsonl, which a resumed run picks up) and go out in step order
        once it answers again."""
        self._pending.append((step, {metric_key(k): float(v) for k, v in metrics.items()}))
        self.flush()

    def flush(self) -> bool:
        while self._pending:
            step, metrics = self._pending[0]
            try:
                self.mlflow.log_metrics(metrics, step=step)
            except Exception as e:  # network, server, locked database: all the same to training
                log.warning("MLflow store %s did not take step %d (%s: %s); %d step(s) queued",
                            self.uri, step, type(e).__name__, str(e)[:200], len(self._pending))
                self._save_pending()
                return False
            self._pending.pop(0)
        self._save_pending()
        return True

    def _save_pending(self) -> None:
        if self._pending:
            atomic_text(self._pending_file,
                        "".join(json.dumps({"step": s, "metrics": m}) + "\n" for s, m in self._pending))
        else:
            self._pending_file.unlink(missing_ok=True)

    def log_table(self, rows: dict[str, list], name: str) -> None:
        try:
            self.mlflow.log_table(rows, artifact_file=name)
        except Exception as e:
            log.warning("MLflow store %s did not take artifact %s (%s)", self.uri, name, e)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.flush():
            log.warning("%d step(s) of metrics stay in %s; the next run with this directory sends them",
                        len(self._pending), self._pending_file)
        try:
            self.mlflow.end_run(status=status)
        except Exception as e:
            log.warning("MLflow store %s did not take the run's end (%s)", self.uri, e)
