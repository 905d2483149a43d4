"""The run report card: one markdown page per flow run (nanochat's report card, for every flow).

`render(card)` is a pure function of a dict of records (tasks/report.py builds it from a flow run):

    {"title": "smoke", "flow": "pipeline", "status": "Completed", "seconds": 61.2,
     "tasks":    [{"name": "pretrain", "state": "Completed" | "Cached" | "Failed", "seconds": 12.3}, ...],
     "training": [{"stage": "pretrain", "cached": False, "steps": 30, "train_loss": 3.1, "val_loss": 3.0,
                   "initial_val_loss": 6.2, "tok_per_s": 5400.0, "rows": [{"step", "event", "loss", ...}]}],
     "eval":     {"pretrain": {"loss": 3.0, "ppl": 20.1, ...}, ...},
     "bench":    "<the bench report's markdown>" | None,
     "parity":   {"q8_0": {"passed": True, "reasons": []}},
     "promotion": {"promoted": False, "reason": "not better: ...", "score": 0.4, "champion_score": 0.42, ...},
     "model_card": {"path": ".../README.md", "license": "mit", "terms": ["..."], "sources": "<markdown table>"},
     "trackers": {"mlflow": {"summary": "...", "lost": {"metric points": 3}, "run": {...}}},
     "error": "..." | None}

Missing sections are left out. Loss curves are PNGs embedded as data-URI images (the Prefect UI,
GitHub and Jupyter render them with no external host).
"""

from __future__ import annotations

import re
from typing import Any

from mlxcore.bench.plots import loss_curve, markdown_image


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_num(c) for c in r) + " |" for r in rows), ""]


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def curve_points(rows: list[dict]) -> tuple[list, list]:
    """(train, held-out) loss points of a stage's metric rows."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("event", "train") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    return train, val


def stage_curve(stage: dict, title: str) -> bytes | None:
    train, val = curve_points(stage.get("rows") or [])
    return loss_curve(train, val, title) if train or val else None


def _nest(md: str, top: int = 3, drop: str = "per category") -> str:
    """Another report nested under ours: its top heading at level `top`, its `drop` section (and
    the ones below it, the long tail) left out."""
    levels = [len(m) for m in re.findall(r"^(#{1,6}) ", md, flags=re.M)]
    if not levels:
        return md
    cut = re.search(rf"^#{{1,6}} .*{re.escape(drop)}", md, flags=re.M | re.I) if drop else None
    if cut:
        md = md[:cut.start()].rstrip() + "\n"
    shift = top - min(levels)
    return re.sub(r"^(#{1,6}) ", lambda m: "#" * max(1, min(len(m.group(1)) + shift, 6)) + " ", md, flags=re.M)


def render(card: dict) -> str:
    title = card.get("title", "run")
    out = [f"# Report card: {title}", ""]
    head = [f"flow **{card.get('flow', '?')}**", f"status **{card.get('status', '?')}**"]
    if card.get("seconds") is not None:
        head.append(f"wall time {_seconds(card['seconds'])}")
    if card.get("run_dir"):
        head.append(f"run dir `{card['run_dir']}`")
    out += [" · ".join(head), ""]
    if card.get("error"):
        out += [f"**Failed:** {card['error']}", ""]

    tasks = card.get("tasks") or []
    if tasks:
        hits = sum(t["state"] == "Cached" for t in tasks)
        out += ["## Stages", "", f"{len(tasks)} task runs, {hits} cache hits.", ""]
        out += _table(["stage", "state", "cache hit", "wall time"],
                      [[t["name"], t["state"], t["state"] == "Cached", _seconds(t.get("seconds"))] for t in tasks])

    training = card.get("training") or []
    if training:
        out += ["## Training", ""]
        out += _table(["stage", "steps", "final train loss", "held-out loss (start → end)", "tok/s", "source"],
                      [[s["stage"], s.get("steps"), s.get("train_loss"),
                        f"{_num(s.get('initial_val_loss'))} → {_num(s.get('val_loss'))}", s.get("tok_per_s"),
                        "cached (curve from the run that trained it)" if s.get("cached") else "trained in this run"]
                       for s in training])
        for s in training:
            png = stage_curve(s, f"{title} {s['stage']}")
            if png is not None:
                out += [f"### {s['stage']} loss", "", markdown_image(png, f"{s['stage']} loss curve"), ""]

    evals = card.get("eval") or {}
    if evals:
        keys = list(dict.fromkeys(k for v in evals.values() if isinstance(v, dict) for k, x in v.items()
                                  if isinstance(x, (int, float)) and not isinstance(x, bool)))
        out += ["## Evaluation (held out)", ""]
        out += _table(["model", *keys], [[label, *(v.get(k) for k in keys)] for label, v in evals.items()
                                         if isinstance(v, dict)])

    if card.get("bench"):
        out += ["## Bench", "", _nest(card["bench"].strip()), ""]

    parity = card.get("parity") or {}
    if parity:
        out += ["## Export parity gate", ""]
        out += _table(["export", "result", "why"], [[q, "passed" if g.get("passed") else "FAILED",
                                                      "; ".join(g.get("reasons") or []) or "—"]
                                                     for q, g in parity.items()])

    promo = card.get("promotion")
    if promo:  # champion / challenger (mlxcore.tracking.promotion): moved runs/<name>/model or not, and why
        out += ["## Champion / challenger", "",
                f"**{'promoted' if promo.get('promoted') else 'not promoted'}**: {promo.get('reason') or '—'}", ""]
        out += _table(["metric", "this model", "champion", "difference", "interval"],
                      [[promo.get("metric"), promo.get("score"), promo.get("champion_score"), promo.get("delta"),
                        f"[{_num(promo.get('low'))}, {_num(promo.get('high'))}] at {_num(promo.get('confidence'))}"]])

    mc = card.get("model_card")
    if mc:
        out += ["## Model card: data and licence", "", f"Licence: **{mc.get('license') or 'unknown'}**"
                + (f" · card `{mc['path']}`" if mc.get("path") else ""), ""]
        out += [f"- {t}" for t in mc.get("terms") or []] + [""]
        if mc.get("sources"):
            out += [mc["sources"].strip(), ""]

    trackers = card.get("trackers") or {}
    if trackers:
        out += ["## Experiment trackers", ""]
        for name, t in trackers.items():
            lost = {k: n for k, n in (t.get("lost") or {}).items() if n}
            line = (f"- **{name}**: " + ", ".join(f"{n} {k} not delivered to {name}" for k, n in lost.items())
                    if lost else f"- **{name}**: everything delivered")
            run = t.get("run") or {}
            if run:
                line += " (" + ", ".join(f"{k} `{v}`" for k, v in run.items()) + ")"
            out.append(line)
            if lost and t.get("errors"):
                out.append(f"  - first error: {t['errors'][0]}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def card_summary(text: str) -> dict:
    """A model card's licence, its terms-of-data bullets and its sources table (mlxcore.models.card writes them)."""
    license_ = re.search(r"^license:\s*(\S+)", text, flags=re.M)
    name = re.search(r"^license_name:\s*(\S+)", text, flags=re.M)

    def section(title: str) -> str:
        m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
        return m.group(1).strip() if m else ""

    terms = [line[2:] for line in section("Terms of the training data").splitlines() if line.startswith("- ")]
    return {"license": (license_.group(1) if license_ else None) if not name else f"{license_.group(1)} ({name.group(1)})",
            "terms": terms, "sources": section("Sources")}
