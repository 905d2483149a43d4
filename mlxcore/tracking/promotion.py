"""Champion / challenger: does a new model (an RL iteration's policy, a distill run's student) replace
the run's published one (`<run>/model`, the champion)?

Both answered the same questions; `outcomes` are per question: {"metric", "values": {id: score},
"suites": {id: suite}} (bench: 1/0 per question, its suite; held-out eval: each prompt's accuracy or
reward, one suite "held-out"). The rule, on the questions both answered:

- better: the lower end of the `confidence` paired bootstrap interval of mean(challenger - champion)
  is above 0;
- no suite regresses: no suite's mean difference is below -`tolerance`;
- promoted = better and no suite regresses. The first model of a run with no champion is promoted.

Every decision is kept in `<run>/promotion.json` ({"champion": {...}, "history": [...]}); a decision
for an iteration already there is returned as it was (a re-run after a crash decides nothing twice).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mlxcore.bench.compare import paired_bootstrap
from mlxcore.io import write_json

FILE = "promotion.json"
log = logging.getLogger(__name__)


def bench_outcomes(rows: list[dict]) -> dict:
    """Outcomes from a bench target's answer rows (answers.jsonl)."""
    return {"metric": "bench", "values": {r["id"]: float(bool(r["correct"])) for r in rows},
            "suites": {r["id"]: r["suite"] for r in rows}}


def eval_outcomes(per_prompt: list[dict]) -> dict:
    """Outcomes from held-out eval rows ({"id", "reward", "correct"}): accuracy where every row has it, else reward."""
    use_acc = bool(per_prompt) and all(p.get("correct") is not None for p in per_prompt)
    key = "correct" if use_acc else "reward"
    return {"metric": "eval_accuracy" if use_acc else "eval_reward",
            "values": {p["id"]: float(p[key] or 0.0) for p in per_prompt}, "suites": {p["id"]: "held-out" for p in per_prompt}}


def score(outcomes: dict) -> float | None:
    values = list(outcomes["values"].values())
    return sum(values) / len(values) if values else None


def decide(champion: dict | None, challenger: dict, confidence: float = 0.95, tolerance: float = 0.02,
           resamples: int = 10_000, seed: int = 0) -> dict:
    """Is `challenger` (outcomes) better than `champion` (outcomes, or None: none yet)? See the module doc."""
    out = {"metric": challenger["metric"], "score": score(challenger), "champion_score": None, "delta": None,
           "low": None, "high": None, "confidence": confidence, "suites": {}, "worse": False}
    if champion is None:
        return out | {"promoted": True, "reason": "no champion yet: the first model is the champion"}
    if champion["metric"] != challenger["metric"]:
        return out | {"promoted": False, "reason": f"the champion was scored by {champion['metric']}, this model by "
                                                    f"{challenger['metric']}: not comparable"}
    common = sorted(set(champion["values"]) & set(challenger["values"]))
    if not common:
        return out | {"promoted": False, "reason": "no question answered by both the champion and this model"}
    a, b = [champion["values"][q] for q in common], [challenger["values"][q] for q in common]
    overall = paired_bootstrap(a, b, confidence, resamples, seed)
    by_suite: dict[str, list[str]] = {}
    for q in common:
        by_suite.setdefault(challenger["suites"].get(q, "all"), []).append(q)
    suites = {}
    for name, ids in sorted(by_suite.items()):
        s = paired_bootstrap([champion["values"][q] for q in ids], [challenger["values"][q] for q in ids],
                             confidence, resamples, seed)
        suites[name] = {k: s[k] for k in ("n", "base", "new", "delta", "low", "high")}
    regressed = {n: s["delta"] for n, s in suites.items() if s["delta"] < -tolerance}
    better = overall["low"] > 0
    interval = f"{overall['delta']:+.3f} [{overall['low']:+.3f}, {overall['high']:+.3f}] at {confidence:.0%}"
    if better:
        reason = f"better: {interval}"
    else:
        reason = f"not better: {interval} includes 0" if overall["high"] >= 0 else f"worse: {interval}"
    if regressed:
        reason += "; " + ("but " if better else "") + "; ".join(
            f"suite {n} lost {-d:.3f} > tolerance {tolerance}" for n, d in regressed.items())
    return out | {"champion_score": overall["base"], "score": overall["new"], "delta": overall["delta"],
                  "low": overall["low"], "high": overall["high"], "n": overall["n"], "suites": suites,
                  "promoted": better and not regressed, "reason": reason,
                  # significantly worse, or a suite past the tolerance: RL's next iteration rolls back
                  "worse": bool(regressed) or overall["high"] < 0}


