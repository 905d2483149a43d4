"""Runs side by side: overlaid loss curves, bench suites with deltas and paired bootstrap confidence
intervals, and the config keys that differ.

The runs are run records (mlxcore/tracking/runrecord.py): a run dir (its latest run) or a record file. The
first run is the baseline: every delta is `run - first` on the bench questions both answered (the
same ids), and its interval is a paired bootstrap (scipy.stats.bootstrap, percentile method, seeded)
of the mean per-question difference.

Outputs in `out`: compare.json, compare.md and loss-curves.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mlxcore.tracking import runrecord
from mlxcore.io import write_json

PNG = "loss-curves.png"
ABSENT = "<absent>"


class CompareError(ValueError):
    """Runs that cannot be compared (not run dirs, no common bench questions)."""


def paired_bootstrap(base: Sequence[float], new: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> dict:
    """The mean of `new - base` (paired: item i of both is the same question) and its `confidence`
    interval from `resamples` bootstrap resamples of the items (percentile method, seeded)."""
    from scipy.stats import bootstrap

    a, b = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need the same questions: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("no common questions to compare")
    diff = b - a
    if a.size == 1 or np.all(diff == diff[0]):  # no spread: every resample gives the same mean
        low = high = float(diff[0])
    else:
        ci = bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": int(a.size), "base": float(a.mean()), "new": float(b.mean()), "delta": float(diff.mean()),
            "low": low, "high": high, "confidence": confidence, "resamples": resamples}


def flatten(value, prefix: str = "") -> dict[str, object]:
    """A nested config dump as {dotted key: leaf}; lists are leaves."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def config_diff(configs: Sequence[dict]) -> dict[str, list]:
    """Only the keys whose values differ between the configs: {dotted key: [value per config]}."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k, ABSENT) for f in flat] for k in keys if len({json.dumps(f.get(k, ABSENT), sort_keys=True, default=str)
                                                                      for f in flat}) > 1}


def loss_history(model_dir: str | Path) -> dict[str, list[list[float]]]:
    """A training stage's (step, train loss) and (step, held-out loss) points from its trainer_state.json."""
    state = Path(model_dir) / "trainer_state.json"
    if not state.is_file():
        return {"train": [], "val": []}
    hist = json.loads(state.read_text()).get("history", [])
    return {"train": [[h["step"], h["loss"]] for h in hist if h.get("event") == "train" and h.get("loss") is not None],
            "val": [[h["step"], h["val_loss"]] for h in hist if h.get("event") == "eval" and h.get("val_loss") is not None]}


def bench_outcomes(record: dict) -> dict[str, dict] | None:
    """The run's own model's bench answers: {question id: {"suite", "correct"}}; None without a bench."""
    bench = record.get("bench")
    if not bench:
        return None
    answers = (bench.get("answers") or {}).get(bench.get("target"))
    file = Path(answers or "") / "answers.jsonl"
    if not answers or not file.is_file():
        raise CompareError(f"{record['source']}: the bench answers of {bench.get('target')!r} are gone ({file})")
    with open(file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["id"]: {"suite": r["suite"], "correct": bool(r["correct"])} for r in rows}


def bench_deltas(outcomes: Sequence[dict], labels: Sequence[str], confidence: float, resamples: int,
                 seed: int) -> dict:
    """Per suite and overall: each run's accuracy on the questions it shares with the first, and the
    delta vs the first with its paired bootstrap interval."""
    first = outcomes[0]
    out: dict = {"baseline": labels[0], "suites": {}, "overall": {}}
    for label, other in zip(labels[1:], outcomes[1:]):
        common = sorted(set(first) & set(other))
        if not common:
            raise CompareError(f"{labels[0]} and {label} have no bench question in common (different bench "
                               "suites, examples or seed): nothing to pair")
        groups: dict[str, list[str]] = {}
        for q in common:
            groups.setdefault(first[q]["suite"], []).append(q)
        for name, ids in [*sorted(groups.items()), ("overall", common)]:
            stats = paired_bootstrap([first[q]["correct"] for q in ids], [other[q]["correct"] for q in ids],
                                     confidence, resamples, seed)
            target = out["overall"] if name == "overall" else out["suites"].setdefault(name, {})
            target[label] = stats
    return out


