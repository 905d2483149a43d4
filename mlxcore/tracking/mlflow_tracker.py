"""MLflow: one run per flow run through `MlflowClient` (no global state), metrics in batches, artifacts,
system metrics (`SystemMetricsMonitor`, needs psutil) when `tracking.system_metrics`.

The URI: `tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else SQLite in `<run dir>/mlflow.db` (MLflow 3
refuses a new file store); artifacts then go to `<run dir>/mlruns`.
MLflow's own HTTP retries (7, with a doubling backoff: minutes against a dead server) are cut to 0
and its timeout to `tracking.timeout_s` unless $MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT say
otherwise: the tracker's worker retries instead (`tracking.retries`, counted).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow  # noqa: F401  (ImportError here: the tracker is reported as not installed)
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mlxcore.tracking import Tracker

MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 6000  # MLflow's limits per log_batch call / value


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, settings, run_dir, run_name, experiment, params, tags=None):
        self.uri = settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.artifacts = None
        if not self.uri:  # a local store beside the run: its artifacts too (not ./mlruns of the cwd)
            self.uri = f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
            self.artifacts = (Path(run_dir).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(settings.timeout_s, 1))))
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id, self.run_ref, self.monitor = None, None, None
        super().__init__(settings, run_dir, run_name, experiment, params, tags)

    def _start(self) -> None:
        if self.run_id is None:  # a retry after the run was created only sends the params again
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                self.experiment, artifact_location=self.artifacts)
            run = self.client.create_run(exp_id, run_name=self.run_name,
                                         tags={"mlxflow.run_dir": str(self.run_dir), **self.tags})
            self.run_id = run.info.run_id
            self.run_ref = {"uri": self.uri, "experiment_id": exp_id, "run_id": self.run_id}
        items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in self.params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])
        if getattr(self.settings, "system_metrics", False) and self.monitor is None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, tracking_uri=self.uri)
                self.monitor.start()
            except Exception:  # psutil missing: no system metrics, the rest goes on
                self.monitor = None

    def _metrics(self, points) -> None:
        items = [Metric(k, v, int(ts * 1000), step) for k, v, step, ts in points]
        for i in range(0, len(items), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS])

    def _artifact(self, path: str, folder: str) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=folder or None)

    def _finish(self, status: str) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:
                pass
        self.client.set_terminated(self.run_id, status=status)
        self.client.log_batch(self.run_id, tags=[RunTag("mlxflow.status", status)])
