"""Where a stage's data files are: a synthetic raw dataset dir, or {split: [files | download dirs]}.

Shared by the tokenizer (which trains on the train files) and pretokenize (which reads them all).
A weighted mixture's inputs are {"sources": [{split: [...]}, ...]}, one entry per source, with the
sources' names, weights and own format options in the format options' "sources" (`source_parts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxcore.data import download, records
from mlxcore.data.download import data_files
from mlxcore.data.records import DataError
from mlxcore.io import read_manifest

SPLITS = ("train", "val")


def resolve_inputs(inputs: Any, kind: str) -> dict[str, list[Path]]:
    """{split: [data files]} from a synthetic raw dir, or from {split: [files | download dirs]}."""
    if isinstance(inputs, (str, Path)):
        raw = Path(inputs)
        read_manifest(raw, "raw-dataset")
        files = {split: [raw / kind / f"{split}.jsonl"] for split in SPLITS}
        for split, paths in files.items():
            if not paths[0].is_file():
                raise DataError(f"{paths[0]}: missing (the raw dataset has no {kind} {split} split)")
        return files
    out = {}
    for split in SPLITS:
        paths = []
        for p in inputs.get(split) or []:
            p = Path(p)
            if p.is_dir():
                paths += data_files(p)
            else:
                paths.append(p)
        out[split] = paths
    if not out["train"] and not out["val"]:  # val alone: data to evaluate on (the eval flow)
        raise DataError(f"no {kind} training files given")
    for p in out["train"] + out["val"]:
        if not p.is_file():
            raise DataError(f"{p}: no such data file")
    return out


def is_mixture(inputs: Any) -> bool:
    """Inputs of a weighted mixture: {"sources": [{split: [...]}, ...]} (see `source_parts`)."""
    return isinstance(inputs, dict) and "sources" in inputs


def source_parts(inputs: Any, opts: dict | None) -> list[dict]:
    """One kind's sources as [{"name", "inputs", "opts", ...}]: a mixture's, each with the section's
    format options overlaid by its own `format` and `columns` (plus its spec, weight and epochs
    as `opts["sources"]` lists them), or the one source of any other inputs."""
    opts = dict(opts or {})
    if not is_mixture(inputs):
        return [{"name": "all", "inputs": inputs, "opts": opts}]
    base = {k: v for k, v in opts.items() if k != "sources"}
    out = []
    for part, src in zip(inputs["sources"], opts["sources"], strict=True):
        own = {"format": src.get("format") or base.get("format", "auto")}
        if src.get("columns"):
            own["columns"] = src["columns"]
        out.append({**src, "inputs": part, "opts": base | own})
    return out


def row_options(opts: dict) -> dict:
    """Format options with each mixture source's weight and epochs left out: what reading rows
    needs (the tokenizer and filter stages), so a new weight re-runs neither."""
    if not opts or "sources" not in opts:
        return opts
    return {**opts, "sources": [{k: v for k, v in s.items() if k not in ("weight", "epochs")} for s in opts["sources"]]}


def check_columns(spec: str, kind: str, columns: dict, field: str) -> None:
    """Before any download: the first row of each local file that `spec` names has the columns
    `columns` maps (a hub file is checked when it is first read). DataError naming the file, line
    and config key `field` (e.g. data.pretrain.sources.1.columns)."""
    if not columns:
        return
    parsed = download.parse_spec(spec, kind)
    if not isinstance(parsed, download.LocalFiles):
        return
    for path in download.match_local(spec, parsed.pattern):
        lineno, row = records.first_row(path) or (0, None)
        for ours, theirs in columns.items() if row is not None else ():
            if theirs not in row:
                raise DataError(f"{path}:{lineno}: {field}.{ours}: no column {theirs!r} in the row "
                                f"(its columns: {sorted(row)[:12]})")
