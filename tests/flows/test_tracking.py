"""Experiment trackers and the report card, end to end.

MLflow for real: a real `mlflow server` (SQLite backend, artifacts in tmp) on loopback; a small
pipeline (configs/smoke.yaml cut to SMOKE_MINI, no bench or export) reports to it, and its run is
read back through `MlflowClient`: the params are the resolved config, every metric history is the
Prefect metrics table the flow wrote, the loss curves and the report card are artifacts. Then the
server is killed while a second run trains: the run completes and its report card counts what was
lost. W&B (offline), trackio and TensorBoard write their local files. The report card of the
session's smoke pipeline run lists every stage the Prefect API knows, with the same states.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mlxcore.config import TrackingConfig, load_config
from mlxcore.tracking import TrackingSession, flatten

from tests.conftest import REPO, SMOKE_MINI, stop_group
from tests.prefect_api import final_task_runs
from tests.flows.test_pipeline import _run  # the pipeline run, asserted completed: (flow run id, result)

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.usefixtures("prefect_server")
ONE_SERVER = pytest.mark.xdist_group("mlflow")  # the tests of the module's mlflow server: one worker, one server

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite backend, artifacts served from tmp. Not waited
    for: the first run starts while it boots (its tracker retries until the server answers), so the
    server's start (10-30 s) overlaps the run instead of adding to it. `wait()` waits for /health."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def wait(timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with _LOCAL.open(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-3000:])
            time.sleep(0.25)

    try:
        yield {"uri": uri, "proc": proc, "root": root, "wait": wait}
    finally:
        if proc.poll() is None:
            stop_group(proc)


def _config(root: Path, uri: str, *extra: str):
    return load_config(REPO / "configs/smoke.yaml",
                       [f"out_dir={root}", "name=tracked", *SMOKE_MINI, "bench=null", "export=null", "pretrain.steps=8",
                        "pretrain.eval_every=4", "pretrain.log_every=4", "sft.steps=4", "sft.eval_every=2",
                        "sft.log_every=2",
                        "report_to=[mlflow]", f"tracking.mlflow_uri={uri}", "tracking.system_metrics=false", *extra])


def _tables(flow_run_id) -> dict[str, list[dict]]:
    """The run's table artifacts (the metrics tables) by key, rows as dicts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    out = {}
    for a in arts:
        if a.type == "table":
            data = json.loads(a.data) if isinstance(a.data, str) else a.data
            out[a.key] = data
    return out


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    # the server may still be booting: the tracker's start is retried (1 + 2 + ... + 64 s at most)
    config = _config(root, mlflow_server["uri"], "tracking.run_name=first", "tracking.retries=7",
                     "tracking.backoff_s=1")
    flow_run_id, result = _run(config)
    mlflow_server["wait"](5)  # up by now: the run reached it
    return {"root": root, "config": config, "flow_run_id": flow_run_id, "result": result}


