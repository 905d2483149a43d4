"""Load a fast BLAS for MLX's Linux CPU backend before `mlx.core` is imported.

The `mlx[cpu]` wheel links the reference Netlib BLAS (~5 GFLOP/s sgemm on a 2-core x86 box).
Python opens extension modules with RTLD_NOW, so `libmlx.so` binds `cblas_sgemm` & co. the
moment `mlx.core` is imported; a library opened earlier with RTLD_GLOBAL sits in the global
lookup scope, which the dynamic linker searches *before* libmlx's own dependencies. Opening
MKL's single dynamic library (`libmkl_rt`) that way makes every MLX matmul run on MKL
(measured 150-370 GFLOP/s here). A system OpenBLAS is the fallback.

This module must not import mlx. `MLXFLOW_BLAS` chooses: `auto` (default), `mkl`,
`openblas`, `reference` (leave MLX's own BLAS alone), or a path to a BLAS shared library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass

FIX_HINT = "pip install mkl (Linux x86-64) or apt install libopenblas0"
OMP_WAIT_POLICY = "passive"  # mlxcore's default on Linux (see ensure_fast_blas)


@dataclass(frozen=True)
class BlasInfo:
    name: str  # mkl | openblas | custom | reference | accelerate | unchanged
    path: str | None
    detail: str


_info: BlasInfo | None = None


def _mkl_paths() -> list[str]:
    found = []
    try:
        files = importlib.metadata.files("mkl") or []
        dist = importlib.metadata.distribution("mkl")
        found += [str(dist.locate_file(f)) for f in files if "libmkl_rt.so" in str(f)]
    except importlib.metadata.PackageNotFoundError:
        pass
    for prefix in {sys.prefix, sys.base_prefix}:
        found += glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))
    return [os.path.realpath(p) for p in found if os.path.exists(p)]


def _openblas_paths() -> list[str]:
    found = []
    name = ctypes.util.find_library("openblas")
    if name:
        found.append(name)
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        found += sorted(glob.glob(os.path.join(d, "libopenblas*.so*")))
    return found


def _try_load(name: str, paths: list[str]) -> BlasInfo | None:
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return BlasInfo(name, path, f"{name} loaded RTLD_GLOBAL before mlx.core")
        except OSError:
            continue
    return None


def ensure_fast_blas() -> BlasInfo:
    """Idempotent. Returns which BLAS MLX's CPU backend will use."""
    global _info
    if _info is not None:
        return _info
    choice = os.environ.get("MLXFLOW_BLAS", "auto").strip() or "auto"
    if sys.platform == "darwin":
        _info = BlasInfo("accelerate", None, "macOS: MLX uses Accelerate/Metal")
        return _info
    if not sys.platform.startswith("linux") or choice == "reference":
        _info = BlasInfo("reference", None, f"MLXFLOW_BLAS={choice}: MLX's bundled BLAS")
        return _info
    # Before any OpenMP runtime loads (MKL's: Intel's, or GNU's when PyTorch brought it first): a
    # team that waits passively frees the core when MKL's GEMM ends. With the default (spin for a
    # while), MKL's idle threads spun through our CPU kernels' own threads, the autograd scheduler
    # and Python between GEMMs: a `tiny` step ran 641-665 ms against 600-618 ms, `200mb` 11.4-12.4 s
    # against 10.8 s, decode unchanged (README "Fast CPU kernels"). The user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    if "mlx.core" in sys.modules:
        _info = BlasInfo(
            "unchanged", None, "mlx.core was imported before mlxcore; import mlxcore first"
        )
        _warn(_info.detail)
        return _info
    if os.sep in choice:
        _info = _try_load("custom", [choice])
    else:
        order = {"auto": ["mkl", "openblas"], "mkl": ["mkl"], "openblas": ["openblas"]}
        if choice not in order:
            raise ValueError(
                f"MLXFLOW_BLAS={choice!r}: expected auto, mkl, openblas, reference or a path"
            )
        finders = {"mkl": _mkl_paths, "openblas": _openblas_paths}
        for name in order[choice]:
            if name == "mkl" and platform.machine() not in ("x86_64", "AMD64"):
                continue
            _info = _try_load(name, finders[name]())
            if _info:
                break
    if _info is None:
        _info = BlasInfo("reference", None, f"no fast BLAS found ({FIX_HINT})")
        _warn(f"MLX will use the slow reference BLAS (~5 GFLOP/s); fix: {FIX_HINT}")
    return _info


def _warn(msg: str) -> None:
    print(f"mlxflow: warning: {msg}", file=sys.stderr)


def _thread_api():
    """(get, set) of the loaded BLAS's thread count, or None (reference BLAS, macOS, unknown)."""
    info = ensure_fast_blas()
    if info.path is None or info.name not in ("mkl", "openblas"):
        return None
    try:
        lib = ctypes.CDLL(info.path)  # already loaded: the same handle
        names = {"mkl": ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),  # C API (lower case: Fortran)
                 "openblas": ("openblas_get_num_threads", "openblas_set_num_threads")}[info.name]
        get, set_ = (getattr(lib, n) for n in names)
    except (OSError, AttributeError):
        return None
    get.restype, set_.argtypes, set_.restype = ctypes.c_int, [ctypes.c_int], None
    return get, set_


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with the fast BLAS (MKL / OpenBLAS) limited to `n` threads, process-wide.

    For small matmuls called in a tight loop (batched decoding: [64, 256] x [256, 768]): MKL's
    OpenMP team costs a barrier per call, and on a shared 2-core VM a descheduled team member
    makes the other spin (measured: a 48-step B=64 decode took 17-21 s with 2 MKL threads under
    load 5, 1.2-1.3 s with 1). A no-op when no such BLAS was loaded.
    """
    api = _thread_api()
    if api is None:
        yield
        return
    get, set_ = api
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)
