"""What a flow run's report card needs to know of its tasks and training stages, collected in process.

- Task hooks (`HOOKS`, on every stage task): each task run's name, final state (`Completed`, or
  `Cached` for a cache hit: Prefect names the state so) and wall time, per flow run.
- `RunLog` (one per run dir, while a flow runs): the training stages' metric rows, live (the
  `StageRecorder` callback in the parent process, beside the Prefect progress one) and the flow's
  tracker session (mlxcore.tracking). `stage_callback()` is what a training task adds to its callbacks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from mlxcore.io import write_jsonl
from mlxcore.tracking import event_metrics
from mlxcore.train.callbacks import CallbackList, TrainingCallback

_LOCK = threading.Lock()
TASKS: dict[str, list[dict]] = {}  # flow run id -> its task runs, in the order they ended
RUNS: dict[str, "RunLog"] = {}  # resolved run dir -> the flow run writing it


def record_task(task, task_run, state) -> None:
    """A Prefect state hook: one entry per finished task run (Completed / Cached / Failed)."""
    if task_run is None or task_run.flow_run_id is None:
        return
    seconds = task_run.total_run_time.total_seconds() if task_run.total_run_time else None
    if task_run.start_time and (task_run.end_time or state.timestamp):
        seconds = ((task_run.end_time or state.timestamp) - task_run.start_time).total_seconds()
    entry = {"id": str(task_run.id), "task": task.name, "name": task_run.name if task.task_run_name else task.name,
             "state": state.name, "seconds": seconds, "ended": time.time()}
    with _LOCK:
        TASKS.setdefault(str(task_run.flow_run_id), []).append(entry)


HOOKS = {"on_completion": [record_task], "on_failure": [record_task]}


class _QuietHook(logging.Filter):
    """Prefect logs two INFO lines per hook run ("Running hook ...", "... finished running successfully"):
    this bookkeeping hook's are dropped, its errors kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and "'record_task'" in record.getMessage())


logging.getLogger("prefect.task_runs").addFilter(_QuietHook())


class RunLog:
    """A flow run's training stages (metric rows, end results) and tracker session, by run dir."""

    def __init__(self, run_dir: str | Path, session=None):
        self.run_dir, self.session = Path(run_dir), session
        self.stages: dict[str, dict] = {}  # stage -> {"rows": [...], "end": {...}, "begin": {...}}

    def stage(self, name: str) -> dict:
        return self.stages.setdefault(name, {"rows": [], "end": None, "begin": None})

    def save(self, name: str) -> None:
        """`<run dir>/report/metrics-<stage>.jsonl`: a later run that finds the stage cached reads them there."""
        path = metrics_file(self.run_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, self.stages[name]["rows"] + [{"event": "end", **(self.stages[name]["end"] or {})}])


def metrics_file(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "report" / f"metrics-{stage.replace(' ', '-')}.jsonl"


def saved_stage(run_dir: str | Path, stage: str) -> dict | None:
    """A stage's rows and end result as the run that trained it saved them; None when none did."""
    try:
        rows = [json.loads(line) for line in metrics_file(run_dir, stage).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    end = next((r for r in rows if r.get("event") == "end"), None)
    return {"rows": [r for r in rows if r.get("event") != "end"], "end": end, "begin": None}


class StageRecorder(TrainingCallback):
    """Keeps a stage's metric rows (train and eval points, all numbers) for the report card."""

    def __init__(self, log: RunLog, stage: str):
        self.log, self.stage = log, stage

    def on_begin(self, info: dict) -> None:
        s = self.log.stage(self.stage)
        s["begin"], s["rows"] = dict(info), []

    def on_train(self, info: dict) -> None:
        self.log.stage(self.stage)["rows"].append({"step": info["step"], "event": "train", **event_metrics(info)})

    def on_eval(self, info: dict) -> None:
        self.log.stage(self.stage)["rows"].append({"step": info["step"], "event": "eval", **event_metrics(info)})

    def on_end(self, info: dict) -> None:
        self.log.stage(self.stage)["end"] = dict(info)
        try:
            self.log.save(self.stage)
        except OSError:
            pass  # the report shows the live rows; only a later cached run misses them


def active(run_dir: str | Path) -> RunLog | None:
    with _LOCK:
        return RUNS.get(str(Path(run_dir).resolve()))


def stage_callback(stage: str, run_dir: str | Path) -> TrainingCallback | None:
    """The report card's recorder and the trackers' callback for a training stage of the flow writing `run_dir`."""
    log = active(run_dir)
    if log is None:  # a task called outside a reported flow
        return None
    return CallbackList(StageRecorder(log, stage), log.session.callback(stage) if log.session else None)
