"""Model cards: a README.md with Hugging Face front matter in every final checkpoint dir.

`write_card(model_dir, results=None)` reads what the dir says about itself - its manifest's
`sources`, `licenses` and `base_model` (see `mlxcore.lineage`), the training config in
`trainer_state.json`, an adapter's base model - and writes README.md through huggingface_hub's
`ModelCard` / `ModelCardData`:

    ---
    license: other                 # the inputs' one license; `other` (+ license_name) when they differ
    license_name: mixed-data-licenses
    datasets: [openai/gsm8k, tatsu-lab/alpaca]      # the hub datasets it was trained on
    base_model: Qwen/Qwen3-0.6B    # when the base is a hub model (a local base is named in the body)
    tags: [mlx, mlxflow, sft]
    library_name: mlx
    ---
    # <name>
    sources (license, revision), combined terms ("contains CC BY-NC 4.0 data: non-commercial use
    only"), the training config, and held-out eval / bench results when given.

Training writes a first card when it publishes the final model (`checkpoint.finalize`); a flow
rewrites it once its eval and bench results exist. README.md is written after the dir's manifest
and is not listed in it: it documents the dir and never changes its digest, so rewriting it
invalidates no cache. Exports carry a copy (`export_card`: library_name gguf, or mlx for MLX
quantizations), so a pushed repo has its card too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlxcore import lineage
from mlxcore.io import MANIFEST, write_text

README = "README.md"
MIXED = "mixed-data-licenses"
_TRAIN_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "weight_decay", "fine_tune_type", "optimizer",
               "grad_accum", "seed")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _hub_id(name: str | None) -> str | None:
    """A base model's hub id, for the card's `base_model:` (the hub rejects local paths there)."""
    if not name:
        return None
    if name.startswith((os.sep, ".")) or Path(name).exists():
        return lineage._hub_id(Path(name))
    return name if lineage.HUB_ID.fullmatch(name) else None


def card_data(model_dir: str | Path, extra: dict | None = None):
    """(ModelCardData, lineage, base model) for a model dir, from its manifest and state files."""
    from huggingface_hub import ModelCardData

    d = Path(model_dir)
    manifest = _json(d / MANIFEST)
    lin = lineage.merge(manifest if manifest.get("sources") is not None else None, extra)
    adapter = _json(d / "adapter_config.json")
    base = manifest.get("base_model") or (extra or {}).get("base_model") or adapter.get("base_model")
    licenses = lin["licenses"] or [lineage.UNKNOWN]
    license_id = lineage.combined_license(licenses)
    datasets = sorted({s["repo"] for s in lin["sources"] if s.get("kind") == "dataset" and s.get("repo")})
    tags = ["mlx", "mlxflow"] + (["lora"] if adapter else []) + (["non-commercial"] if lineage.non_commercial(licenses) else [])
    kw: dict[str, Any] = {"license": license_id, "library_name": "mlx", "tags": tags}
    if license_id == "other":
        kw["license_name"] = MIXED
    if datasets:
        kw["datasets"] = datasets
    if _hub_id(base):
        kw["base_model"] = _hub_id(base)
    return ModelCardData(**kw), lin, base


def _table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_EVAL_KEYS = ("loss", "ppl", "uniform_loss", "accuracy", "margin", "kl", "abs_error", "tokens", "examples")


def _results(results: dict) -> list[str]:
    lines = []
    evals = {k: v for k, v in (results.get("eval") or {}).items() if isinstance(v, dict)}
    keys = [k for k in _EVAL_KEYS if any(isinstance(v.get(k), (int, float)) for v in evals.values())]
    if evals and keys:
        lines += ["## Held-out evaluation", "",
                  _table([[k, *(_fmt(v.get(m)) if v.get(m) is not None else "" for m in keys)] for k, v in evals.items()],
                         ["model", *keys]), ""]
    bench = results.get("bench") or {}
    if bench.get("accuracy"):
        targets = list(bench.get("overall") or {})
        rows = [[suite] + [_fmt(acc.get(t)) for t in targets] for suite, acc in bench["accuracy"].items()]
        rows.append(["overall"] + [_fmt(bench["overall"][t].get("accuracy")) for t in targets])
        lines += ["## Bench (accuracy per suite)", "", _table(rows, ["suite", *targets]), ""]
    other = {k: v for k, v in results.items() if k not in ("eval", "bench") and isinstance(v, (int, float, str))}
    if other:
        lines += ["## Other results", "", _table([[k, _fmt(v)] for k, v in other.items()], ["metric", "value"]), ""]
    return lines


def render(model_dir: str | Path, results: dict | None = None, title: str | None = None,
           lineage_extra: dict | None = None) -> str:
    """The card's text (front matter + body) for `model_dir`."""
    from huggingface_hub import ModelCard

    d = Path(model_dir)
    data, lin, base = card_data(d, lineage_extra)
    state = _json(d / "trainer_state.json")
    train = state.get("train_config") or {}
    licenses = lin["licenses"] or [lineage.UNKNOWN]
    name = title or d.parent.name or d.name
    body = [f"# {name}", "", "Trained with mlxflow on MLX; `mlx_lm.load` opens this directory (Hugging Face layout).", ""]
    if base:
        body += [f"Base model: `{base}`" + ("" if data.base_model else " (a local model dir)"), ""]
    body += ["## Terms of the training data", ""]
    if lineage.non_commercial(licenses):
        nc = ", ".join(lineage.pretty(x) for x in sorted(licenses) if x.startswith("cc-by-nc"))
        body += [f"**Contains {nc} data: non-commercial use only.**", ""]
    body += [f"- {t}" for t in lineage.terms(licenses)]
    body += [f"- {s['name']}: {s['terms']}" for s in lin["sources"] if s.get("terms")] + [""]
    body += ["The license above is the data's; a model trained on it is not automatically under the same terms, "
             "but the data's terms may restrict how the model may be used or shared: check them.", ""]
    if lin["sources"]:
        rows = [[s.get("name"), s.get("kind"), s.get("license"), s.get("repo") or s.get("url") or "",
                 (s.get("revision") or "")[:12], s.get("spec") or s.get("note") or ""] for s in lin["sources"]]
        body += ["## Sources", "", _table(rows, ["source", "kind", "license", "repo", "revision", "spec"]), ""]
    if train:
        rows = [[k, _fmt(train[k])] for k in _TRAIN_KEYS if k in train]
        body += ["## Training", "", _table(rows + [["steps done", state.get("step")], ["tokens", state.get("tokens")]],
                                            ["setting", "value"]), ""]
    body += _results(results or {})
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"))


def write_card(model_dir: str | Path, results: dict | None = None, title: str | None = None,
               lineage_extra: dict | None = None) -> Path:
    """Write (or rewrite) `model_dir`/README.md atomically; its path."""
    path = Path(model_dir) / README
    write_text(path, render(model_dir, results, title, lineage_extra))
    return path


def export_card(model_dir: str | Path, out_dir: str | Path, library_name: str, tags: list[str] = ()) -> Path | None:
    """A copy of `model_dir`'s card for an export of it (another library_name, more tags); None without one."""
    from huggingface_hub import ModelCard

    src = Path(model_dir) / README
    if not src.is_file():
        return None
    card = ModelCard.load(src)
    card.data.library_name = library_name
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    path = Path(out_dir) / README
    write_text(path, str(card))
    return path
