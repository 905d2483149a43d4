"""Row filters between download and pretokenize: length, non-text, charset, exact and near duplicates.

One stage per kind over all of its sources. Rows are visited in a fixed order (sources in config
order; within one, its val files, then its train files; rows in file order), and each passes the
filters below in turn; the first that refuses a row drops it and counts it:

  length     fewer than `min_chars` or more than `max_chars` characters of text
  control    a control character (C0 / C1 other than tab, newline and carriage return), a lone
             surrogate, or U+FFFD (bytes that were not text before someone decoded them)
  charset    under `min_script_fraction` of its letters in `scripts` (code-point ranges: latin,
             cyrillic, greek, arabic, hebrew, devanagari, thai, cjk = Han + kana + Hangul); a row with
             no letter of any of these scripts passes. No language model is involved.
  exact_dup  the same content as a row kept before it (a 128-bit BLAKE2b of the example)
  near_dup   a near-duplicate of a row kept before it: the MinHash (datasketch, `num_perm`
             permutations from `seed`) of its word (or character) `shingle_size`-grams, lower-cased,
             finds candidates in a MinHash LSH index (datasketch's, tuned for `near_dup_threshold`)
             and the row is dropped if one candidate's estimated Jaccard similarity reaches the
             threshold. Only kept rows are indexed, so the first of a group of near-duplicates stays.

Val files come before train files so that a train row that repeats a held-out row is the one
dropped (decontamination); with held-out rows taken from train (no val files), pretokenize takes
them from the filtered rows. Dedup runs across the sources of a kind, so the same document in
two sources is kept once, in the earlier source.

What a filter sees is the example as the model will: a document's text, a conversation's message
contents joined by newlines (exact dedup hashes the whole conversation, roles included), after the
source's `columns` and format. Pretokenized `ids` rows pass every filter but exact dedup.

Output: every kept row unchanged (a JSONL line byte for byte; a parquet or JSON-array row as a
JSON line; a .txt paragraph as {"text": ...}) in `<source index>/<split>/<k>-<name>.jsonl`, one file
per input file that kept a row, so pretokenize reads them with the source's own format and
columns. Each `<source index>/<split>` dir has a manifest like a download's (its `data_files`, and
the lineage of the rows it came from: sources, licenses), so the next stages take it as they take
a download.
`dropped.jsonl` lists every dropped row (source, file:line, filter); the manifest has the counts
(rows in, dropped by each filter, rows out) per source and in total. There is no randomness but
the MinHash permutations (seeded), so the same input gives the same output, byte for byte.

Limits: one process. Measured on 4,000 rows of 200 words (2 shared CPU cores, busy): length +
control + exact dedup 20k rows/s, + charset 6k rows/s, near dedup 0.8k rows/s (MinHash's hashing of
every shingle is most of it). The dedup indexes live in memory: 16 bytes per kept row for exact
dedup; the LSH index plus num_perm x 8 bytes per kept row for near dedup.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import orjson

from mlxcore.data import records
from mlxcore.data.inputs import resolve_inputs
from mlxcore.data.records import DataError
from mlxcore import lineage
from mlxcore.io import atomic_dir, path_digest, read_manifest, write_manifest

FILTERS = ("length", "control", "charset", "exact_dup", "near_dup")
SCRIPTS = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "cyrillic": ((0x400, 0x52F),),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F)),
    "hebrew": ((0x590, 0x5FF),),
    "devanagari": ((0x900, 0x97F),),
    "thai": ((0xE00, 0xE7F),),
    "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
            (0x20000, 0x2FA1F)),
}
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff]")


_RANGES = sorted((lo, hi, name) for name, ranges in SCRIPTS.items() for lo, hi in ranges)  # disjoint
_STARTS = np.array([r[0] for r in _RANGES], dtype=np.uint32)
_ENDS = np.array([r[1] for r in _RANGES], dtype=np.uint32)


def script_fraction(text: str, scripts: list[str]) -> float:
    """Share of the letters of known scripts in `text` that are in `scripts` (1.0 when it has none)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    at = np.searchsorted(_STARTS, cp, side="right") - 1  # the range starting at or below each code point
    known = at[(at >= 0) & (cp <= _ENDS[np.maximum(at, 0)])]
    if not len(known):
        return 1.0
    return float(np.isin(known, [i for i, r in enumerate(_RANGES) if r[2] in scripts]).mean())


