"""Where a stage's data files are: a synthetic raw dataset dir, or {split: [files | download dirs]}.

Shared by the tokenizer (which trains on the train files) and pretokenize (which reads them all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
