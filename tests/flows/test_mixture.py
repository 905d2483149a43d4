"""A 0.7 / 0.3 pretraining mixture with filters through the pipeline: shares, counts, SIGKILL + re-run.

One in-process run (the flow's summary: tokens drawn per source within 1% of the weights, the
planted duplicates dropped and counted; the table artifacts), then the same config through
`mlxflow run pipeline`, SIGKILLed once pretraining has written a checkpoint (mid-epoch in both
sources) and run again: its pretrained weights are byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from bench.kill_rerun import leftover_tmp, run_pipeline, weights
from mlxcore.config import load_config
from tests.conftest import REPO

# one xdist worker runs both tests, so the module's pipeline run is made once
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server"), pytest.mark.xdist_group("mixture")]

WORDS = [f"{a}{b}{c}" for a in "bdfgklmnprstvz" for b in "aeiou" for c in ("", "n", "r", "s")]
STEPS, BATCH, SEQ = 30, 8, 32


def _doc(rng, n=120):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("mixture")
    rng = random.Random(7)
    web = [_doc(rng) for _ in range(60)]
    words = web[9].split()
    near = " ".join(words[:60] + ["zzz"] + words[61:])  # one word of 120 changed
    web_rows = [{"body": d} for d in web] + [{"body": web[3]}, {"body": near}]  # planted: rows 61, 62
    books = [{"text": _doc(rng)} for _ in range(12)] + [{"text": web[5]}]  # planted: a web row, as row 13
    for name, rows in (("web", web_rows), ("books", books)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "name": "mix", "out_dir": str(root / "inproc"),
        "data": {"synthetic": {"pretrain_docs": 10, "sft_examples": 200, "val_examples": 20},
                 "pretrain": {"format": "text", "val_fraction": 0.2, "sources": [
                     {"spec": str(root / "web.jsonl"), "weight": 0.7, "columns": {"text": "body"}, "name": "web"},
                     {"spec": str(root / "books.jsonl"), "weight": 0.3, "epochs": 10, "name": "books"}]},
                 "filters": {"exact_dedup": True, "near_dedup": True}},
        "tokenizer": {"vocab_size": 384, "min_frequency": 2},
        "model": {"preset": "custom", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128},
        "pretrain": {"steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "warmup_steps": 2, "eval_every": 0,
                     "eval_batches": 2, "save_every": 10, "keep_last": 3},
        "sft": {"steps": 2, "batch_size": 8, "seq_len": 128, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
                "save_every": 0},
        "sample": {"num_prompts": 1, "max_tokens": 4}, "bench": None, "export": None}
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(config))
    state = pipeline(load_config(path), return_state=True)
    assert state.is_completed(), state.message
    return {"root": root, "config": path, "flow_run_id": state.state_details.flow_run_id, "result": state.result()}


def test_the_mixture_trains_on_the_weights_shares_and_reports_per_source_counts(mixed_run):
    result = mixed_run["result"]
    drawn = {s["name"]: s["tokens"] for s in result["train"]["pretrain"]["mixture"]}
    total = sum(drawn.values())
    assert total == STEPS * BATCH * SEQ
    assert abs(drawn["web"] / total - 0.7) < 0.01 and abs(drawn["books"] / total - 0.3) < 0.01, drawn
    data = result["data"]["pretrain"]
    assert [s["name"] for s in data["mixture"]] == ["web", "books"]
    assert all(s["train_tokens"] > 0 and s["val_docs"] > 0 for s in data["mixture"])
    assert sum(s["train_tokens"] for s in data["mixture"]) == data["tokens"]["train"]
    counts = {c["source"]: c for c in data["filters"]}  # the planted rows, and only those, are gone
    assert [counts["web"][k] for k in ("rows_in", "exact_dup", "near_dup", "rows_out")] == [62, 1, 1, 60]
    assert [counts["books"][k] for k in ("rows_in", "exact_dup", "near_dup", "rows_out")] == [13, 1, 0, 12]
    assert result["data"]["sft"].get("mixture") is None  # synthetic SFT: one source, as before
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[mixed_run["flow_run_id"]])))
    tables = {a.key: json.loads(a.data) for a in arts if a.type == "table"}
    assert [(r["source"], r["weight"]) for r in tables["mix-mix-pretrain"]] == [("web", 0.7), ("books", 0.3)]
    assert [(r["source"], r["rows_out"]) for r in tables["mix-filter-pretrain"]] == [("web", 60), ("books", 12), ("all", 72)]


def test_killed_mid_epoch_and_rerun_it_pretrains_the_same_weights(mixed_run, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    ckpts = lambda: sorted(out.glob("mix/pretrain-*/checkpoints/step-*/trainer_state.json"))  # noqa: E731
    log = tmp_path / "runs.log"
    killed = run_pipeline(out, env, kill_when=lambda o: bool(ckpts()), config=mixed_run["config"], log=log)
    assert killed["killed"], log.read_text()[-3000:]
    cursor = json.loads(ckpts()[-1].read_text())["cursor"]
    assert cursor["rows"] < STEPS * BATCH and all(s["index"] > 0 for s in cursor["sources"]), cursor  # mid-epoch
    again = run_pipeline(out, {**env, "PREFECT_HOME": str(tmp_path / "fresh-home")}, config=mixed_run["config"], log=log)
    assert again["rc"] == 0 and not again["killed"], log.read_text()[-3000:]
    assert weights(out)["pretrain"] == weights(mixed_run["root"] / "inproc")["pretrain"]
    assert leftover_tmp(out) == []
