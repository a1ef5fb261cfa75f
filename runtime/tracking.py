"""MLflow: one run per training run, params = the resolved config, metrics per step.

A resumed training run logs into the same MLflow run: its id is kept beside the checkpoints.
The run also gets what MLflow users expect of `mlflow.start_run`: source, user and git tags,
system metrics (CPU, RAM, disk, network; GPUs with nvidia-ml-py), the datasets as run inputs and
per-step sample tables.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import yaml

from configs.load import flatten
from configs.schema import GRPOConfig
from runtime.atomic import atomic_text

DEFAULT_URI = "sqlite:///mlflow.db"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3 opens an experiment on its GenAI page unless told otherwise: the experiment tag that
# the UI reads (`mlflow.experimentKind`) and the query its experiment page takes (`workflowType`).
EXPERIMENT_KIND_TAG, ML_EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ML_VIEW_QUERY = "workflowType=machine_learning"
CODE_DIR = Path(__file__).resolve().parents[1]  # the repository this code runs from
log = logging.getLogger(__name__)


def clip_text(text: str, width: int) -> str:
    """`text` on one line (whitespace runs become one space), cut to `width` characters with an
    ellipsis: what a table cell can show."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def run_tags(extra: dict[str, str]) -> dict[str, str]:
    """The tags `mlflow.start_run` would set (mlflow.user, mlflow.source.name/type, git) plus
    `extra`. The git commit, branch and repository URL are those of the checkout this code runs
    from (the entry point may be a console script or Prefect's engine outside it); absent when
    it is not a git checkout."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
    )

    tags = resolve_tags(extra)
    for key, get in (
        (MLFLOW_GIT_COMMIT, git_utils.get_git_commit),
        (MLFLOW_GIT_BRANCH, git_utils.get_git_branch),
        (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url),
    ):
        value = get(str(CODE_DIR))
        if value:
            tags[key] = value
    return tags


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
            raise ValueError(
                f"tracking.tracking_uri={uri}: directory {parent} does not exist or is not "
                "writable; point it at a writable place"
            )
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except OSError as e:
            raise ValueError(
                f"tracking.tracking_uri={uri}: no MLflow server answers there ({e}); start it "
                "(mlflow server --host 127.0.0.1) or unset it to log to sqlite:///mlflow.db"
            ) from None


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
                found = self.client.search_runs(
                    [exp.experiment_id],
                    f"tags.`grpo.run_dir` = '{run_dir}'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                if found and not found[0].data.params and not found[0].data.metrics:
                    run_id = found[0].info.run_id
        self.resumed = bool(run_id and self._exists(run_id))
        if not self.resumed:
            run_id = self.client.create_run(
                exp.experiment_id, run_name=cfg.tracking.run_name, tags=run_tags({"grpo.run_dir": run_dir})
            ).info.run_id
            run_root.mkdir(parents=True, exist_ok=True)
            atomic_text(id_file, json.dumps({"run_id": run_id}))
        if EXPERIMENT_KIND_TAG not in exp.tags:  # the UI then opens it on its runs table
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, ML_EXPERIMENT_KIND)
        self.experiment_id = exp.experiment_id
        # System metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
        # system/gpu_*; psutil, nvidia-ml-py) every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds
        # (default 10) from a thread that ends with the run.
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
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

    def where(self) -> list[str]:
        """Lines saying where the run is: id, store, how to open the UI and the run's page."""
        uri = self.uri
        if uri.startswith(("http://", "https://")):
            base, ui = uri.rstrip("/"), f"the MLflow server at {uri}"
        else:
            if uri.startswith("sqlite:///"):  # an absolute path, so the command works from anywhere
                uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().absolute())
            base, ui = UI_ADDRESS, f"mlflow ui --backend-store-uri {uri}"
        page = f"{base}/#/experiments/{self.experiment_id}"
        return [
            f"MLflow run {self.run_id} in {uri} ({'resumed' if self.resumed else 'new'})",
            f"view it: {ui}, then {page}/runs/{self.run_id}",
            f"all runs (compare them): {page}/runs?{ML_VIEW_QUERY}",
        ]

    def log_dataset(self, df, source: str, name: str, context: str) -> None:
        """`df` (the parquet at `source`) as a run input (name, digest, schema, row count) under
        `context` ("training", "evaluation"); once per run: a resumed run with the same digest
        skips it."""
        from mlflow.data import from_pandas

        try:
            with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all local
                warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
                dataset = from_pandas(df, source=source, name=name)
            logged = self.client.get_run(self.run_id).inputs.dataset_inputs or []
            if any(d.dataset.digest == dataset.digest and d.dataset.name == name for d in logged):
                return
            self.mlflow.log_input(dataset, context=context)
        except Exception as e:  # never stops training
            log.warning("MLflow store %s did not take dataset %s (%s: %s)", self.uri, name, type(e).__name__, e)

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
                log.warning(
                    "MLflow store %s did not take step %d (%s: %s); %d step(s) queued",
                    self.uri,
                    step,
                    type(e).__name__,
                    str(e)[:200],
                    len(self._pending),
                )
                self._save_pending()
                return False
            self._pending.pop(0)
        self._save_pending()
        return True

    def _save_pending(self) -> None:
        if self._pending:
            atomic_text(
                self._pending_file, "".join(json.dumps({"step": s, "metrics": m}) + "\n" for s, m in self._pending)
            )
        else:
            self._pending_file.unlink(missing_ok=True)

    def log_table(self, rows: dict[str, list], name: str) -> None:
        """`rows` (column -> values) as MLflow table artifact `name` (a .json path), once: MLflow
        appends to an existing table, and a step replayed after a resume makes the same rows."""
        try:
            folder = str(Path(name).parent)
            if any(a.path == name for a in self.client.list_artifacts(self.run_id, None if folder == "." else folder)):
                return
            self.mlflow.log_table(rows, artifact_file=name)
        except Exception as e:
            log.warning("MLflow store %s did not take artifact %s (%s)", self.uri, name, e)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.flush():
            log.warning(
                "%d step(s) of metrics stay in %s; the next run with this directory sends them",
                len(self._pending),
                self._pending_file,
            )
        try:
            self.mlflow.end_run(status=status)
        except Exception as e:
            log.warning("MLflow store %s did not take the run's end (%s)", self.uri, e)
