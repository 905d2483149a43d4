"""The run record of a flow run (mlxcore/tracking/runrecord.py): what `mlxflow compare` reads."""

from __future__ import annotations

from pathlib import Path

from mlxcore.tracking import runrecord


def record_run(flow: str, config, stages: dict[str, str | None], model: str | None, bench: dict | None = None,
               target: str | None = None, extra: dict | None = None) -> str:
    """Write `<run>/run.json` and `<run>/records/...json` for this flow run. `bench`: run_bench's result;
    `target`: the label of the run's own model in it."""
    from prefect.runtime import flow_run

    bench_part = None
    if bench:
        bench_part = {"report": bench.get("path"), "target": target, "answers": bench.get("answers", {})}
    path = runrecord.write(config.run_dir, flow, config.name, config.model_dump(mode="json"),
                           {k: str(Path(v)) for k, v in stages.items() if v}, model, bench_part,
                           flow_run_id=str(flow_run.id) if flow_run.id else None, extra=extra)
    return str(path)
