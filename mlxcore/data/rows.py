"""A crash-safe, append-only JSONL store of distilled conversations.

One row per line:

    {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "meta": {"id", "category", "kind", "teacher", "verified", "created_at", "prompt_hash", ...}}

Crash safety. `RowStore.append` writes a whole line with one `os.write` on an O_APPEND descriptor
(looping only if the kernel takes part of it), then `os.fsync`s (every row by default; every N
rows or T seconds if asked). A process killed mid-append can therefore leave at most one partial
line, after the last newline; opening the store truncates that tail away (and fsyncs), so
complete rows are never lost and no line is ever rewritten. A failed write (disk full) is
truncated back to where it started before the error is raised.

One writer. The store takes an exclusive `flock` on the file while open, so a second writer
(another process, or a second RowStore on the same path) fails at once rather than racing the
repair or the duplicate checks. Readers take no lock: `iter_rows` and `read_new` only ever look
at complete (newline-terminated) lines, so they can follow a file that is still growing.

Duplicates. The store refuses a row whose id or prompt hash (`prompt_hash`: sha256 of the
canonical JSON of the messages before the reply) is already in the file; `append` returns False.
`RowStore(path, unique_prompts=False)` refuses only a second id: a store of several replies to
one prompt (the distill stage's verified-wrong replies, `mlxcore.distill.generate`).

Flat rows. A row without "conversations" may carry its id at the top level instead of in
"meta" (`{"id": ..., "prompt": ..., "chosen": ..., "rejected": ...}`, a preference pair); such a
row has no prompt hash and is deduplicated by its id alone, with the same crash safety.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mlxcore.io import writing

log = logging.getLogger(__name__)

__all__ = ["RowStore", "RowStoreLocked", "iter_rows", "make_row", "prompt_hash", "read_new"]

_CHUNK = 1 << 16


def prompt_hash(messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 hex of the messages as canonical JSON (sorted keys, no spaces, UTF-8)."""
    canon = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _prompt_messages(conversations: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages before the final assistant reply(s)."""
    end = len(conversations)
    while end > 0 and conversations[end - 1].get("role") == "assistant":
        end -= 1
    return list(conversations[:end])


def make_row(*, messages: Sequence[Mapping[str, str]], reply: str, id: str, category: str,
             teacher: str, verified: bool, kind: str | None = None, created_at: str | None = None,
             **extra: Any) -> dict[str, Any]:
    """A row in the store's schema: the prompt messages plus the assistant reply."""
    convo = [{"role": m["role"], "content": m["content"]} for m in messages]
    meta = {"id": id, "category": category, "kind": kind, "teacher": teacher, "verified": bool(verified),
            "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompt_hash": prompt_hash(convo), **extra}
    return {"conversations": convo + [{"role": "assistant", "content": reply}], "meta": meta}


def _encode(row: Mapping[str, Any]) -> bytes:
    line = json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return line.encode("utf-8") + b"\n"  # json.dumps escapes \n inside strings: one line per row


class RowStoreLocked(RuntimeError):
    """Another RowStore (in this or another process) has the file open for writing."""


class RowStore:
    """Append-only JSONL rows with torn-tail repair, fsync and duplicate refusal. Thread-safe.

    fsync_every: fsync after this many appended rows (1: every row; 0: not by count).
    fsync_interval_s: also fsync when this long has passed since the last fsync (checked on
        append; `sync()` / `close()` flush the rest).
    unique_prompts: refuse a row whose prompt hash is already stored (False: only ids are unique;
        `has_prompt` still answers).
    """

    def __init__(self, path: str | os.PathLike, *, fsync_every: int = 1,
                 fsync_interval_s: float | None = None, unique_prompts: bool = True) -> None:
        if fsync_every < 0:
            raise ValueError(f"fsync_every must be >= 0, got {fsync_every}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.unique_prompts = unique_prompts
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RowStoreLocked(f"{self.path} is already open in another RowStore") from None
        try:
            self.repaired_bytes = self._repair()
            self._ids: set[str] = set()
            self._hashes: set[str] = set()
            self.bad_lines = 0  # complete lines that are not a row (never written by a RowStore)
            self._count = 0
            self._load()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._size = os.fstat(self._fd).st_size
        self._pending = 0
        self._last_sync = time.monotonic()

    # -- open ---------------------------------------------------------------------------------

    def _repair(self) -> int:
        """Truncate a partial last line (bytes after the last newline); returns bytes dropped."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _CHUNK)
            chunk = os.pread(self._fd, end - start, start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        dropped = size - keep
        if dropped:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write",
                        self.path, dropped)
        return dropped

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("meta", row), Mapping):
                    self.bad_lines += 1
                    continue
                meta = row.get("meta")
                if meta is None:  # a flat row: its id at the top level, no prompt hash
                    if "conversations" in row or row.get("id") is None:
                        self.bad_lines += 1
                        continue
                    self._count += 1
                    self._ids.add(str(row["id"]))
                    continue
                self._count += 1
                if meta.get("id") is not None:
                    self._ids.add(str(meta["id"]))
                ph = meta.get("prompt_hash")
                if ph is None and isinstance(row.get("conversations"), list):
                    ph = prompt_hash(_prompt_messages(row["conversations"]))
                if ph is not None:
                    self._hashes.add(ph)
        if self.bad_lines:
            log.warning("%s: %d complete lines are not rows; they are skipped", self.path, self.bad_lines)

    # -- write --------------------------------------------------------------------------------

    def append(self, row: Mapping[str, Any]) -> bool:
        """Write one row; False (nothing written) when its id (or, with `unique_prompts`, its prompt
        hash) is already stored. A row is {"conversations": [...], "meta": {"id", ...}} or a flat
        row {"id", ...} without "conversations" (see the module doc)."""
        convo = row.get("conversations")
        meta = row.get("meta")
        if convo is None and meta is None and row.get("id") is not None:
            rid, ph = str(row["id"]), None
        else:
            if not isinstance(convo, list) or not convo or not isinstance(meta, Mapping) or meta.get("id") is None:
                raise ValueError("a row needs a non-empty 'conversations' list and 'meta' with an 'id' "
                                 "(or, without 'conversations', a top-level 'id')")
            rid = str(meta["id"])
            ph = meta.get("prompt_hash") or prompt_hash(_prompt_messages(convo))
            if meta.get("prompt_hash") != ph:
                row = {**row, "meta": {**meta, "prompt_hash": ph}}
        data = _encode(row)
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: the store is closed")
            if rid in self._ids or (self.unique_prompts and ph in self._hashes):
                return False
            start = self._size
            try:
                with writing(self.path):  # a full disk or lost rights: one line naming the file
                    view = memoryview(data)
                    while view:
                        n = os.write(self._fd, view)
                        view = view[n:]
            except BaseException:
                try:  # never leave a partial line for the next row to be glued onto
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
                raise
            self._size = start + len(data)
            self._ids.add(rid)
            if ph is not None:
                self._hashes.add(ph)
            self._count += 1
            self._pending += 1
            now = time.monotonic()
            if (self.fsync_every and self._pending >= self.fsync_every) or (
                    self.fsync_interval_s is not None and now - self._last_sync >= self.fsync_interval_s):
                self._sync_locked(now)
            return True

    def _sync_locked(self, now: float | None = None) -> None:
        if self._fd is not None and self._pending:
            with writing(self.path):
                os.fsync(self._fd)
        self._pending = 0
        self._last_sync = time.monotonic() if now is None else now

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            self._sync_locked()
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- query --------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Rows in the file (loaded at open plus appended since)."""
        return self._count

    def __len__(self) -> int:
        return self._count

    def has(self, id: str) -> bool:
        return str(id) in self._ids

    def __contains__(self, id: object) -> bool:
        return str(id) in self._ids

    def has_prompt(self, hash_or_messages: str | Sequence[Mapping[str, Any]]) -> bool:
        """Whether a prompt (its hash, or its messages) is already stored."""
        h = hash_or_messages if isinstance(hash_or_messages, str) else prompt_hash(hash_or_messages)
        return h in self._hashes

    @property
    def closed(self) -> bool:
        return self._fd is None


# ------------------------------------------------------------------------------------ readers

def iter_rows(path: str | os.PathLike, *, strict: bool = False) -> Iterator[dict[str, Any]]:
    """The rows of a store file, streaming; a partial last line (a write in progress or a torn
    tail) is skipped, and so are complete lines that are not JSON (`strict`: raise instead)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                if strict:
                    raise ValueError(f"{path}:{lineno}: not a JSON row") from None


def read_new(path: str | os.PathLike, offset: int = 0, *,
             max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The complete rows after byte `offset`, and the offset to resume from (just past the
    last complete line read). A partial last line is left for the next call. `max_bytes` bounds
    one call's read (a longer single line is still read whole). Raises ValueError when the file
    is shorter than `offset` or `offset` is not at a line start (the file was replaced)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if offset > size:
            raise ValueError(f"{path}: offset {offset} is past the end ({size} bytes); was the file replaced?")
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise ValueError(f"{path}: offset {offset} is not at the start of a line")
        f.seek(offset)
        data = f.read(max_bytes) if max_bytes else f.read()
        while max_bytes and b"\n" not in data:
            more = f.read(max(_CHUNK, max_bytes))
            if not more:
                break
            data += more
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].split(b"\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a line that is not JSON", path)
    return rows, offset + end
