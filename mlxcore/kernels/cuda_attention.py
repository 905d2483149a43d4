"""Attention on MLX-CUDA through our own cuDNN graph (`csrc_cuda/cudnn_attention.cpp`).

MLX-CUDA's `mx.fast.scaled_dot_product_attention` runs cuDNN's flash attention too, but it always
asks for a bottom-right causal mask. For the square attention of a training step (as many keys as
queries) that is the same mask as top-left, yet cuDNN's backward then runs slower (README,
"Attention through our own cuDNN graph"). This module builds the graph with the top-left mask: the
same kernels' arithmetic, the same values up to the order of cuDNN's float32 accumulation.

It is a C++ extension (a custom MLX primitive pair: forward, and a vjp node for the backward),
built on first use like the CPU kernels (`_build.py`), from headers a CUDA install of MLX already
has beside it: MLX's, cuDNN's (the `nvidia-cudnn` wheel), CUDA's runtime (the `nvidia-cuda-runtime`
wheel or a toolkit) and cuDNN's header-only frontend (`pip install nvidia-cudnn-frontend`, the
`cuda` extra). Without any of them calls keep MLX's attention.

On the GPU it follows MLX-CUDA's own cuDNN attention in everything but the mask: outputs and
workspace come from MLX's stream-ordered allocator (through an empty `mx.fast.cuda_kernel`, since
`cu::malloc_async` is not exported), and cuDNN populates a CUDA graph through its native API that
MLX-CUDA's command graph takes as a child node.

On by default on CUDA (an H100: its errors those of MLX's attention, 0.92x its forward + backward
time, 0.95x the 200mb step's); `MLXFLOW_CUDA_LAYERS` without `attention` keeps MLX's.
`MLXFLOW_CUDA_ATTENTION_TRACE=1` prints each step of building and running the graphs and, on a
crash, the native frames as library + offset for `addr2line`.

Environment: `CUDNN_FRONTEND_INCLUDE`, `CUDNN_INCLUDE`, `CUDA_HOME` point at headers found nowhere
else.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import mlx.core as mx

from mlxcore.kernels import _build, cuda

SRC_DIR = Path(__file__).resolve().parent / "csrc_cuda"
HEADERS = {"cuda": ("cuda.h", "cuda_runtime.h"), "cudnn": ("cudnn.h",), "frontend": ("cudnn_frontend.h",)}


def _nvidia_dirs(sub: str) -> list[Path]:
    """`nvidia/*/<sub>` directories of the pip CUDA wheels (the `nvidia` namespace package)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += [Path(p) for p in sorted(glob.glob(os.path.join(root, "*", sub)))
                  + sorted(glob.glob(os.path.join(root, "*", "*", sub)))]
    return found


def _frontend_dirs() -> list[Path]:
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        return [Path(distribution("nvidia-cudnn-frontend").locate_file("include"))]
    except (ImportError, PackageNotFoundError):
        return []


def _find(kind: str) -> Path:
    """The include directory holding `HEADERS[kind]`, or KernelsUnavailable naming what to install."""
    env = {"cuda": "CUDA_HOME", "cudnn": "CUDNN_INCLUDE", "frontend": "CUDNN_FRONTEND_INCLUDE"}[kind]
    candidates = []
    if os.environ.get(env):
        base = Path(os.environ[env])
        candidates += [base, base / "include"]
    candidates += _frontend_dirs() if kind == "frontend" else _nvidia_dirs("include")
    if kind != "frontend":
        candidates += [Path("/usr/local/cuda/include"), Path("/usr/include")]
    for d in candidates:
        if all((d / h).is_file() for h in HEADERS[kind]):
            return d
    hint = {"cuda": "the CUDA runtime headers (pip install nvidia-cuda-runtime, or a CUDA toolkit)",
            "cudnn": "cuDNN's headers (the nvidia-cudnn wheel that MLX-CUDA installs)",
            "frontend": "cuDNN's frontend headers (pip install nvidia-cudnn-frontend)"}[kind]
    raise _build.KernelsUnavailable(f"{' and '.join(HEADERS[kind])} not found: needs {hint}; or set {env}")