def compare(paths: Sequence[str | Path], out: str | Path, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> dict:
    """Compare the runs `paths` name (first = baseline); write compare.json, compare.md, loss-curves.png to `out`."""
    from mlxcore.bench.plots import panels

    if len(paths) < 2:
        raise CompareError("compare needs at least two runs")
    records = []
    for p in paths:
        try:
            records.append(runrecord.load(p))
        except runrecord.RunRecordError as e:
            raise CompareError(str(e)) from e
    labels = [f"{chr(65 + i) if i < 26 else i + 1} {r['name']}" for i, r in enumerate(records)]
    stages = list(dict.fromkeys(s for r in records for s in r["stages"]))
    curves = {s: {lab: loss_history(r["stages"][s]) for lab, r in zip(labels, records) if s in r["stages"]}
              for s in stages}
    outcomes = [bench_outcomes(r) for r in records]
    with_bench = [(lab, o) for lab, o in zip(labels, outcomes) if o is not None]
    bench = None
    if len(with_bench) >= 2:
        bench = bench_deltas([o for _, o in with_bench], [lab for lab, _ in with_bench], confidence, resamples, seed)
    result = {"runs": [{"label": lab, "source": r["source"], "flow": r["flow"], "name": r["name"],
                        "flow_run_id": r.get("flow_run_id"), "created_at": r.get("created_at"), "model": r.get("model"),
                        "bench": bool(r.get("bench"))} for lab, r in zip(labels, records)],
              "config_diff": config_diff([r["config"] for r in records]), "curves": curves, "bench": bench,
              "image": PNG}
    png = panels({s: {f"{lab} {kind}": pts for lab, c in per.items() for kind, pts in
                      (("train", c["train"]), ("held-out", c["val"]))} for s, per in curves.items()},
                 ylabel="loss", dashed=" held-out")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PNG).write_bytes(png)
    write_json(out / "compare.json", result)
    (out / "compare.md").write_text(markdown(result, image=PNG))
    return result | {"out": str(out), "png": png}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def bench_rows(bench: dict | None) -> list[dict]:
    """The bench as table rows: suite, each run's accuracy, each later run's delta and interval."""
    if not bench:
        return []
    rows = []
    for name, per in [*bench["suites"].items(), ("overall", bench["overall"])]:
        first = next(iter(per.values()))
        row = {"suite": name, f"{bench['baseline']}": round(first["base"], 4)}
        for label, s in per.items():
            row[label] = round(s["new"], 4)
            row[f"{label} delta"] = round(s["delta"], 4)
            row[f"{label} {s['confidence']:.0%} CI"] = f"[{s['low']:+.3f}, {s['high']:+.3f}]"
            row[f"{label} n"] = s["n"]
        rows.append(row)
    return rows


def config_rows(diff: dict[str, list], labels: Sequence[str]) -> list[dict]:
    return [{"key": k, **{lab: _fmt(v) for lab, v in zip(labels, vals)}} for k, vals in diff.items()]


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows])


def markdown(result: dict, image: str | None = None) -> str:
    """compare.md; `image`: the PNG's link (a file name, or a data URI for the Prefect UI)."""
    labels = [r["label"] for r in result["runs"]]
    lines = ["### compare", "", _table([{"run": r["label"], "flow": r["flow"], "created": r["created_at"],
                                         "source": r["source"]} for r in result["runs"]]), "",
             "#### config differences", ""]
    diff = config_rows(result["config_diff"], labels)
    lines += [_table(diff) if diff else "(none: the resolved configs are the same)", "", "#### loss curves", ""]
    if image:
        lines += [f"![loss curves]({image})", ""]
    lines += ["#### bench (delta vs the first run on the questions both answered; paired bootstrap interval)", ""]
    rows = bench_rows(result["bench"])
    lines += [_table(rows) if rows else "(fewer than two runs have a bench)", ""]
    return "\n".join(lines)
