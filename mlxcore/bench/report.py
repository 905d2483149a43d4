"""Side-by-side bench report: accuracy, invalid rate, tok/s and ms/example per target, overall,
per suite and per category, as JSON and as tables (Prefect table artifacts, markdown)."""

from __future__ import annotations

from collections import defaultdict


def summarize(rows: list[dict]) -> dict:
    """Accuracy, invalid rate, generated tok/s and ms/example of a group of answers."""
    n = len(rows)
    ms = sum(r["ms"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"n": n, "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
            "invalid_rate": sum(not r["valid"] for r in rows) / max(n, 1),
            "tok_per_s": tokens / (ms / 1000) if tokens and ms > 0 else None,
            "ms_per_example": ms / max(n, 1)}


def report(answers: dict[str, list[dict]]) -> dict:
    """`answers`: target label -> its rows (all targets answered the same questions)."""
    suites, categories = {}, {}
    for label, rows in answers.items():
        by_suite, by_category = defaultdict(list), defaultdict(list)
        for r in rows:
            by_suite[r["suite"]].append(r)
            by_category[f"{r['suite']}/{r['category']}"].append(r)
        for name, group in by_suite.items():
            suites.setdefault(name, {})[label] = summarize(group)
        for name, group in sorted(by_category.items()):
            categories.setdefault(name, {})[label] = summarize(group)
    return {"targets": list(answers), "overall": {label: summarize(rows) for label, rows in answers.items()},
            "suites": suites, "categories": categories}


def _num(value: float | None, digits: int = 3):
    return None if value is None else round(value, digits)


def tables(rep: dict) -> dict[str, list[dict]]:
    """The report as three tables: targets (overall), suites and categories side by side."""
    targets = rep["targets"]
    overall = [{"target": t, "accuracy": _num(s["accuracy"]), "invalid": _num(s["invalid_rate"]),
                "tok_per_s": _num(s["tok_per_s"], 1), "ms_per_example": _num(s["ms_per_example"], 1), "n": s["n"]}
               for t, s in rep["overall"].items()]

    def side_by_side(section: str, key: str) -> list[dict]:
        out = []
        for name, per_target in rep[section].items():
            row = {key: name, "n": next(iter(per_target.values()))["n"]}
            for t in targets:
                s = per_target.get(t)
                row[f"{t} accuracy"] = _num(s["accuracy"]) if s else None
                row[f"{t} invalid"] = _num(s["invalid_rate"]) if s else None
            out.append(row)
        return out

    return {"overall": overall, "suites": side_by_side("suites", "suite"),
            "categories": side_by_side("categories", "category")}


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(rep: dict, title: str = "bench") -> str:
    t = tables(rep)
    return "\n\n".join([f"### {title}", _md_table(t["overall"]), "#### per suite", _md_table(t["suites"]),
                        "#### per category", _md_table(t["categories"])]) + "\n"
