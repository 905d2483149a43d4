"""Bench stages: each target answers the bench questions (`bench-<target>`), then `bench-report`
puts them side by side: table artifacts, and `report.json` / `report.md` in its dir.

A target's answers (`<run>/bench-<key>/answers.jsonl`) are keyed by what decides them: the
checkpoint's content (or the endpoint's URL and model), the questions and the code. A re-run, or
another flow benching the same checkpoint into the same run dir, is a cache hit and asks nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mlxcore.bench import report as reports
from mlxcore.bench.run import answer
from mlxcore.bench.suites import make
from mlxcore.config import BenchConfig, BenchTarget, ConfigError
from mlxcore.io import atomic_dir, path_digest, write_json, write_jsonl, write_manifest
from mlxcore.models.layout import is_model_dir
from tasks.caching import Stage
from tasks.progress import artifact_key, progress_bar
from tasks.secrets import prefect_secret


def _identity(target: BenchTarget) -> dict:
    if target.kind in ("checkpoint", "mlx-quantized"):
        if not is_model_dir(target.path):
            raise ConfigError(f"bench target {target.label!r}: {target.path!r} is not a local model dir (no "
                              "config.json); `mlxflow run pipeline` writes runs/demo/model")
        quantized = {"bits": target.bits, "group_size": target.group_size} if target.kind == "mlx-quantized" else {}
        return {"kind": target.kind, "digest": path_digest(target.path), **quantized}
    if target.kind == "gguf":  # a file of any size: its identity without reading it
        path = Path(target.path)
        if not path.is_file():
            raise ConfigError(f"bench target {target.label!r}: {target.path!r} is not a GGUF file")
        stat = path.stat()
        return {"kind": "gguf", "file": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return target.model_dump(include={"kind", "url", "model"})


def _read(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


BENCH = Stage("bench", extra=lambda params: _identity(params["target"]))
REPORT = Stage("bench-report", inputs=("answers",))


@BENCH.task(task_run_name="bench-{label}")
def bench_answers(label: str, target: BenchTarget, config: BenchConfig, run_dir: str) -> dict:
    """`target`'s scored answers to every bench question."""
    out = BENCH.dir(locals())
    if not BENCH.done(out):
        examples = make(config.suites, config.examples, config.seed)
        with progress_bar(len(examples), f"bench {label}: {len(config.suites)} suites x {config.examples}",
                          "question") as bar:
            rows = answer(target, examples, config.max_tokens, config.batch_size, config.seed, on_progress=bar,
                          resolve_secret=prefect_secret)
        with atomic_dir(out) as tmp:
            write_jsonl(tmp / "answers.jsonl", rows)
            write_manifest(tmp, "bench-answers", {"label": label, **reports.summarize(rows)})
    return {"label": label, "path": str(out), **reports.summarize(_read(out / "answers.jsonl"))}


@REPORT.task()
def bench_report(answers: list[str], labels: list[str], run_dir: str, title: str = "bench") -> dict:
    """Targets side by side: overall, per suite, per category (tables in the UI, JSON + markdown files)."""
    out = REPORT.dir(locals())
    rep = reports.report({label: _read(Path(d) / "answers.jsonl") for label, d in zip(labels, answers)})
    if not REPORT.done(out):
        md = reports.markdown(rep, title)
        with atomic_dir(out) as tmp:
            write_json(tmp / "report.json", rep)
            (tmp / "report.md").write_text(md)
            write_manifest(tmp, "bench-report", {"targets": labels})
        _artifacts(rep, md, Path(run_dir).name, title)
    accuracy = {suite: {t: s["accuracy"] for t, s in per.items()} for suite, per in rep["suites"].items()}
    return {"path": str(out), "overall": rep["overall"], "accuracy": accuracy}


def _artifacts(rep: dict, md: str, name: str, title: str) -> None:
    tables = reports.tables(rep)
    create_table_artifact(table=tables["overall"], key=artifact_key(name, "bench"),
                          description=f"{title}: accuracy, invalid rate, generated tok/s, ms/example per target")
    create_table_artifact(table=tables["suites"], key=artifact_key(name, "bench-suites"),
                          description=f"{title}: accuracy and invalid rate per suite, targets side by side")
    create_table_artifact(table=tables["categories"], key=artifact_key(name, "bench-categories"),
                          description=f"{title}: accuracy and invalid rate per category, targets side by side")
    create_markdown_artifact(markdown=md, key=artifact_key(name, "bench-report"), description=f"{title} report")


def run_bench(own: list[BenchTarget], config: BenchConfig, run_dir: str, title: str = "bench") -> dict:
    """The flow's own models (`own`) and the config's targets answer; then the report."""
    targets = own + config.targets
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bench targets need distinct names, got {labels}: set name= on the targets")
    questions = config.model_copy(update={"targets": []})  # a target's answers do not depend on the others
    answers = [bench_answers(t.label, t, questions, run_dir)["path"] for t in targets]
    # each target's answers dir: the per-question outcomes `mlxflow compare` and promotion pair up
    return bench_report(answers, labels, run_dir, title) | {"answers": dict(zip(labels, answers))}
