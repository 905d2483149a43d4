"""What a user sees in the Prefect UI after a pipeline run: the session's real `prefect server
start` (tests/conftest.py), the smoke pipeline run against it (the `smoke_pipeline` fixture, shared
with the pipeline and kill tests), and headless Chromium (Debian's package, driven by Playwright)
reading the run's page. Everything stays on 127.0.0.1.

The run page's Artifacts tab lists one card per artifact; each card opens the artifact's page,
where the UI renders it (tests/prefect_ui.py says where what is). That the demo's model learns
what the bench measures is held elsewhere: tests/flows/test_preference.py's SFT model sorts far
above the uniform-random baseline, and the README's numbers come from `mlxflow run pipeline`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.prefect_ui import browser_page, open_run_artifacts


@pytest.mark.slow
def test_the_run_page_shows_progress_metrics_loss_curves_and_the_bench_beside_random(tmp_path, prefect_server,
                                                                                      smoke_pipeline):
    shots = Path(os.environ.get("MLXFLOW_SCREENSHOTS") or tmp_path) / "pipeline-run"
    name = smoke_pipeline["config"].name
    with browser_page() as page:
        found = open_run_artifacts(page, prefect_server, str(smoke_pipeline["flow_run_id"]), screenshot_dir=shots)
        assert not page.blocked_requests, page.blocked_requests

    # progress artifacts, updated to the end: data stages, both trainings, evals, bench generations
    done = [p for p in found["progress"] if p["percent"] == 100.0]
    assert len(done) >= 8 and len(done) == len(found["progress"]), found["progress"]
    # the metrics tables: loss, held-out loss, lr ... by step
    tables = {t["key"]: t for t in found["tables"]}
    assert {"step", "loss", "val_loss", "lr", "grad_norm", "tok_per_s"} <= set(tables[f"{name}-sft-metrics"]["headers"])
    assert tables[f"{name}-pretrain-metrics"]["rows"] >= 3
    # the bench report as tables: the model beside the uniform-random baseline, per suite
    suites = {row["suite"]: row for row in tables[f"{name}-bench-suites"]["cells"]}
    assert list(suites) == ["math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy"]
    for row in suites.values():
        assert 0.0 <= float(row[f"{name} accuracy"]) <= 1.0 and 0.0 <= float(row["random accuracy"]) <= 1.0
    # the loss curves: PNGs the browser decoded (natural size of matplotlib's 7 x 3.4 in at 100 dpi)
    assert not found["broken_images"], found["broken_images"]
    curves = {i["alt"]: i for i in found["images"] if i["src_prefix"].startswith("data:image/png;base64,")}
    for stage in ("pretrain", "sft"):
        assert (curves[f"{stage} loss curve"]["natural_width"], curves[f"{stage} loss curve"]["natural_height"]) == (700, 340)
    # the report card (tasks/report.py): every stage of the run by name, its loss curves rendered
    report = next(m["text"] for m in found["markdown"] if m["key"] == f"report-{name}")
    stages = {t["name"] for t in smoke_pipeline["result"]["report"]["tasks"]}
    assert {"pretrain", "sft", "bench-report"} <= stages and all(stage in report for stage in stages), stages
    assert "Report card: " + name in report and "Model card: data and licence" in report
    shown = {i["alt"] for i in found["images"] if i["artifact"] == f"report-{name}"}
    assert {"pretrain loss curve", "sft loss curve"} <= shown, shown
    # the screenshots it took: the run's Artifacts tab, then every artifact's page
    paths = [Path(p) for p in found["screenshots"]]
    assert paths[0].name == "run-artifacts.png" and any(f"{name}-sft-loss-curve" in p.name for p in paths)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
