"""`hfds:` specs: one split of a Hugging Face dataset, read with the `datasets` library.

    hfds:<owner>/<name>[:<config>][@<revision>]:<split>[[:N]]
    hfds:tatsu-lab/alpaca:train
    hfds:openai/gsm8k:main@e53f048856ff4f594e959d75785d2c2d37b678ee:test
    hfds:HuggingFaceFW/fineweb-edu:sample-10BT:train[:100000]      # the first 100,000 rows

The last `:`-part is the split, optionally with a row limit `[:N]`; an optional part before it is
the config (the hub's "subset"); `@revision` (a branch, tag or commit) follows the name or config.

This module is the `datasets` side: parsing, pointing the library at this call's endpoint, caches
and offline flag (`settings`), the split's data files and their size, its rows (prepared in the
datasets cache, or streamed), and writing them as JSONL through a column mapping. What a fetch
does with them (size guard, retries, offline fallback, the manifest) is `mlxcore.data.download`'s
`fetch()`; its docstring has the whole story.

`datasets` reads its settings (endpoint, offline flag, cache dir) once, at import; `settings()`
sets them from the environment at each call and restores them after, so a long-lived process
follows HF_ENDPOINT, HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and HF_HOME / HF_DATASETS_CACHE as `hf:`
specs do. One `settings()` block runs at a time per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable, Iterator

import orjson

_SPEC = re.compile(r"(?P<head>.+):(?P<split>[A-Za-z0-9_.-]+)(?:\[:(?P<rows>\d+)\])?")
_CONFIG = re.compile(r"[A-Za-z0-9_.-]+")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_LOCK = threading.RLock()


class SpecError(ValueError):
    """A malformed hfds: spec, or one that names a split the dataset lacks."""


class RowError(ValueError):
    """A row the column mapping cannot be applied to, or more rows than the limit allows."""


@dataclass(frozen=True)
class HfDataset:
    repo: str
    split: str
    config: str | None = None
    revision: str | None = None
    rows: int | None = None  # the first N rows only
    columns: tuple[tuple[str, str], ...] = ()  # (our field, their column); empty: rows as they are
    license: str | None = None  # a catalog entry's; else the repo card's is used
    catalog: str | None = None
    format: str | None = None

    @property
    def split_expr(self) -> str:
        return f"{self.split}[:{self.rows}]" if self.rows else self.split

    @property
    def file_name(self) -> str:
        return f"{self.config or 'default'}-{self.split}.jsonl"


def parse(rest: str) -> tuple[str, str | None, str | None, str, int | None]:
    """(repo, config, revision, split, rows) of what follows `hfds:`; SpecError for anything malformed.
    The repo id and revision are checked by the caller (the same rules as `hf:` specs)."""
    m = _SPEC.fullmatch(rest)
    if not m:
        head, sep, split_part = rest.rpartition(":")
        if not sep or not head:
            raise SpecError("expected hfds:<owner>/<name>[:<config>][@<revision>]:<split>")
        raise SpecError(f"bad split {split_part!r}: a split name (train, test, ...), optionally with a row limit "
                        "like train[:1000]")
    head = m["head"]
    rows = int(m["rows"]) if m["rows"] is not None else None
    if rows == 0:
        raise SpecError("a row limit of 0 takes no rows")
    head, at, revision = head.partition("@")
    repo, _, config = head.partition(":")
    if config and (not _CONFIG.fullmatch(config) or ".." in config):
        raise SpecError(f"bad config name {config!r}")
    if at and not revision:
        raise SpecError("empty revision after '@'")
    return repo, config or None, revision if at else None, m["split"], rows


# ------------------------------------------------------------------ datasets' settings, per call


def offline_from_env() -> bool:
    return any((os.environ.get(k) or "").strip().upper() in _TRUE
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def datasets_cache() -> Path:
    """HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/huggingface/datasets (read now)."""
    env = os.environ
    cache = env.get("HF_DATASETS_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        cache = os.path.join(home, "datasets")
    return Path(os.path.expandvars(os.path.expanduser(cache))).absolute()


@contextlib.contextmanager
def settings(endpoint: str, hub_cache: Path, offline: bool, online: ContextManager | None = None) -> Iterator[Path]:
    """Point `datasets` (and the hub URLs it builds) at `endpoint`, the caches and the offline flag;
    yields the datasets cache dir. `online`: a context that lets huggingface_hub make requests."""
    import datasets
    from huggingface_hub import constants

    cache = datasets_cache()
    patches = [(datasets.config, "HF_ENDPOINT", endpoint),
               (datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
               (datasets.config, "HF_HUB_OFFLINE", offline), (datasets.config, "HF_DATASETS_OFFLINE", offline),
               (datasets.config, "HF_DATASETS_CACHE", cache), (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False),
               # hf_hub_url() builds URLs from these two, which huggingface_hub read at import
               (constants, "ENDPOINT", endpoint),
               (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
               (constants, "HF_HUB_CACHE", str(hub_cache))]
    with _LOCK, (online if online is not None and not offline else contextlib.nullcontext()):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches if hasattr(obj, name)]
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            yield cache
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)


# ------------------------------------------------------------------ the split


def builder(ds: HfDataset, cache: Path):
    """The dataset's builder (asks the hub for its card and file list; offline: from the cache)."""
    from datasets import load_dataset_builder

    return load_dataset_builder(ds.repo, ds.config, revision=ds.revision, cache_dir=str(cache))


