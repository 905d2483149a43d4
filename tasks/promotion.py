"""Champion / challenger promotion (mlxcore/tracking/promotion.py) as a Prefect task: decide, record in
`<run>/promotion.json`, move `<run>/model` to the champion, publish the history table, and (with an
MLflow tracking URI) register the champion's version with the alias `champion`."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mlxcore.tracking import promotion
from mlxcore.config import PromotionConfig
from mlxcore.io import link
from tasks.progress import artifact_key


def metric_of(cfg: PromotionConfig, has_bench: bool) -> str:
    if cfg.metric == "bench" and not has_bench:
        raise ValueError("promotion.metric is bench but the config has no `bench:` section")
    return "bench" if cfg.metric == "bench" or (cfg.metric == "auto" and has_bench) else "eval"


def bench_outcomes(bench: dict, label: str) -> dict:
    """Per-question outcomes of target `label` in run_bench's result (its answers dir)."""
    with open(Path(bench["answers"][label]) / "answers.jsonl") as f:
        return promotion.bench_outcomes([json.loads(line) for line in f if line.strip()])


@task(name="promote")
def promote(run_dir: str, key, checkpoint: str, outcomes: dict, cfg: PromotionConfig, name: str,
            extra: dict | None = None) -> dict:
    """Is the model `checkpoint` (called `key`: an iteration, a run) better than the champion? Its
    history entry, with `champion`: the champion's checkpoint afterwards (now `<run>/model`)."""
    book = promotion.Promotion(run_dir)
    entry = book.decided(key)
    if entry is None:
        champion = book.champion["outcomes"] if book.champion else None
        decision = promotion.decide(champion, outcomes, cfg.confidence, cfg.tolerance, cfg.resamples)
        entry = book.record(key, checkpoint, decision, outcomes, extra)
        if entry["promoted"]:
            registry = promotion.register(checkpoint, cfg.registry_model or name, cfg.registry_uri,
                                          tags={"run": name, "key": key, "metric": entry["metric"],
                                                "score": entry["score"]})
            if registry is not None:
                book.set_champion_field(registry=registry)
                entry = book.history[-1]
        get_run_logger().info("promotion of %s: %s (%s)", key, "promoted" if entry["promoted"] else "kept, not promoted",
                              entry["reason"])
    if book.champion is not None:
        link(book.champion["checkpoint"], Path(run_dir) / "model")
    rows = book.table()
    run = Path(run_dir).name
    create_table_artifact(table=rows, key=artifact_key(run, "promotion"),
                          description=f"Champion / challenger: every model, its score vs the champion's, the paired "
                                      f"bootstrap interval ({cfg.confidence:.0%}), promoted or not and why")
    champ = book.champion or {}
    create_markdown_artifact(key=artifact_key(run, "promotion-history"), markdown=(
        f"### champion / challenger\n\nchampion: **{champ.get('key')}** ({champ.get('checkpoint')}), "
        f"score {champ.get('score')}\n\n{promotion.markdown(rows)}\n"))
    return entry | {"champion": champ.get("checkpoint"), "champion_key": champ.get("key")}