class Promotion:
    """`<run>/promotion.json`: the champion (its model, outcomes, registry version) and every decision."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILE
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.champion: dict | None = data.get("champion")
        self.history: list[dict] = data.get("history", [])

    def decided(self, key) -> dict | None:
        return next((h for h in self.history if h["key"] == key), None)

    def record(self, key, checkpoint: str, decision: dict, outcomes: dict, extra: dict | None = None) -> dict:
        """Keep `decision` for `key` (an iteration number, a model dir); a promoted one becomes the champion."""
        entry = {"key": key, "checkpoint": checkpoint, **{k: v for k, v in decision.items()}, **(extra or {}),
                 "champion_before": (self.champion or {}).get("key")}
        self.history = [h for h in self.history if h["key"] != key] + [entry]
        if decision["promoted"]:
            self.champion = {"key": key, "checkpoint": checkpoint, "outcomes": outcomes, "score": decision["score"],
                             **(extra or {})}
        self.save()
        return entry

    def set_champion_field(self, **fields) -> None:
        self.champion = (self.champion or {}) | fields
        self.history[-1] |= fields
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"champion": self.champion, "history": self.history})

    def table(self) -> list[dict]:
        """The history as table rows."""
        def num(v):
            return None if v is None else round(v, 4)

        return [{"model": h["key"], "metric": h["metric"], "score": num(h["score"]),
                 "champion score": num(h["champion_score"]), "delta": num(h["delta"]),
                 "interval": None if h["low"] is None else f"[{h['low']:+.3f}, {h['high']:+.3f}]",
                 "promoted": h["promoted"], "why": h["reason"]} for h in self.history]


def markdown(rows: list[dict]) -> str:
    cols = ["model", "metric", "score", "champion score", "delta", "interval", "promoted", "why"]
    fmt = lambda v: "–" if v is None else ("yes" if v is True else "no" if v is False else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def register(model_dir: str, name: str, uri: str | None, tags: dict | None = None) -> dict | None:
    """Register `model_dir` as a new version of `name` in the MLflow model registry at `uri` (or
    $MLFLOW_TRACKING_URI) and point the alias `champion` at it. The server registers only what its
    artifact store holds, so the model dir is uploaded first, as the artifact `model` of a run
    `promote <name> <key>` in the experiment `<name>-promotion`. None without a URI; a registry that
    fails is logged and reported ({"error": ...}), never raised: the promotion on disk stands."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise
        tags = {k: str(v) for k, v in (tags or {}).items()}
        experiment = client.get_experiment_by_name(f"{name}-promotion")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"{name}-promotion")
        run = client.create_run(experiment_id, run_name=f"promote {name} {tags.get('key', '')}".strip(),
                                tags={**tags, "local_path": str(Path(model_dir).resolve())})
        client.log_artifacts(run.info.run_id, str(model_dir), "model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                              tags={**tags, "local_path": str(Path(model_dir).resolve())})
        client.set_registered_model_alias(name, "champion", version.version)
        return {"uri": uri, "model": name, "version": int(version.version), "alias": "champion",
                "run_id": run.info.run_id}
    except Exception as e:  # noqa: BLE001 - a registry outage never undoes the promotion
        log.warning("MLflow registry at %s: could not register %s: %s", uri, model_dir, e)
        return {"uri": uri, "model": name, "error": str(e)}
