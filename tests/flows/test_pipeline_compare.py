"""`mlxflow compare` on two smoke pipeline runs that differ only in sft.lr: the config difference, both
runs' curves in one PNG, and the bench deltas with paired bootstrap intervals; bad input fails clearly.

The two runs are the session's smoke run and the sft.lr / 2 run tests/flows/test_pipeline.py makes to
check that an SFT change re-runs only what follows (this file sorts after it, so in the suite that run
already exists and costs nothing here; alone, this file makes it)."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxcore.tracking import runrecord

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_server")


def _record_of(run_dir: Path, flow_run_id) -> Path:
    found = [p for p in runrecord.history(run_dir) if json.loads(p.read_text())["flow_run_id"] == str(flow_run_id)]
    assert len(found) == 1, runrecord.history(run_dir)
    return found[0]


@pytest.fixture(scope="module")
def two_runs(smoke_pipeline):
    """The records of the shared smoke run and of the same config with sft.lr halved."""
    from flows.pipeline import pipeline

    config = smoke_pipeline["config"]
    run_dir = smoke_pipeline["root"] / config.name
    half = [p for p in runrecord.history(run_dir) if json.loads(p.read_text())["config"]["sft"]["lr"] == config.sft.lr / 2]
    if not half:  # this file alone: make the run test_pipeline.py makes
        changed = config.model_copy(update={"sft": config.sft.model_copy(update={"lr": config.sft.lr / 2})})
        state = pipeline(changed, return_state=True)
        assert state.is_completed(), state.message
        half = [_record_of(run_dir, state.state_details.flow_run_id)]
    return _record_of(run_dir, smoke_pipeline["flow_run_id"]), half[-1], config.sft.lr


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_compare_shows_the_lr_difference_both_curves_and_bench_deltas_with_intervals(two_runs, tmp_path):
    from PIL import Image

    first, second, lr = two_runs
    done = _cli(first, second, "--out", tmp_path / "cmp")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["config_diff"] == {"sft.lr": [lr, lr / 2]}  # exactly the key that differs
    labels = ["A smoke", "B smoke"]
    assert [r["label"] for r in result["runs"]] == labels
    # one PNG with every stage's curves of both runs; the JSON has both series with their points
    image = Image.open(io.BytesIO((tmp_path / "cmp" / "loss-curves.png").read_bytes()))
    image.verify()
    assert image.format == "PNG" and image.size[1] > image.size[0] / 2
    sft = result["curves"]["sft"]
    assert set(sft) == set(labels) and all(len(sft[lab]["train"]) >= 2 and len(sft[lab]["val"]) >= 2 for lab in labels)
    assert sft["A smoke"]["train"] != sft["B smoke"]["train"]  # the two lrs trained differently
    assert result["curves"]["pretrain"]["A smoke"] == result["curves"]["pretrain"]["B smoke"]  # one shared stage
    # bench deltas vs the first run, each with its interval, over the 7 x 40 common questions
    bench = result["bench"]
    assert bench["baseline"] == "A smoke" and len(bench["suites"]) == 7
    for stats in [*(s["B smoke"] for s in bench["suites"].values()), bench["overall"]["B smoke"]]:
        assert stats["low"] <= stats["delta"] <= stats["high"] and stats["confidence"] == 0.95
        assert stats["delta"] == pytest.approx(stats["new"] - stats["base"])
    assert bench["overall"]["B smoke"]["n"] == 280 and sum(s["B smoke"]["n"] for s in bench["suites"].values()) == 280
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sft.lr |" in md and "![loss curves](loss-curves.png)" in md and "B smoke 95% CI" in md
    assert "| sft.lr |" in done.stdout


def test_compare_rejects_a_dir_that_is_not_a_run_and_runs_with_no_common_questions(two_runs, tmp_path):
    first, _, _ = two_runs
    done = _cli(first, tmp_path)
    assert done.returncode == 2 and f"{tmp_path} is not a run dir: it has no run.json" in done.stderr
    # a run whose bench asked other questions: nothing to pair
    record = json.loads(first.read_text())
    answers = tmp_path / "other-bench"
    answers.mkdir()
    (answers / "answers.jsonl").write_text(json.dumps({"id": "sort-9-9", "suite": "sort", "correct": True}) + "\n")
    record["bench"]["answers"][record["bench"]["target"]] = str(answers)
    (tmp_path / "other.json").write_text(json.dumps(record))
    done = _cli(first, tmp_path / "other.json", "--out", tmp_path / "cmp")
    assert done.returncode == 2 and "have no bench question in common" in done.stderr
    assert not (tmp_path / "cmp").exists()  # nothing half-written


def test_the_compare_flow_publishes_the_image_and_tables(two_runs, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.compare import compare

    first, second, lr = two_runs
    state = compare([str(first), str(second)], str(tmp_path / "cmp"), return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))}
    assert set(arts) == {"compare", "compare-config", "compare-bench"}
    assert "data:image/png;base64," in arts["compare"].data
    assert json.loads(arts["compare-config"].data) == [{"key": "sft.lr", "A smoke": str(lr), "B smoke": str(lr / 2)}]
    assert [r["suite"] for r in json.loads(arts["compare-bench"].data)][-1] == "overall"
