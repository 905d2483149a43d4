"""What one flow run made, written into its run dir: `<run>/run.json` (the latest run) and
`<run>/records/<UTC time>-<flow run id>.json` (every run, never overwritten).

Two runs of the same config name share a run dir (their unchanged stages are cache hits there), so
the run dir alone does not say which stage dirs belong to which run; the record does. `mlxflow
compare` reads records: a run dir means its latest run, a record file means that run.

A record: `flow`, `name`, `flow_run_id`, `created_at`, `config` (the resolved config, as JSON),
`stages` ({stage: its final model dir, whose trainer_state.json holds the loss history}), `bench`
(null, or {"report": the bench-report dir, "target": the run's own model's label, "answers":
{label: answers dir}}) and `model` (the run's final model dir).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlxcore.io import write_json

LATEST = "run.json"
RECORDS = "records"


class RunRecordError(ValueError):
    """A path that is not a run dir (no run.json) or not a readable run record."""


def write(run_dir: str | Path, flow: str, name: str, config: dict, stages: dict[str, str], model: str | None,
          bench: dict | None = None, flow_run_id: str | None = None, extra: dict | None = None) -> Path:
    """Write the record of one run (atomically): its own file under `records/`, then `run.json`. The record's path."""
    run_dir = Path(run_dir)
    ns = time.time_ns()  # one clock read for the name's seconds and nanoseconds, so names sort by time
    now = time.gmtime(ns // 1_000_000_000)
    record = {"flow": flow, "name": name, "flow_run_id": flow_run_id,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), "config": config,
              "stages": {k: str(v) for k, v in stages.items() if v}, "model": model, "bench": bench, **(extra or {})}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", now) + f"-{ns % 1_000_000_000:09d}"
    path = run_dir / RECORDS / f"{stamp}-{(flow_run_id or 'local')[:8]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    write_json(run_dir / LATEST, record | {"record": str(path)})
    return path


def load(path: str | Path) -> dict:
    """The record a path names: a run dir (its latest run) or a record file. `path` is added as `source`."""
    path = Path(path)
    if path.is_dir():
        file = path / LATEST
        if not file.is_file():
            raise RunRecordError(f"{path} is not a run dir: it has no {LATEST} (written by every `mlxflow run "
                                 f"pipeline|finetune|distill|rl` run; an older run dir has none: run it again, "
                                 f"its finished stages are cache hits)")
    elif path.is_file():
        file = path
    else:
        raise RunRecordError(f"{path}: no such run dir or run record")
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunRecordError(f"{file}: not a readable run record ({e})") from e
    missing = [k for k in ("flow", "name", "config", "stages") if k not in (record if isinstance(record, dict) else {})]
    if missing:
        raise RunRecordError(f"{file}: not a run record (no {', '.join(missing)})")
    return record | {"source": str(path)}


def history(run_dir: str | Path) -> list[Path]:
    """Every run's record in `run_dir`, oldest first."""
    return sorted((Path(run_dir) / RECORDS).glob("*.json"))