@ONE_SERVER
def test_mlflow_run_holds_the_config_the_metrics_table_and_the_artifacts(mlflow_server, tracked_run):
    from mlflow.tracking import MlflowClient

    config, result = tracked_run["config"], tracked_run["result"]
    report = result["report"]
    delivery = report["trackers"]["mlflow"]
    assert delivery["lost"] == {}, delivery  # (failures: the tries before the server was up, if it was late)
    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(delivery["run"]["run_id"])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"  # the run's name by default
    # params: every key of the resolved config, with its value
    expected = flatten(config.model_dump(mode="json"))
    assert len(expected) > 100 and run.data.params == expected
    assert run.data.params["sft.lr"] == "0.001" and run.data.params["report_to"] == '["mlflow"]'
    # metrics: each stage's history is its Prefect metrics table, step by step
    tables = _tables(tracked_run["flow_run_id"])
    compared = 0
    for stage in ("pretrain", "sft"):
        rows = tables[f"tracked-{stage}-metrics"]
        for column in ("loss", "val_loss", "grad_norm", "tok_per_s", "lr"):
            want = [(r["step"], float(r[column])) for r in rows if r.get(column) is not None]
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{stage}/{column}"))
            assert [s for s, _ in got] == [s for s, _ in want], (stage, column)
            for (_, g), (_, w) in zip(got, want):  # the table rounds: loss 4 places, lr 3 digits, tok/s whole
                assert g == pytest.approx(w, rel=5e-3, abs=6e-4 if column != "tok_per_s" else 0.5), (stage, column)
            compared += len(want)
        final = client.get_metric_history(run.info.run_id, f"{stage}/final_val_loss")
        assert final[-1].value == pytest.approx(result["train"][stage]["val_loss"])
    assert compared >= 15
    # every point the tracker counts as delivered is in the server (and no more)
    stored = sum(len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics)
    assert stored == delivery["delivered"]["metric points"]
    # artifacts: both loss curves (PNG), the model card and the report card
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | {
        f.path for d in ("curves", "model") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"curves/pretrain-loss.png", "curves/sft-loss.png", "model/README.md", "report.md"} <= files, files
    png = client.download_artifacts(run.info.run_id, "curves/sft-loss.png", str(tracked_run["root"] / "dl"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run's report card names the tracker run and says nothing was lost
    text = Path(report["path"]).read_text()
    assert "**mlflow**: everything delivered" in text and run.info.run_id in text


@ONE_SERVER
def test_a_dead_tracker_server_loses_metrics_not_the_training(mlflow_server, tracked_run):
    """The server dies once the second run exists in it (pretrain is cached; sft trains with the server
    gone): the flow completes, sft trains every step, and the report card counts the points it lost."""
    from mlflow.tracking import MlflowClient

    mlflow_server["wait"]()
    client = MlflowClient(mlflow_server["uri"])
    config = _config(tracked_run["root"], mlflow_server["uri"], "tracking.run_name=killed", "sft.lr=0.002",
                     "tracking.retries=1", "tracking.backoff_s=0.1")
    killed = threading.Event()

    def kill_when_the_run_exists():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.search_runs([client.get_experiment_by_name("tracked").experiment_id],
                                      "attributes.run_name = 'killed'"):
                    stop_group(mlflow_server["proc"])
                    killed.set()
                    return
            except Exception:
                pass
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_the_run_exists, daemon=True)
    killer.start()
    flow_run_id, result = _run(config)
    killer.join(5)
    assert killed.is_set()
    sft = result["train"]["sft"]
    assert sft["step"] == config.sft.steps and Path(sft["checkpoint"], "model.safetensors").is_file()
    states = {t["name"]: t["state"] for t in result["report"]["tasks"]}
    assert states["pretrain"] == "Cached" and states["sft"] == "Completed"
    lost = result["report"]["trackers"]["mlflow"]["lost"]
    rows = _tables(flow_run_id)["tracked-sft-metrics"]
    assert lost["metric points"] >= len(rows)  # every sft point (at least the table's), none delivered
    assert lost["artifacts"] >= 3  # the curve, the model card, the report card
    text = Path(result["report"]["path"]).read_text()
    assert f"{lost['metric points']} metric points not delivered to mlflow" in text
    # retries are bounded: each batch / artifact is tried 1 + tracking.retries times, then dropped
    failures = result["report"]["trackers"]["mlflow"]["failures"]
    assert 0 < failures <= 2 * (lost["metric points"] + lost["artifacts"] + 2)


def test_smoke_run_report_card_has_every_stage_with_its_prefect_state(smoke_pipeline):
    """The session's smoke pipeline (no tracker): report.md lists every task run with the state the
    Prefect API has for it (Cached for the reused bench answers), both trainings with curves, the bench,
    the parity gate and the model card's licence."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    result = smoke_pipeline["result"]
    assert Path(result["report"]["path"]) == smoke_pipeline["config"].run_dir.resolve() / "report.md"
    assert Path(result["report"]["path"]).is_file()  # rewritten by every later run in the run dir (other smoke tests)
    runs = final_task_runs(smoke_pipeline["flow_run_id"])
    with get_client(sync_client=True) as client:
        cards = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[smoke_pipeline["flow_run_id"]]), key=ArtifactFilterKey(any_=["report-smoke"])))
    assert len(cards) == 1  # this run's card, as the UI shows it
    text = cards[0].data
    tasks = result["report"]["tasks"]
    assert {t["id"]: t["state"] for t in tasks} == {str(tr.id): tr.state.name for tr in runs}
    assert {"pretrain", "sft", "eval", "sample", "bench-report", "parity-gate-q8_0"} <= {t["name"] for t in tasks}
    assert "Cached" in {t["state"] for t in tasks}  # the final bench reuses the gate's answers
    rows = re.findall(r"^\| (\S+) \| (Completed|Cached|Failed) \| (yes|no) \| [\d.]+ (?:s|min) \|$", text, re.M)
    assert sorted(rows) == sorted((t["name"], t["state"], "yes" if t["state"] == "Cached" else "no") for t in tasks)
    assert len(re.findall(r"!\[(pretrain|sft) loss curve\]\(data:image/png;base64,", text)) == 2
    for section in ("## Training", "## Evaluation (held out)", "## Bench", "## Export parity gate",
                    "## Model card: data and licence"):
        assert section in text
    assert "| q8_0 | passed |" in text
    sft = result["train"]["sft"]
    assert re.search(rf"^\| sft \| {sft['step']} \| {sft['train_loss']:.4g} \|", text, re.M)


def test_wandb_trackio_tensorboard_write_their_local_files(tmp_path, monkeypatch):
    """The other trackers, with no server: their files hold the metric values."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    session = TrackingSession(["wandb", "tensorboard", "trackio"], TrackingConfig(system_metrics=False), tmp_path,
                              "local", {"name": "local", "sft": {"lr": 0.001, "steps": 3}})
    cb = session.callback("sft")
    losses = [2.5, 2.0, 1.75]
    for step, loss in enumerate(losses, 1):
        cb.on_event("train", {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tok_per_s": 100.0})
    cb.on_event("eval", {"step": 3, "val_loss": 1.9, "val_ppl": 6.7})
    (tmp_path / "report.md").write_text("# card\n")
    session.log_artifact(tmp_path / "report.md")
    out = session.finish()
    for name in ("wandb", "tensorboard", "trackio"):
        assert out[name]["lost"] == {} and out[name]["delivered"]["metric points"] == 3 * 4 + 2, out[name]
    # W&B offline: the run's .wandb file and the saved report
    run_dir = Path(out["wandb"]["run"]["dir"]).parent
    assert run_dir.name.startswith("offline-run-") and (Path(out["wandb"]["run"]["dir"]) / "report.md").is_file()
    assert list(run_dir.glob("run-*.wandb"))[0].stat().st_size > 0
    # TensorBoard: the scalars read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(out["tensorboard"]["run"]["logdir"])
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("sft/loss")] == list(zip([1, 2, 3], losses))
    assert [e.value for e in acc.Scalars("sft/val_loss")] == pytest.approx([1.9])
    # trackio: its SQLite database holds the points
    import sqlite3

    con = sqlite3.connect(tmp_path / "trackio" / "local.db")
    points = {step: json.loads(m) for step, m in con.execute("SELECT step, metrics FROM metrics")}
    assert [points[s]["sft/loss"] for s in (1, 2, 3)] == losses and points[3]["sft/val_loss"] == 1.9
