"""Evaluation stages: held-out loss / perplexity, and a few sample generations."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_table_artifact

from mlxcore.config import SampleConfig
from mlxcore.bench.perplexity import loss_ppl
from mlxcore.models.generate import sample_split
from mlxcore.io import atomic_dir, read_manifest, write_json, write_manifest
from tasks.caching import Stage
from tasks.progress import artifact_key, progress_bar

EVAL = Stage("eval", inputs=("checkpoint", "data_dir"))
SAMPLE = Stage("sample", inputs=("checkpoint", "data_dir"))


@EVAL.task()
def evaluate(checkpoint: str, data_dir: str, batch_size: int, seq_len: int, run_dir: str,
             max_batches: int | None = None) -> dict:
    """Held-out loss and perplexity of `checkpoint` on the val split of `data_dir`."""
    out = EVAL.dir(locals())
    if not EVAL.done(out):
        with progress_bar(1, f"eval {Path(checkpoint).parent.name} on {Path(data_dir).name}", "batch") as bar:
            metrics = loss_ppl(checkpoint, data_dir, "val", batch_size, seq_len, max_batches, on_progress=bar)
        with atomic_dir(out) as tmp:
            write_json(tmp / "metrics.json", metrics)
            write_manifest(tmp, "eval", metrics)
        create_table_artifact(
            table=[{"checkpoint": checkpoint, "data": Path(data_dir).name, "split": "val", "tokens": metrics["tokens"],
                    "loss": round(metrics["loss"], 4), "ppl": round(metrics["ppl"], 3),
                    "uniform_loss": round(metrics["uniform_loss"], 4)}],
            key=artifact_key(Path(run_dir).name, "eval", metrics["task"]),
            description=f"Held-out loss and perplexity ({metrics['task']} data)")
    return {"path": str(out), "checkpoint": checkpoint, **read_manifest(out)["config"]}


@SAMPLE.task()
def sample(checkpoint: str, data_dir: str, config: SampleConfig, run_dir: str) -> dict:
    """Generate replies to held-out SFT prompts and compare them with the reference answers."""
    out = SAMPLE.dir(locals())
    if not SAMPLE.done(out):
        rows = sample_split(checkpoint, data_dir, config.num_prompts,
                              config.max_tokens, config.temperature, config.top_p)
        with atomic_dir(out) as tmp:
            write_json(tmp / "samples.json", rows)
            write_manifest(tmp, "samples", config.model_dump())
        create_table_artifact(table=rows, key=artifact_key(Path(run_dir).name, "samples"),
                              description="Generations on held-out prompts")
    rows = json.loads((out / "samples.json").read_text())
    return {"path": str(out), "samples": rows, "exact_match": sum(r["correct"] for r in rows) / max(len(rows), 1)}
