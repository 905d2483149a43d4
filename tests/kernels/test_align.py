"""64-byte aligned array data on the CPU (mlxcore/kernels/csrc/align.cpp).

MLX's CPU allocator puts an 8-byte header in front of malloc's memory, so array data starts 8
bytes past a 16-byte boundary; loading the kernels extension points libmlx's malloc / free at an
aligning pair. Each case runs in a fresh interpreter: the switch is process-wide, and a block
freed by the wrong `free` aborts the process, often only at exit (MLX's buffer cache is emptied
then), so the exit status is part of what is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from mlxcore.kernels import _build

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or mx.default_device() != mx.cpu
                                or mx.metal.is_available(), reason="the CPU build of MLX on Linux")

SCRIPT = r"""
import json, os
import mlxcore, mlx.core as mx, numpy as np
from mlxcore.kernels import _build

def address(a):
    mx.eval(a)
    return np.array(a, copy=False).ctypes.data

early = mx.random.normal((512, 300))              # made before the switch: glibc's block
mx.eval(early)
loaded = _build.load() is not None
sizes = [(2048, 6400), (1000, 3), (257,), (64, 64), (7,)]
arrays = [mx.random.normal(s) for s in sizes]
offsets = [address(a) % 64 for a in arrays]
y = arrays[0] @ mx.random.normal((6400, 300))       # an op's output
offsets.append(address(y) % 64)
total = float(mx.sum(early @ early.T)) + float(y.sum())
# through MLX's buffer cache and out of it again: evicted blocks go to the cache's own free
mx.set_cache_limit(0)
for _ in range(3):
    mx.eval([mx.ones((300, 300 + i)) * i for i in range(20)])
del arrays, y, early
mx.clear_cache()
z = mx.ones((100_000,))
print(json.dumps({"loaded": loaded, "aligned": _build.aligned(), "offsets": offsets,
                  "sizes": [int(np.prod(s)) * 4 for s in sizes], "z": float(z.sum()),
                  "finite": bool(np.isfinite(total))}))
"""


def _run(env_extra: dict) -> dict:
    import os
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # no abort, at exit either
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_arrays_get_64_byte_aligned_data_and_every_block_is_freed_by_its_own_free():
    if _build.load() is None:
        pytest.skip(f"CPU kernels unavailable: {_build.error()}")
    out = _run({"MLXFLOW_ALIGN": "auto"})
    assert out["loaded"] and out["aligned"] and out["finite"]
    assert out["z"] == 100_000
    big = [off for off, size in zip(out["offsets"], out["sizes"] + [2048 * 300 * 4]) if size >= 4096]
    assert big and all(off == 0 for off in big), out["offsets"]


def test_mlxflow_align_off_leaves_mlx_s_allocator_alone():
    if _build.load() is None:
        pytest.skip(f"CPU kernels unavailable: {_build.error()}")
    out = _run({"MLXFLOW_ALIGN": "off"})
    assert out["loaded"] and not out["aligned"] and out["finite"]
    # MLX's own layout: the 8-byte size header in front of malloc's 16-byte aligned memory
    assert {off % 16 for off in out["offsets"]} == {8}, out["offsets"]
