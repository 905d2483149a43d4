"""Share MLX-CUDA's compiled kernels between pytest-xdist workers without reading half-written files.

MLX-CUDA compiles each kernel with NVRTC on first use (3-25 s of one CPU core each) and caches it in
`MLX_PTX_CACHE_DIR` as three files: `NAME.ptx` (the compiled code), `NAME.txt` (its kernels' mangled
names) and `NAME.cu` (the source). A name longer than 245 characters is split into folders. MLX opens
all three in place, writes them and closes them together when the write returns, so another process
reading the cache at that moment could load a truncated kernel. That is why each worker has a folder
of its own (`tests/conftest.py`). But then every worker compiled the same kernels: on an H100 the GPU
subset on 8 workers compiled 290 kernels, 74 of them different.

`pull` copies into a worker's own folder the kernels another worker has finished: all three files
present, none changed for `settle` seconds, the `.txt` ending in a newline. It publishes each by
rename (atomic), `.ptx` last, because MLX looks for the `.ptx` first and reads the `.txt` only
when it is there. So MLX in this worker sees a kernel whole or not at all, and never writes into a
peer's folder. `start` runs `pull` every `interval` seconds on a daemon thread (MLX releases the
GIL while it evaluates and compiles).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

PARTS = (".txt", ".cu", ".ptx")  # the publishing order: `.ptx` last


def _finished(ptx: Path, settle: float) -> bool:
    """Whether the kernel of `ptx` has all three files, none changed for `settle` seconds, and a
    `.txt` that ends its last line."""
    try:
        stats = [ptx.with_suffix(s).stat() for s in PARTS]
        txt = ptx.with_suffix(".txt").read_bytes()
    except OSError:
        return False
    return txt.endswith(b"\n") and all(time.time() - st.st_mtime >= settle for st in stats)


def _publish(src: Path, dst: Path) -> bool:
    """Copy `src` to a hidden file beside `dst`, then rename it to `dst`; False (nothing left
    behind) if `src` changed while it was copied."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    before = src.stat()
    try:
        shutil.copyfile(src, tmp)
        after = src.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            tmp.unlink()
            return False
        os.replace(tmp, dst)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def pull(own: Path, peers: list[Path], settle: float = 1.0) -> int:
    """Copy into `own` each kernel a peer folder has finished and `own` lacks; how many."""
    copied = 0
    for peer in peers:
        if not peer.is_dir() or peer == own:
            continue
        for ptx in peer.rglob("*.ptx"):
            target = own / ptx.relative_to(peer).with_suffix("")
            if target.with_suffix(".ptx").exists() or not _finished(ptx, settle):
                continue  # had already (checked first: most rounds find nothing new), or unfinished
            target.parent.mkdir(parents=True, exist_ok=True)
            if all(_publish(ptx.with_suffix(s), target.with_suffix(s)) for s in PARTS):
                copied += 1
    return copied


def start(own: Path, interval: float = 0.5, settle: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
    """Pull from every sibling of `own` (the other workers' folders) every `interval` s, until
    the process exits or `stop` is set."""
    stop = stop or threading.Event()

    def loop():
        while not stop.is_set():
            try:
                pull(own, sorted(p for p in own.parent.iterdir() if p.is_dir()), settle)
            except OSError:
                pass  # a folder appearing or going mid-scan: the next round sees it
            stop.wait(interval)

    own.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=loop, name="ptx-share", daemon=True)
    thread.start()
    return thread
