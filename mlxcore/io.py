"""Crash-safe files and manifests.

Every stage writes a new directory through `atomic_dir`: files go to a hidden temp dir beside
the target, are fsynced, and the dir is renamed into place. A crash leaves either the old
state or the complete new one, plus at worst a `.tmp-*` dir that the next write removes.

Each stage directory carries `manifest.json`: what it is, the sha256 of every file, the config
that made it, and a `digest` over all of that. Downstream cache keys hash digests, not paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def clean_stale_tmp(parent: str | Path) -> None:
    """Remove temp dirs left by writers that died mid-write."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp dir; on success it becomes `final` in one rename, on error it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file + rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows) -> None:
    """All of `rows` or nothing: written beside `path`, fsynced, then renamed over it."""
    import orjson

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def link(target: str | Path, name: str | Path) -> Path:
    """Point the symlink `name` at `target` (relative to name's dir), replacing an older link atomically."""
    name = Path(name)
    rel = os.path.relpath(Path(target).resolve(), name.parent.resolve())
    tmp = name.with_name(f".{name.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, name)
    return name


def write_manifest(directory: str | Path, kind: str, config: Any = None, **extra: Any) -> dict:
    """Hash every file under `directory` (except the manifest) and write manifest.json."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    body = {"kind": kind, "files": files, "config": config, **extra}
    manifest = {**body, "digest": sha256_json(body), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {directory} the output of a finished stage?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: corrupt manifest: {e.msg}") from None
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{path}: expected a {kind!r} directory, found {manifest.get('kind')!r}")
    return manifest


_DIGESTS: dict[tuple, str] = {}


def dir_digest(directory: str | Path, names: tuple[str, ...] | None = None) -> str:
    """A content digest of a directory: its manifest's digest, else a hash of its files.

    The second case covers model dirs made elsewhere (a Hugging Face download, an mlx-lm
    conversion) that carry no manifest of ours; `names` limits it to those files. Hashes are
    remembered per (path, size, mtime) of every file, so a 1 GB model is read once per process.
    """
    directory = Path(directory)
    if names is None and (directory / MANIFEST).is_file():
        return read_manifest(directory)["digest"]
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    files = [p for p in sorted(directory.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(directory).parts)
             and (names is None or p.name in names)]
    stamp = (str(directory.resolve()), names, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = sha256_json({str(p.relative_to(directory)): sha256_file(p) for p in files})
    return _DIGESTS[stamp]


def path_digest(path: str | Path) -> str:
    """`dir_digest` for a directory, the sha256 of a file (remembered per path, size and mtime)."""
    path = Path(path)
    if path.is_dir():
        return dir_digest(path)
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = sha256_file(path)
    return _DIGESTS[stamp]


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()