def commit_of(b) -> str | None:
    """The commit the builder's data files resolve to (the hub's answer for the revision)."""
    for files in (b.config.data_files or {}).values():
        for f in files:
            if m := re.search(r"@([0-9a-f]{40})/", str(f)):
                return m.group(1)
    h = getattr(b, "hash", None)
    return h if isinstance(h, str) and _HEX40.fullmatch(h) else None


def split_files(ds: HfDataset, b) -> list[str]:
    files = b.config.data_files or {}
    if files and ds.split not in files:
        raise SpecError(f"dataset {ds.repo} (config {b.config.name!r}) has no split {ds.split!r}; its splits: "
                        f"{', '.join(sorted(files))}")
    return [str(f) for f in files.get(ds.split, [])]


def split_bytes(ds: HfDataset, endpoint: str, commit: str, urls: list[str]) -> int | None:
    """Total size of the split's data files from the hub's tree listing; None when it does not say."""
    from huggingface_hub import HfApi

    prefix = f"hf://datasets/{ds.repo}@{commit}/"
    paths = {u[len(prefix):] for u in urls if u.startswith(prefix)}
    if not urls or len(paths) != len(urls):
        return None
    tree = HfApi(endpoint=endpoint, library_name="mlxflow").list_repo_tree(
        ds.repo, revision=commit, repo_type="dataset", recursive=True)  # errors: the caller retries
    sizes = {e.path: e.size for e in tree if getattr(e, "size", None) is not None}
    return sum(sizes[p] for p in paths) if paths <= set(sizes) else None


def prepare(b) -> None:
    """Download and prepare the dataset in the datasets cache (a prepared one is reused)."""
    from datasets import DownloadConfig

    b.download_and_prepare(download_config=DownloadConfig(max_retries=0))  # the caller retries


def rows(ds: HfDataset, b, streamed: bool) -> Iterable[dict]:
    """The split's rows: streamed from the hub, or from the prepared copy in the cache."""
    if streamed:
        it = b.as_streaming_dataset(split=ds.split)
        return it.take(ds.rows) if ds.rows else it
    return b.as_dataset(split=ds.split_expr)


def map_row(row: dict, columns: dict[str, str], where: str) -> dict:
    """`row` rewritten to exactly `columns`' fields ({ours: theirs}); RowError naming `where` and the
    columns the row has when one is missing. No mapping: the row as it is."""
    if not columns:
        return row
    missing = [theirs for theirs in columns.values() if theirs not in row]
    if missing:
        raise RowError(f"{where}: no column {', '.join(map(repr, missing))} for the column mapping {columns} "
                       f"(the row has {sorted(row)})")
    return {ours: row[theirs] for ours, theirs in columns.items()}


def write_jsonl(items: Iterable[dict], path: Path, columns: dict[str, str], where: str,
                max_bytes: float | None = None, convert=None) -> tuple[int, int, str]:
    """Write rows as JSONL through `columns`; (rows, bytes, sha256 of the file). RowError when a row
    lacks a mapped column, or (with `max_bytes`) when the file would grow past it.

    `convert(row, where) -> [rows]` (optional) rewrites each mapped row into the rows written, e.g.
    saving its images as files beside `path` (`mlxcore.vlm.hub`); the bytes of those files (its
    `bytes` attribute) count against `max_bytes` too."""
    sha, n, size = hashlib.sha256(), 0, 0
    with open(path, "wb") as f:
        for n, row in enumerate(items, 1):
            at = f"{where}: row {n}"
            row = map_row(dict(row), columns, at)
            for out in convert(row, at) if convert is not None else (row,):
                line = orjson.dumps(out, default=str, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
                f.write(line)
                sha.update(line)
                size += len(line)
            total = size + getattr(convert, "bytes", 0)
            if max_bytes is not None and total > max_bytes:
                raise RowError(f"{where}: {n:,} rows make {total:,} bytes and the split goes on, over the limit")
    return n, size, sha.hexdigest()


def how_to_cache(ds: HfDataset) -> str:
    cfg = f", {ds.config!r}" if ds.config else ""
    rev = f", revision={ds.revision!r}" if ds.revision else ""
    return (f"python -c \"import datasets; datasets.load_dataset({ds.repo!r}{cfg}, split={ds.split!r}{rev})\"")


