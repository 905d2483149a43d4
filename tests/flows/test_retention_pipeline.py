"""The pipeline flow with Power Retention (model.arch=retention): the smoke config's shapes through pretrain,
SFT, sample and bench under the session's Prefect server (GGUF export skipped); its bench report has llama's
smoke model beside it."""

import json
from pathlib import Path

import pytest

from mlxcore.config import BenchTarget, load_config

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_retention_pipeline_trains_and_benches_beside_llama(tmp_path, smoke_pipeline):
    from flows.pipeline import pipeline

    config = load_config(REPO / "configs/smoke.yaml", [
        f"out_dir={tmp_path}", "name=smoke-retention", "model.arch=retention", "model.retention_chunk=32",
        "data.synthetic.pretrain_docs=1000", "data.synthetic.sft_examples=300", "data.synthetic.val_examples=40",
        "pretrain.steps=16", "pretrain.seq_len=64", "pretrain.eval_every=8", "pretrain.eval_batches=2",
        "pretrain.save_every=0", "sft.steps=6", "sft.seq_len=64", "sft.batch_size=8", "sft.eval_every=3",
        "sft.eval_batches=2", "sft.save_every=0", "sample.num_prompts=1", "sample.max_tokens=8",
        'bench.suites=["copy","sort"]', "bench.examples=5", "bench.max_tokens=16"])
    llama = BenchTarget(kind="checkpoint", path=smoke_pipeline["result"]["checkpoint"], name="llama")
    config = config.model_copy(update={"bench": config.bench.model_copy(update={"targets": [llama, *config.bench.targets]})})
    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    for stage in ("pretrain", "sft"):
        train = result["train"][stage]
        assert train["val_loss"] < train["initial_val_loss"], (stage, train)
    ckpt = json.loads((Path(result["checkpoint"]) / "config.json").read_text())
    assert ckpt["model_type"] == "retention" and ckpt["retention_degree"] == 2
    assert result["export"] is None  # GGUF / llama.cpp has no such model: the export stage is skipped

    overall = result["bench"]["overall"]
    assert {"smoke-retention", "llama", "random"} <= set(overall)
    assert overall["smoke-retention"]["n"] == overall["llama"]["n"] > 0