def _library(name: str) -> Path | None:
    for d in _nvidia_dirs("lib") + [Path("/usr/local/cuda/lib64"), Path("/usr/lib/x86_64-linux-gnu")]:
        hits = sorted(d.glob(name + ".so*"))
        if hits:
            return hits[0]
    return None


def _configure() -> dict:
    if not sys.platform.startswith("linux"):
        raise _build.KernelsUnavailable(f"{sys.platform}: MLX-CUDA runs on Linux only")
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise _build.KernelsUnavailable("this MLX has no CUDA backend here (not an mlx-cuda install, or no GPU)")
    incs = [SRC_DIR / "shim", _find("cuda"), _find("cudnn"), _find("frontend")]
    link = []
    for name in ("libcudnn", "libcudart"):
        lib = _library(name)
        if lib is None:
            if name == "libcudnn":
                raise _build.KernelsUnavailable("libcudnn.so not found (the nvidia-cudnn wheel)")
            continue
        link += [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
    # headers upgraded in place keep their paths: their version headers go into the cache key too
    versions = [(d / h).read_text(errors="replace") for d, h in ((incs[2], "cudnn_version.h"),
                (incs[3], "cudnn_frontend_version.h")) if (d / h).is_file()]
    # The driver API calls of cuDNN's frontend (cuGraph*) resolve through libmlx.so, which needs
    # libcuda.so.1: linking the toolkit's stub here could shadow the real driver. Not stripped, with
    # line tables: MLXFLOW_CUDA_ATTENTION_TRACE's crash report gives offsets for addr2line.
    return dict(common=["-DCUDNN_FRONTEND_SKIP_JSON_LIB", *(f"-I{d}" for d in incs)],
                kflags=["-O2", "-g1"], link=link,
                key=[str(d) for d in incs] + link + versions)


EXTENSION = _build.Extension("_mlxflow_cuda", SRC_DIR, ["cudnn_attention.cpp"],
                             "cuDNN attention", _configure)


def _ext():
    return EXTENSION.load() if cuda.layer_on("attention") else None


def supported(q: mx.array, k: mx.array, v: mx.array, causal: bool) -> bool:
    """Whether cuDNN's flash attention takes these inputs, as this module calls it: bfloat16 /
    float16, q [B, H, T, D], k = v [B, Hkv, S, D] with H a multiple of Hkv and D a multiple of 8
    up to 128, and, with the causal mask, as many keys as queries (its two alignments agree)."""
    return (q.ndim == k.ndim == v.ndim == 4 and q.dtype == k.dtype == v.dtype
            and q.dtype in (mx.bfloat16, mx.float16) and tuple(k.shape) == tuple(v.shape)
            and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] and k.shape[1] > 0
            and q.shape[1] % k.shape[1] == 0 and q.shape[3] % 8 == 0 and q.shape[3] <= 128
            and q.size > 0 and k.size > 0 and (not causal or q.shape[2] == k.shape[2]))


def applies(q: mx.array, k: mx.array, v: mx.array, causal: bool) -> bool:
    """Whether `attention` runs here for these inputs: `supported`, on CUDA, with the extension."""
    return supported(q, k, v, causal) and _ext() is not None


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = True) -> mx.array:
    """softmax(scale * q k^T [+ causal mask]) v through cuDNN; call only where `applies`."""
    return _ext().attention(q, k, v, float(scale), bool(causal))


def status() -> str:
    """What attention runs on CUDA, for `kernels.status()`."""
    if not cuda.layer_on("attention"):
        return "MLX's attention"
    return "cuDNN attention, top-left causal mask" if _ext() is not None else f"MLX's attention ({EXTENSION.error()})"
