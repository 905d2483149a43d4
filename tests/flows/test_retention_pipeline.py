"""The pipeline flow with Power Retention (model.arch=retention): the smoke config's shapes through pretrain,
SFT, sample and bench under the session's Prefect server (GGUF export skipped); its bench report has llama's
smoke model beside it."""

import pytest

from mlxcore.config import BenchTarget, load_config

from tests.conftest import REPO, SMOKE_MINI, run_learning_pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_retention_pipeline_trains_and_benches_beside_llama(tmp_path, smoke_pipeline):
    config = load_config(REPO / "configs/smoke.yaml", [
        f"out_dir={tmp_path}", "name=smoke-retention", "model.arch=retention", "model.retention_chunk=32",
        *SMOKE_MINI,
        'bench.suites=["copy","sort"]', "bench.examples=5", "bench.max_tokens=16"])
    llama = BenchTarget(kind="checkpoint", path=smoke_pipeline["result"]["checkpoint"], name="llama")
    config = config.model_copy(update={"bench": config.bench.model_copy(update={"targets": [llama, *config.bench.targets]})})
    _, result, ckpt = run_learning_pipeline(config)
    assert ckpt["model_type"] == "retention" and ckpt["retention_degree"] == 2
    assert result["export"] is None  # GGUF / llama.cpp has no such model: the export stage is skipped

    overall = result["bench"]["overall"]
    assert {"smoke-retention", "llama", "random"} <= set(overall)
    assert overall["smoke-retention"]["n"] == overall["llama"]["n"] > 0
