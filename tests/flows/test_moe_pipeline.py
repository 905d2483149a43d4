"""The pipeline flow with a mixture of experts: the smoke config's shapes with 4 experts (top-2)
through pretrain and SFT under the session's Prefect server; the metrics tables carry expert usage."""

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from mlxcore.config import load_config

from tests.conftest import REPO, SMOKE_MINI, run_learning_pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_moe_pipeline_trains_and_reports_expert_usage(tmp_path):
    config = load_config(REPO / "configs/smoke.yaml", [
        f"out_dir={tmp_path}", "name=smoke-moe", "model.num_experts=4", "model.num_experts_per_tok=2",
        "model.moe_intermediate_size=176", *SMOKE_MINI,
        "bench=null", "export=null"])
    run_id, result, ckpt = run_learning_pipeline(config)
    assert result["train"]["pretrain"]["val_loss"] < 0.6 * result["train"]["pretrain"]["initial_val_loss"]
    assert ckpt["model_type"] == "qwen3_moe" and ckpt["num_experts"] == 4

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    tables = {a.key: json.loads(a.data) for a in arts if a.type == "table"}
    for stage in ("pretrain", "sft"):
        rows = [r for r in tables[f"smoke-moe-{stage}-metrics"] if r.get("loss") is not None]
        assert rows, stage
        for r in rows:
            usage = [r[f"expert_usage_{e}"] for e in range(4)]
            assert sum(usage) == pytest.approx(1.0, abs=1e-3) and min(usage) >= 0, (stage, r)
            assert 0 < r["router_entropy"] <= 1.3863 + 1e-3 and r["router_aux_loss"] >= 2 - 1e-3
