"""Runs side by side (mlxcore/bench/compare.py) as Prefect artifacts: the overlaid loss curves (a PNG in
markdown), the bench suites with deltas and paired bootstrap intervals, and the config keys that differ."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mlxcore.bench import compare as cmp
from tasks.progress import artifact_key


@flow(name="compare")
def compare(runs: list[str], out: str | None = None, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> dict:
    """`runs`: run dirs (their latest run) or run records; the first is the baseline. `out`: where
    compare.md / compare.json / loss-curves.png go (default: compare/ beside the first run dir)."""
    first = Path(runs[0])
    out = out or str((first.parent.parent if first.is_file() else first.parent) / "compare")
    result = cmp.compare(runs, out, confidence, resamples, seed)
    png = result.pop("png")
    labels = [r["label"] for r in result["runs"]]
    key = artifact_key("compare")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()  # the UI renders it with no host
    create_markdown_artifact(key=key, markdown=cmp.markdown(result, image=uri),
                             description=f"{' vs '.join(labels)}: loss curves, bench deltas, config differences")
    diff = cmp.config_rows(result["config_diff"], labels)
    create_table_artifact(key=f"{key}-config", table=diff or [{"key": "(none)"}],
                          description="The resolved config keys that differ between the runs")
    rows = cmp.bench_rows(result["bench"])
    if rows:
        create_table_artifact(key=f"{key}-bench", table=rows, description=(
            f"Bench accuracy per suite; delta vs {labels[0]} with its {confidence:.0%} paired bootstrap interval"))
    return result
