"""The pipeline flow end to end under a real Prefect server: outputs, caching, artifacts, errors."""

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from mlxcore.config import BENCH_SUITES, load_config
from mlxcore.io import read_manifest

from tests.conftest import REPO
from tests.prefect_api import final_task_runs

pytestmark = pytest.mark.usefixtures("prefect_server")


def _config(run_root, *overrides):
    return load_config(REPO / "configs/smoke.yaml", [f"out_dir={run_root}", *overrides])


def _run(config):
    from flows.pipeline import pipeline

    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    return state.state_details.flow_run_id, state.result()


def _task_states(flow_run_id) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for tr in final_task_runs(flow_run_id):
        states.setdefault(tr.name.rsplit("-", 1)[0], []).append(tr.state.name)
    return states


def _artifacts(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def first_run(smoke_pipeline):
    return smoke_pipeline["root"], smoke_pipeline["config"], smoke_pipeline["flow_run_id"], smoke_pipeline["result"]


def test_pipeline_trains_and_reports(first_run):
    root, config, flow_run_id, result = first_run
    states = _task_states(flow_run_id)
    assert set(states) == {"data", "tokenizer", "pretokenize", "pretrain", "sft", "eval", "sample", "bench",
                           "bench-report", "export-gguf", "parity-gate", "bench-smoke"}  # bench-smoke-q8_0: the GGUF
    # the final bench reuses the answers the parity gate had the checkpoint and the GGUF give
    assert sorted(states.pop("bench")) == ["Cached", "Completed", "Completed"], states
    assert sorted(states.pop("bench-smoke")) == ["Cached", "Completed"], states
    assert all(s == "Completed" for v in states.values() for s in v), states
    for stage in ("pretrain", "sft"):
        ev = result["eval"][stage]
        # the held-out loss ends at most half of the untrained model's (~ln of the vocab size)
        assert ev["loss"] <= 0.5 * ev["uniform_loss"], (stage, ev)
        assert result["train"][stage]["val_loss"] < result["train"][stage]["initial_val_loss"]
    ckpt = result["checkpoint"]
    assert read_manifest(ckpt)["kind"] == "checkpoint" and ckpt.startswith(str(root / config.name / "sft-"))
    assert len(result["samples"]["samples"]) == config.sample.num_prompts
    # the final model's card: the synthetic data's license, the held-out losses and the bench beside random
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(ckpt) / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "mlx" and "mlxflow-synthetic" in card.text
    assert "## Held-out evaluation" in card.text and "| overall |" in card.text and "random" in card.text
    assert "README.md" not in read_manifest(ckpt)["files"]


def test_data_and_training_tasks_publish_progress_and_metrics_artifacts(first_run):
    _, _, flow_run_id, result = first_run
    arts = _artifacts(flow_run_id)
    progress = sorted(a.description.split(":")[0].split(" on ")[0] for a in arts
                      if a.type == "progress" and float(a.data) == 100.0)
    sft_name = os.path.basename(os.path.dirname(result["checkpoint"]))
    pretrain_name = os.path.basename(os.path.dirname(result["train"]["pretrain"]["checkpoint"]))
    assert progress == sorted(["pretokenize pretrain", "pretokenize sft", "pretrain", "sft", f"eval {pretrain_name}",
                               f"eval {sft_name}", "bench smoke", "bench random", "bench smoke-q8_0",
                               "export gguf q8_0"])
    tables = {a.key: a for a in arts if a.type == "table"}
    splits = {r["split"]: r for r in json.loads(tables["smoke-pretokenize-sft"].data)}
    assert splits["train"]["documents"] == 1200 and splits["val"]["documents"] == 100
    assert "1300 rows read, 0 truncated" in tables["smoke-pretokenize-sft"].description
    metrics = json.loads(tables["smoke-pretrain-metrics"].data)
    assert [r["step"] for r in metrics if r["loss"] is not None][-1] == 30
    assert {"smoke-sft-metrics", "smoke-samples", "smoke-eval-sft", "smoke-eval-pretrain"} <= set(tables)
    # the loss curves: a PNG inside markdown, the way the Prefect UI shows images without a host
    curves = {a.key: a.data for a in arts if a.type == "markdown" and a.key and a.key.endswith("-loss-curve")}
    assert set(curves) == {"smoke-pretrain-loss-curve", "smoke-sft-loss-curve"}
    png = base64.b64decode(curves["smoke-sft-loss-curve"].split("data:image/png;base64,")[1].split(")")[0])
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # the bench report: our model and the random baseline side by side, per suite
    bench = {r["target"]: r for r in json.loads(tables["smoke-bench"].data)}
    assert set(bench) == {"smoke", "smoke-q8_0", "random"} and bench["smoke"]["n"] == bench["smoke-q8_0"]["n"] == 7 * 40
    # the export: a q8_0 GGUF and its Modelfile, and the parity gate's side-by-side card
    gate = result["export"]["gates"]["q8_0"]
    assert gate["passed"] and gate["tokens"]["differing_texts"] == 0 and gate["tokens"]["texts"] > 500
    assert "PASSED" in next(a.data for a in arts if a.key == "smoke-parity-q8-0")
    assert (Path(result["export"]["gguf"]["q8_0"]["path"]) / "Modelfile").read_text().count("PARAMETER stop") == 1
    suites = json.loads(tables["smoke-bench-suites"].data)
    assert [r["suite"] for r in suites] == list(BENCH_SUITES) and {"smoke accuracy", "random accuracy"} <= set(suites[0])
    assert result["bench"]["overall"]["random"]["accuracy"] == pytest.approx(bench["random"]["accuracy"], abs=1e-3)
    assert os.path.realpath(result["model"]) == os.path.realpath(result["checkpoint"])


def test_second_run_is_all_cached_and_an_sft_change_reruns_only_downstream(first_run):
    root, config, _, result = first_run
    flow_run_id, again = _run(config)
    states = _task_states(flow_run_id)
    assert all(s == "Cached" for v in states.values() for s in v), states
    assert again["checkpoint"] == result["checkpoint"]

    changed = config.model_copy(update={"sft": config.sft.model_copy(update={"lr": config.sft.lr / 2})})
    flow_run_id, third = _run(changed)
    states = _task_states(flow_run_id)
    for stage in ("data", "tokenizer", "pretokenize", "pretrain"):
        assert set(states[stage]) == {"Cached"}, (stage, states)
    assert states["sft"] == ["Completed"] and states["sample"] == ["Completed"]
    assert sorted(states["eval"]) == ["Cached", "Completed"]  # the pretrain eval is reused
    assert third["checkpoint"] != result["checkpoint"]


def test_a_deleted_stage_dir_is_rebuilt_not_served_stale(first_run):
    root, config, _, result = first_run
    shutil.rmtree(result["eval"]["sft"]["path"])
    flow_run_id, again = _run(config)
    assert "Completed" in _task_states(flow_run_id)["eval"]
    assert read_manifest(again["eval"]["sft"]["path"])["kind"] == "eval"


def test_cli_runs_with_a_yaml_and_rejects_a_bad_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  lr: fast\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "pipeline", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{bad}:2: pretrain.lr: Input should be a valid number" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failing_stage_fails_the_cli_with_the_reason(tmp_path, capsys):
    from flows.cli import main

    code = main(["run", "pipeline", "--config", str(REPO / "configs/smoke.yaml"), "--set", f"out_dir={tmp_path}",
                 "--set", "tokenizer.path=/nonexistent/tok"])
    assert code == 1
    assert "/nonexistent/tok: no tokenizer.json" in capsys.readouterr().err


def test_bad_data_fails_the_pretokenize_task_with_file_and_line(small_data, tmp_path):
    from mlxcore.data.records import DataError
    from mlxcore.io import write_manifest
    from tasks.data import pretokenize

    raw = tmp_path / "raw"
    shutil.copytree(small_data["raw"], raw)
    with open(raw / "sft/val.jsonl", "a") as f:
        f.write("{not json}\n")
    write_manifest(raw, "raw-dataset")
    with pytest.raises(DataError, match=r"sft/val.jsonl:81: invalid JSON"):
        pretokenize(str(raw), str(small_data["tok"]), "sft", {}, 129, 0, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