class RowFilter:
    """The filters of one stage run, with their dedup indexes (see the module doc)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.hashes: set[bytes] = set()
        self.lsh = self.kept = None
        if cfg.get("near_dedup"):
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=cfg["near_dup_threshold"], num_perm=cfg["num_perm"])
            self.kept = []

    def __call__(self, example) -> str | None:
        """The name of the filter that drops `example`, or None to keep it (it is then indexed)."""
        cfg, text = self.cfg, _text(example)
        if text is not None:
            if len(text) < (cfg.get("min_chars") or 0) or (cfg.get("max_chars") is not None and len(text) > cfg["max_chars"]):
                return "length"
            if cfg.get("drop_control") and _CONTROL.search(text):
                return "control"
            if cfg.get("scripts") and script_fraction(text, cfg["scripts"]) < cfg["min_script_fraction"]:
                return "charset"
        digest = None
        if cfg.get("exact_dedup"):
            digest = hashlib.blake2b(_content(example), digest_size=16).digest()
            if digest in self.hashes:
                return "exact_dup"
        minhash = self._minhash(text) if self.lsh is not None and text else None
        if minhash is not None:
            threshold = cfg["near_dup_threshold"]
            if any(self.kept[key].jaccard(minhash) >= threshold for key in sorted(self.lsh.query(minhash))):
                return "near_dup"
            self.lsh.insert(len(self.kept), minhash, check_duplication=False)
            self.kept.append(minhash)
        if digest is not None:
            self.hashes.add(digest)
        return None

    def _minhash(self, text: str):
        from datasketch import LeanMinHash, MinHash

        n, cfg = self.cfg["shingle_size"], self.cfg
        units = text.lower().split() if cfg.get("shingle", "words") == "words" else list(text.lower())
        if not units:
            return None
        sep = " " if cfg.get("shingle", "words") == "words" else ""
        grams = {sep.join(units[i:i + n]) for i in range(max(len(units) - n + 1, 1))}
        m = MinHash(num_perm=cfg["num_perm"], seed=cfg["seed"], scheme="affine32")
        m.update_batch([g.encode("utf-8", "surrogatepass") for g in grams])
        return LeanMinHash(m)


def _text(example) -> str | None:
    if isinstance(example, str):
        return example
    if isinstance(example, tuple):  # pretokenized ids
        return None
    return "\n".join(m["content"] for m in example)


def _content(example) -> bytes:
    if isinstance(example, str):
        return example.encode("utf-8", "surrogatepass")
    tools = getattr(example, "tools", None)  # messages.Chat: a row's tool definitions are part of it
    return json.dumps([list(example), tools] if tools else example, ensure_ascii=True, sort_keys=True).encode()


def _line(payload, row: dict, text_file: bool) -> bytes:
    """A kept row as one JSONL line: the line itself when it was one."""
    if isinstance(payload, bytes) and not text_file:
        return payload.rstrip(b"\r") + b"\n"
    return orjson.dumps(row, default=str) + b"\n"


def filter_sources(parts: list[dict], kind: str, cfg: dict, out_dir: str | Path) -> dict:
    """Filter the rows of `parts` ([{"name", "inputs", "opts"}], `inputs.source_parts`) into `out_dir`
    (see the module doc) and return its manifest."""
    keep = RowFilter(cfg)
    counts, files = [], []
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "dropped.jsonl", "wb") as dropped:
            for i, part in enumerate(parts):
                def drop(where: str, why: str, name=part["name"]) -> None:
                    dropped.write(orjson.dumps({"source": name, "where": where, "filter": why}) + b"\n")

                count = dict.fromkeys(("rows_in", *FILTERS, "rows_out"), 0)
                paths = resolve_inputs(part["inputs"], kind)
                kept = {split: [] for split in ("train", "val")}
                for split in ("val", "train"):  # val first: a train row repeating a held-out row is the one dropped
                    for k, path in enumerate(paths[split]):
                        name = f"{i}/{split}/{k:04d}-{path.stem}.jsonl"
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        if _filter_file(path, kind, part["opts"], keep, tmp / name, count, drop):
                            kept[split].append(name)
                        else:
                            (tmp / name).unlink()
                for split, names in kept.items():
                    if paths[split] and not names:
                        raise DataError(f"source {part['name']}: every {split} row was filtered out "
                                        f"({ {k: v for k, v in count.items() if v} })")
                    if names:
                        sub = tmp / str(i) / split
                        write_manifest(sub, "download", {"spec": f"{part['name']} ({split}, filtered)", "kind": kind},
                                       source={"filtered": [path_digest(p) for p in paths[split]]},
                                       data_files=[Path(n).name for n in names],
                                       **lineage.fields(lineage.of_inputs(part["inputs"])))
                counts.append({"source": part["name"], **count})
                files.append({split: [f"{i}/{split}"] if kept[split] else [] for split in ("train", "val")})
        total = {"source": "all", **{k: sum(c[k] for c in counts) for k in counts[0] if k != "source"}}
        config = {"kind": kind, "filters": cfg, "opts": [p["opts"] for p in parts]}
        return write_manifest(tmp, "filtered", config, counts=counts, total=total, files=files,
                              **lineage.fields(lineage.of_inputs([p["inputs"] for p in parts])))


def _filter_file(path: Path, kind: str, opts: dict, keep: RowFilter, out: Path, count: dict, drop) -> int:
    """Filter one file's rows into `out`; how many were kept."""
    fmt, rows, kept, text_file = opts.get("format", "auto"), 0, 0, records.file_kind(path) == "txt"
    with open(out, "wb") as f:
        for chunk, _ in records.read_chunks(path):
            for lineno, payload in records.chunk_items(chunk):
                where = f"{path}:{lineno}"
                row = records.decode_row(str(path), lineno, payload, text_file)
                mapped = records.apply_columns(row, opts.get("columns"), where)
                if fmt == "auto":
                    fmt = records.detect_format(mapped, where)
                rows += 1
                why = keep(records.to_example(mapped, fmt, kind, opts, where))
                if why is not None:
                    count[why] += 1
                    drop(where, why)
                    continue
                f.write(_line(payload, row, text_file))
                kept += 1
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    count["rows_in"] += rows
    count["rows_out"] += kept
    return kept


def filtered_inputs(out_dir: str | Path, inputs) -> dict:
    """The inputs a filter stage's dir stands for, shaped like the `inputs` it was made from, plus
    "filtered": the dir (whose manifest has the counts)."""
    out = Path(out_dir)
    parts = [{s: [str(out / d) for d in f[s]] for s in ("train", "val")} for f in read_manifest(out, "filtered")["files"]]
    shaped = {"sources": parts} if isinstance(inputs, dict) and "sources" in inputs else parts[0]
    return {**shaped, "filtered": str(out)}
