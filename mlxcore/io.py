"""Crash-safe files and manifests.

Every stage writes a new directory through `atomic_dir`: files go to a hidden temp dir beside
the target, are fsynced, and the dir is renamed into place. A crash leaves either the old
state or the complete new one, plus at worst a `.tmp-*` dir that the next run of the stage removes (`clean_stale_tmp`).
A write that fails for want of space or rights raises `WriteError`: one line, the path, the cause.

Each stage directory carries `manifest.json`: what it is, the sha256 of every file, the config
that made it, and a `digest` over all of that. Downstream cache keys hash digests, not paths.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
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


# ------------------------------------------------------------------ temp files and their owners
#
# Every temp file or dir is named `.tmp-<final name>~<host>~<pid>~<start>~<ns>`: the writer's host,
# pid and process start time (Linux: /proc/<pid>/stat field 22; a reused pid has another). A temp
# whose owner on this host is gone (killed mid-write) is stale and removed by the next run of
# its stage; a live writer's temp, or one made on another host sharing the dir, is left alone.

TMP_PREFIX = ".tmp-"
_HOST = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname().split(".")[0]) or "host"
_OWNERS: dict[int, str] = {}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc has no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return "" if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished: "" never matches


def _owner() -> str:
    pid = os.getpid()
    if pid not in _OWNERS:  # per pid: a forked child is another owner
        _OWNERS[pid] = f"{_HOST}~{pid}~{_start_time(pid) or 0}"
    return _OWNERS[pid]


def tmp_path(final: str | Path) -> Path:
    """A temp name beside `final`, owned by this process."""
    final = Path(final)
    return final.parent / f"{TMP_PREFIX}{final.name}~{_owner()}~{time.monotonic_ns()}"


_OWNED = re.compile(r"~(?P<host>[^~]+)~(?P<pid>\d+)~(?P<start>\d+)~\d+$")
_LEGACY = re.compile(r"^\.tmp-.*-(?P<pid>\d+)(?:-\d+)?$|^\..+\.(?:tmp|link)-(?P<pid2>\d+)$")  # before owners


def _owner_alive(name: str) -> bool | None:
    """Whether the process that made temp `name` still runs: None when that cannot be told here."""
    m = _OWNED.search(name)
    if m:
        host, pid, start = m["host"], int(m["pid"]), m["start"]
    elif (legacy := _LEGACY.match(name)) is not None:
        host, pid, start = _HOST, int(legacy["pid"] or legacy["pid2"]), "0"
    else:
        return None
    if host != _HOST:
        return None
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return bool(now) and (start == "0" or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def temp_files(parent: str | Path, recursive: bool = False) -> list[tuple[Path, str]]:
    """Temp files and dirs under `parent` with their state: "stale" (the writer on this host is
    gone), "writing" (it still runs) or "unknown" (made on another host)."""
    parent = Path(parent)
    found = []
    for dirpath, dirnames, filenames in os.walk(parent) if parent.is_dir() else ():
        for name in [*dirnames, *filenames]:
            if name.startswith(TMP_PREFIX) or _LEGACY.match(name):
                alive = _owner_alive(name)
                found.append((Path(dirpath) / name, {False: "stale", True: "writing", None: "unknown"}[alive]))
        dirnames[:] = [d for d in dirnames if recursive and not d.startswith(TMP_PREFIX)]
    return sorted(found)


def stale_tmp(parent: str | Path, recursive: bool = False) -> list[Path]:
    """Temp files and dirs under `parent` whose writer on this host is gone."""
    return [p for p, state in temp_files(parent, recursive) if state == "stale"]


def clean_stale_tmp(parent: str | Path, recursive: bool = False) -> list[Path]:
    """Remove temp files and dirs left by writers that died mid-write; returns what was removed."""
    removed = stale_tmp(parent, recursive)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------- write failures

class WriteError(OSError):
    """A write failed for a reason outside the program (disk full, permissions, read-only
    filesystem); the message is one line naming the path and the cause."""

    def __str__(self) -> str:
        return self.strerror


_CAUSES = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}


def _diagnose(path: Path, message: str) -> int:
    """errno for a write that failed without one (MLX says only "[write] Unable to write N bytes")."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return errno.EIO
    wanted = int(m[1]) if (m := re.search(r"write (\d+) bytes", message)) else 1 << 20
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < max(wanted, 1 << 16):
        return errno.ENOSPC
    if not os.access(probe if probe.is_dir() else probe.parent, os.W_OK):
        return errno.EACCES
    return errno.EIO


def as_write_error(path: str | Path, exc: BaseException) -> WriteError | None:
    """`exc` as a one-line WriteError naming `path`, when it is an I/O failure; else None."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _CAUSES:
        code = exc.errno
    elif isinstance(exc, RuntimeError) and re.search(r"\[(write|save\w*|open\w*)\]|Unable to write", str(exc)):
        code = _diagnose(Path(path), str(exc))
    else:
        return None
    free = ""
    if code == errno.ENOSPC:
        with contextlib.suppress(OSError):
            st = os.statvfs(Path(path).parent if not Path(path).exists() else path)
            free = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free)"
    return WriteError(code, f"cannot write {path}: {os.strerror(code).lower()}{free}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Re-raise I/O failures inside the block as a WriteError naming `path` and the cause."""
    try:
        yield
    except Exception as e:
        err = as_write_error(path, e)
        if err is None:
            raise
        raise err from e


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp dir; on success it becomes `final` in one rename, on error it vanishes."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(final)
        tmp.mkdir()
    try:
        with writing(final):
            yield tmp
            _fsync_tree(tmp)
            if final.exists():
                if not replace:
                    raise FileExistsError(f"{final} already exists")
                old = tmp_path(final.parent / f"old-{final.name}")
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[Any]:
    """An open temp file beside `path`; fsynced and renamed over it on success, removed on error."""
    tmp = tmp_path(path)
    try:
        with writing(path):
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file + rename (atomic on POSIX)."""
    with _atomic_file(Path(path), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temp file + rename (atomic on POSIX)."""
    with _atomic_file(Path(path), "w") as f:
        f.write(text)


def write_jsonl(path: str | Path, rows) -> None:
    """All of `rows` or nothing: written beside `path`, fsynced, then renamed over it."""
    import orjson

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path, "wb") as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")


def link(target: str | Path, name: str | Path) -> Path:
    """Point the symlink `name` at `target` (relative to name's dir), replacing an older link atomically."""
    name = Path(name)
    rel = os.path.relpath(Path(target).resolve(), name.parent.resolve())
    tmp = tmp_path(name)
    with writing(name):
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
