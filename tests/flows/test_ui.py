"""What a user sees in the Prefect UI after the README's main job, `mlxflow run pipeline` (the demo
on its embedded defaults, about 5 minutes here): a real `prefect server start`, the pipeline run
against it from another process, and headless Chromium (Debian's package, driven by Playwright)
reading the run's page. Everything stays on 127.0.0.1.

The run page's Artifacts tab lists one card per artifact; each card opens the artifact's page,
where the UI renders it (tests/prefect_ui.py says where what is).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, stop_group
from tests.prefect_ui import browser_page, open_run_artifacts, start_prefect_server


@pytest.mark.slow
def test_the_demo_run_page_shows_progress_metrics_loss_curve_and_a_bench_beating_random(tmp_path):
    shots = Path(os.environ.get("MLXFLOW_SCREENSHOTS") or tmp_path) / "pipeline-run"
    base, server = start_prefect_server(tmp_path / "server-home")
    try:
        env = {**os.environ, "PREFECT_API_URL": f"{base}/api", "PREFECT_HOME": str(tmp_path / "client-home"),
               "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "flows.cli", "run", "pipeline", "--set", f"out_dir={tmp_path / 'runs'}"]
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        print(run.stdout[-3000:])  # the summary, bench table included (pytest -s shows it)
        [flow_run] = httpx.post(f"{base}/api/flow_runs/filter", json={}, timeout=30).json()
        assert flow_run["state_type"] == "COMPLETED"
        with browser_page() as page:
            found = open_run_artifacts(page, base, flow_run["id"], screenshot_dir=shots)
            assert not page.blocked_requests, page.blocked_requests
    finally:
        stop_group(server)

    # progress artifacts, updated to the end: data stages, both trainings, evals, bench generations
    done = [p for p in found["progress"] if p["percent"] == 100.0]
    assert len(done) >= 8 and len(done) == len(found["progress"]), found["progress"]
    # the metrics tables: loss, held-out loss, lr ... by step
    tables = {t["key"]: t for t in found["tables"]}
    assert {"step", "loss", "val_loss", "lr", "grad_norm", "tok_per_s"} <= set(tables["demo-sft-metrics"]["headers"])
    assert tables["demo-pretrain-metrics"]["rows"] >= 10
    # the bench report as tables: the demo model beside the uniform-random baseline, per suite; the
    # tiny model has learned to copy and to sort, which random answers almost never get right
    suites = {row["suite"]: row for row in tables["demo-bench-suites"]["cells"]}
    assert list(suites) == ["math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy"]
    for suite in ("copy", "sort"):
        ours, chance = float(suites[suite]["demo accuracy"]), float(suites[suite]["random accuracy"])
        print(f"{suite}: demo {ours:.3f} vs random {chance:.3f}")
        assert ours >= chance + 0.2, (suite, suites[suite])
    # the loss curves: PNGs the browser decoded (natural size of matplotlib's 7 x 3.4 in at 100 dpi)
    assert not found["broken_images"], found["broken_images"]
    curves = {i["alt"]: i for i in found["images"] if i["src_prefix"].startswith("data:image/png;base64,")}
    for stage in ("pretrain", "sft"):
        assert (curves[f"{stage} loss curve"]["natural_width"], curves[f"{stage} loss curve"]["natural_height"]) == (700, 340)
    # the screenshots it took: the run's Artifacts tab, then every artifact's page
    paths = [Path(p) for p in found["screenshots"]]
    assert paths[0].name == "run-artifacts.png" and any("demo-sft-loss-curve" in p.name for p in paths)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
