"""The best of a few synchronised calls: the benchmarks' one timing helper."""

from __future__ import annotations

import time


def best_seconds(fn, sync=None, repeats: int = 10, warmup: int = 3) -> float:
    """The shortest of `repeats` calls of `fn`, each followed by `sync()` (a device
    synchronisation, or nothing), after `warmup` untimed calls (compilation, caches)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
