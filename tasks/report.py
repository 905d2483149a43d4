"""The Prefect side of trackers and report cards: `@reported` under a training flow's `@flow`.

Around the flow's body it opens the run's tracker session (`report_to`; mlxcore.tracking) and its
`RunLog` (tasks/runlog.py: the training stages' metric rows, live, in this process), and at the end,
whether the flow succeeded or not, writes the report card: `<run dir>/report.md` and the markdown
artifact `report-<run name>`; the trackers get the loss curves, the bench report, the model card and
the report card as artifacts, then their run ends. The flow's result gains `report`: the card's
path and, per tracker, what was delivered and lost. A report that fails to build is logged and
never fails the flow.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import typing
from pathlib import Path

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from mlxcore.bench.plots import loss_curve
from mlxcore.config import with_overrides
from mlxcore.io import write_text
from mlxcore.tracking import TrackingSession
from mlxcore.tracking.report import card_summary, curve_points, render
from tasks import runlog
from tasks.progress import artifact_key

log = logging.getLogger("mlxflow.report")
FIT_KEYS = ("steps", "train_loss", "val_loss", "initial_val_loss", "tok_per_s")


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def _fit(stage: str, end: dict | None, rows: list[dict], cached: bool) -> dict:
    end = end or {}
    return {"stage": stage, "cached": cached, "steps": end.get("step"), "train_loss": end.get("train_loss"),
            "val_loss": end.get("val_loss"), "initial_val_loss": end.get("initial_val_loss"),
            "tok_per_s": end.get("tok_per_s"), "rows": rows}


def training_records(log_: runlog.RunLog, result: dict | None) -> list[dict]:
    """Each training stage: the live ones (this run trained them), then those the flow's result names
    that this run found done (cached: their rows from the run that trained them, when it saved them)."""
    out = [_fit(name, s["end"], s["rows"], False) for name, s in log_.stages.items()]
    live = set(log_.stages)
    fits = (result or {}).get("train") if isinstance(result, dict) else None
    if isinstance(fits, dict) and "checkpoint" not in fits:
        for name, fit in fits.items():
            if not isinstance(fit, dict) or any(s == name or s.startswith(name + " ") for s in live):
                continue
            saved = runlog.saved_stage(log_.run_dir, name) or next(
                (runlog.saved_stage(log_.run_dir, p.stem.removeprefix("metrics-"))
                 for p in sorted((log_.run_dir / "report").glob(f"metrics-{name}-*.jsonl"))), None)
            end = {"step": fit.get("step"), **{k: fit.get(k) for k in FIT_KEYS if k in fit}}
            out.append(_fit(name, end, (saved or {}).get("rows", []), True))
        order = list(fits)  # the flow's order (pretrain, sft, preference), live or cached
        out.sort(key=lambda s: next((i for i, k in enumerate(order) if s["stage"] == k or s["stage"].startswith(k + " ")),
                                    len(order)))
    return out


def _card_parts(result: dict | None, run_dir: Path) -> dict:
    parts: dict = {}
    if not isinstance(result, dict):
        return parts
    evals, bench = result.get("eval"), result.get("bench")
    covered = isinstance(bench, dict) and bench.get("covers_eval")  # the bench report shows the eval metrics (vlm)
    if isinstance(evals, dict) and not covered:
        parts["eval"] = {k: v for k, v in evals.items() if isinstance(v, dict)}
    if isinstance(bench, dict) and bench.get("path") and (Path(bench["path"]) / "report.md").is_file():
        parts["bench"] = (Path(bench["path"]) / "report.md").read_text()
        parts["bench_file"] = str(Path(bench["path"]) / "report.md")
    export = result.get("export")
    if isinstance(export, dict) and export.get("gates"):
        parts["parity"] = {q: {"passed": g.get("passed"), "reasons": g.get("reasons")} for q, g in export["gates"].items()}
    if isinstance(result.get("promotion"), dict):
        parts["promotion"] = result["promotion"]
    ckpt = result.get("checkpoint")
    if ckpt and (Path(ckpt) / "README.md").is_file():
        card_file = Path(ckpt) / "README.md"
        parts["model_card"] = card_summary(card_file.read_text()) | {"path": str(card_file)}
    return parts


def finish_report(flow: str, config, log_: runlog.RunLog, flow_run_id: str | None, result, error: str | None,
                  seconds: float) -> dict:
    """Write the card (file + artifact), hand the trackers their artifacts, end their run: the result's `report`."""
    run_dir, name = log_.run_dir, config.name
    with runlog._LOCK:
        tasks = runlog.TASKS.pop(flow_run_id, []) if flow_run_id else []
    if error and not tasks and not log_.stages:  # failed before any stage (a bad config): no card, no files
        if log_.session is not None:
            log_.session.finish("FAILED", timeout_s=10)
        return {"path": None, "trackers": {}, "tasks": []}
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    card = {"title": name, "flow": flow, "status": "Failed" if error else "Completed", "seconds": seconds,
            "run_dir": str(run_dir), "error": error, "tasks": tasks,
            "training": training_records(log_, result)} | _card_parts(result, run_dir)
    session = log_.session
    if session is not None:
        for s in card["training"]:
            train, val = curve_points(s["rows"])
            if train or val:
                png = out_dir / f"{s['stage'].replace(' ', '-')}-loss.png"
                png.write_bytes(loss_curve(train, val, f"{name} {s['stage']}"))
                session.log_artifact(png, "curves")
        if card.get("bench_file"):
            session.log_artifact(card["bench_file"], "bench")
        if card.get("model_card"):
            session.log_artifact(card["model_card"]["path"], "model")
        write_text(run_dir / "report.md", render(card))  # the trackers' copy: before their delivery counts
        session.log_artifact(run_dir / "report.md")
        card["trackers"] = session.finish("FAILED" if error else "FINISHED")
        for t in card["trackers"].values():
            if any((t.get("lost") or {}).values()) or t["errors"]:
                _logger().warning("tracking: %s", t["summary"])
    md = render(card)
    write_text(run_dir / "report.md", md)
    create_markdown_artifact(key=artifact_key("report", name), markdown=md,
                             description=f"{flow} {name}: report card (stages, metrics, curves, bench, trackers)")
    return {"path": str(run_dir / "report.md"), "trackers": card.get("trackers", {}),
            "tasks": [{k: t[k] for k in ("id", "name", "state", "seconds")} for t in tasks]}


