"""`mlxflow doctor`: which device, backend and BLAS MLX uses here, and a measured sgemm rate."""

from __future__ import annotations

import platform
import time

import mlxcore
import mlx.core as mx


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def backend_packages() -> list[str]:
    """Installed MLX backend distributions. mlx-cpu and mlx-cuda-* share mlx/lib/libmlx.so."""
    import importlib.metadata as md

    found = []
    for dist in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal"):
        try:
            found.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return found


def sgemm_gflops(n: int = 1024, repeats: int = 5, device: mx.Device | None = None) -> float:
    """Measured float32 matmul rate, n x n @ n x n, after one warm-up."""
    device = device or mx.default_device()
    with mx.stream(device):
        a = mx.random.normal((n, n))
        b = mx.random.normal((n, n))
        mx.eval(a, b, a @ b)
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e9


def report() -> dict:
    blas, packages = mlxcore.BLAS, backend_packages()
    info = {
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": str(mx.default_device()),
        "backend": backend(),
        "backend_packages": ", ".join(packages) or "-",
        "blas": blas.name,
        "blas_library": blas.path or "-",
        "blas_detail": blas.detail,
        "cpu_sgemm_gflops": round(sgemm_gflops(device=mx.cpu), 1),
    }
    if len([p for p in packages if not p.startswith("mlx-metal")]) > 1:
        info["warning"] = ("several MLX backends are installed and overwrite each other's libmlx.so; "
                           "keep one (README: Other platforms)")
    if backend() != "cpu":
        info["gpu_sgemm_gflops"] = round(sgemm_gflops(n=4096, device=mx.gpu), 1)
    from mlxcore import kernels

    info["kernels"] = kernels.status()  # the training step's own kernels on the default device
    return info


def format_report(info: dict) -> str:
    width = max(map(len, info))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
