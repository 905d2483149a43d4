"""Content-based cache keys and output dirs for stage tasks.

A stage's key hashes: the stage name, the code version (every source file of mlxcore and
tasks, plus the mlx / mlx-lm versions), the *digests* of its input dirs' manifests (never
their paths: same path with new data is a new key), its config values, and the run dir it
writes to (the same inputs written to two run dirs are two results, each with its files).
The stage writes to `<run_dir>/<stage>-<key[:12]>`, so a key always names one output dir. If
that dir was deleted while Prefect still holds a cached result for the key, the key function
forces a re-run instead of handing out a path to nothing. The converse holds too: each stage's
body returns a complete output dir's result from disk (its manifest) without redoing the work,
so a fresh Prefect result store (another PREFECT_HOME, server or worker) costs nothing. Before
its body a stage sweeps the run dir of temp files left by writers that were killed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from mlxcore.io import clean_stale_tmp, is_complete, path_digest, sha256_json

PACKAGES = ("mlxcore", "tasks")


@lru_cache(maxsize=1)
def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    for dist in ("mlx", "mlx-lm"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def _value(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def _digest(value: Any) -> Any:
    """Content digests of an input: a dir or file path, or lists / dicts of them."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _digest(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    return path_digest(value)


def stage_key(stage: str, params: dict[str, Any], inputs: tuple[str, ...], extra=None) -> str:
    """Key from input dirs' content digests + the other parameters + code version.

    An input dir is digested by its manifest, or file by file when it has none (a model
    downloaded elsewhere). `extra(params)` adds content a parameter only points at.
    """
    body = {"stage": stage, "code": code_version()}
    if extra is not None:
        body["extra"] = extra(params)
    for name, value in sorted(params.items()):
        if name in inputs:
            body[name] = _digest(value)
        elif name == "run_dir":
            body[name] = str(Path(value).resolve())
        else:
            body[name] = _value(value)
    return sha256_json(body)


class Stage:
    """A stage's name, which parameters are input dirs, and where its finished product lies.

    `product` is the subdir whose manifest marks the stage done ("" = the stage dir itself).
    """

    def __init__(self, name: str, inputs: tuple[str, ...] = (), product: str = "", extra=None):
        self.name, self.inputs, self.product, self.extra = name, inputs, product, extra

    def dir(self, params: dict[str, Any], key: str | None = None) -> Path:
        key = key or stage_key(self.name, params, self.inputs, self.extra)
        return Path(params["run_dir"]) / f"{self.name}-{key[:12]}"

    def done(self, out: Path) -> bool:
        return is_complete(out / self.product)

    def task(self, **kwargs):
        """prefect.task with this stage's cache policy and JSON results (paths + small dicts)."""
        def key_fn(context, params: dict[str, Any]) -> str:
            key = stage_key(self.name, params, self.inputs, self.extra)
            if not self.done(self.dir(params, key)) and context.result_store.exists(key):
                return f"{key}-rebuild-{uuid.uuid4().hex}"  # cached result points at a deleted dir
            return key

        def decorate(fn):
            @functools.wraps(fn)
            def swept(*args, **kw):
                sweep(inspect.signature(fn).bind(*args, **kw).arguments["run_dir"])
                return fn(*args, **kw)

            return task(name=self.name, cache_policy=CachePolicy.from_cache_key_fn(key_fn),
                        persist_result=True, result_serializer="json", **kwargs)(swept)

        return decorate


def sweep(run_dir: str | Path) -> list[Path]:
    """Remove what writers killed mid-write left in a run dir (`.tmp-*` of dead processes only:
    a live writer's temp, e.g. a concurrent stage's, stays). Every stage calls it first."""
    removed = clean_stale_tmp(run_dir, recursive=True)
    if removed:
        try:
            logger = get_run_logger()
        except MissingContextError:  # called outside a flow run
            logger = logging.getLogger("mlxflow")
        logger.info("removed %d stale temp file(s) left by killed writers: %s", len(removed),
                              ", ".join(str(p.relative_to(run_dir)) for p in removed[:5]))
    return removed