def report_lines(report: dict) -> str:
    """The CLI's last lines: where the card is, what each tracker got and lost."""
    lines = [f"report card: {report['path']}"]
    for name, t in (report.get("trackers") or {}).items():
        lines.append(f"  {t.get('summary') or name}")
    return "\n".join(lines)


def reported(fn):
    """Under `@flow`: trackers for the run and its report card at the end (see the module doc)."""
    @functools.wraps(fn)
    def run(config, overrides: list[str] = []):
        config = with_overrides(config, overrides)
        run_dir = Path(config.run_dir).resolve()
        ctx = FlowRunContext.get()
        flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
        session = None
        if config.report_to:
            session = TrackingSession(config.report_to, config.tracking, run_dir, config.name,
                                      config.model_dump(mode="json"),
                                      tags={"mlxflow.flow": fn.__name__, "mlxflow.flow_run_id": flow_run_id or ""})
        log_ = runlog.RunLog(run_dir, session)
        key = str(run_dir)
        with runlog._LOCK:
            runlog.RUNS[key] = log_
        start, result, error = time.monotonic(), None, None
        try:
            result = fn(config, [])
            return result
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            with runlog._LOCK:
                runlog.RUNS.pop(key, None)
            try:
                report = finish_report(fn.__name__, config, log_, flow_run_id, result, error, time.monotonic() - start)
                if isinstance(result, dict):
                    result["report"] = report
            except Exception:  # the report is never why a flow fails
                _logger().exception("the report card could not be written")
                if session is not None:
                    session.finish("FAILED" if error else "FINISHED", timeout_s=10)

    # the flow module's annotations are strings (`from __future__ import annotations`): resolved here, in
    # its globals, so Prefect's parameter model (built from this wrapper's signature) knows the config class
    run.__signature__ = inspect.signature(fn, eval_str=True)
    run.__annotations__ = typing.get_type_hints(fn)
    return run
