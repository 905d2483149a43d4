"""The CUDA optimizer kernels alone (`mlxcore.kernels.cuda`) against MLX's own arithmetic, on an NVIDIA GPU.

    python bench/cuda_optimizer_kernels.py --preset 200mb --dtype bfloat16            # the default launch shape
    python bench/cuda_optimizer_kernels.py --sweep                                    # + other chunk / ILP sizes
    python bench/cuda_optimizer_kernels.py --moments param                            # plain AdamW's bf16 moments

Times, eagerly (median and min of `--reps` synchronized calls after 3 warm-ups): AdamW over a
preset's parameters as their own tensors, as one flat tensor of the same values, and as a training
step on CUDA runs it (flat parameters and moments kept, each gradient its own array), and the
clip's squared norm both ways, beside MLX's compiled per-tensor arithmetic (`reference_adamw_step`,
per-tensor `square().sum()`) and the memory-bandwidth bound at `--bandwidth` TB/s. The gap between
"tensors" and "flat" is the cost MLX adds per array (allocating each output, tracking each input),
not the kernels' arithmetic. Only runs where the CUDA backend is the default device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlxcore import kernels
from mlxcore.config import ModelConfig
from mlxcore.kernels import cuda
from mlxcore.models.model import from_config, hf_config

SWEEP = [(4096, 1), (16384, 4), (2048, 8), (8192, 8)]


def _time(fn, reps: int) -> tuple[float, float]:
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), min(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "200mb"], default="200mb")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--moments", choices=["float32", "param"], default="float32",
                   help="the moments' dtype: float32 (AdamWFloat32State) or the parameters' (plain AdamW)")
    p.add_argument("--bandwidth", type=float, default=3.35, help="TB/s for the bound (H100 SXM 3.35, H200 4.8)")
    p.add_argument("--sweep", action="store_true", help="also other CHUNK / ILP sizes")
    args = p.parse_args(argv)
    if not cuda.available():
        raise SystemExit(f"cuda_optimizer_kernels: needs MLX's CUDA backend (default device: {mx.default_device()})")

    model = from_config(hf_config(ModelConfig(preset=args.preset, dtype=args.dtype), 6400), seed=0)
    params = [v for _, v in tree_flatten(model.trainable_parameters())]
    grads = [(mx.random.normal(w.shape) * 1e-2).astype(w.dtype) for w in params]
    m, v = ([mx.zeros(w.shape, mx.float32 if args.moments == "float32" else w.dtype) for w in params] for _ in range(2))
    flat = [[mx.concatenate([x.reshape(-1) for x in xs])] for xs in (params, grads, m, v)]  # one tensor each
    mx.eval(params, grads, m, v, flat)
    n = sum(w.size for w in params)
    size = params[0].dtype.size
    m_size = m[0].dtype.size
    bound_adamw = n * (3 * size + 4 * m_size) / (args.bandwidth * 1e12) * 1e3  # p, g read, p written; m, v both ways
    bound_norm = n * size / (args.bandwidth * 1e12) * 1e3
    hyper = (mx.array(1e-3), mx.array(0.5), mx.array(0.9), 0.9, 0.95, 1e-8, 0.1)
    print(f"mlx {mx.__version__} on {mx.default_device()}; {args.preset} {args.dtype}, {str(m[0].dtype).split('.')[-1]} moments: {len(params)} tensors, "
          f"{n / 1e6:.1f}M parameters; bound at {args.bandwidth} TB/s: AdamW {bound_adamw:.2f} ms, norm {bound_norm:.3f} ms")
    out = {}
    default = (cuda.CHUNK, cuda.ILP)
    for chunk, ilp in [default] + (SWEEP if args.sweep else []):
        cuda.CHUNK, cuda.ILP = chunk, ilp
        for cached in (cuda._adamw_kernel, cuda._adamw_flat_kernel, cuda._norm_kernel, cuda._meta, cuda._flat_meta):
            cached.cache_clear()
        row = {"adamw_tensors": _time(lambda: cuda.adamw_step(params, grads, m, v, *hyper), args.reps),
               "adamw_flat": _time(lambda: cuda.adamw_step(*flat, *hyper), args.reps),
               # what a training step on CUDA runs: flat parameters / moments, each gradient in place
               "adamw_kept": _time(lambda: cuda.adamw_flat_step(flat[0][0], flat[2][0], flat[3][0], grads, *hyper),
                                   args.reps),
               "norm_tensors": _time(lambda: cuda.squared_norm(grads, hyper[1]), args.reps),
               "norm_flat": _time(lambda: cuda.squared_norm(flat[1], hyper[1]), args.reps)}
        out[f"kernels {chunk}/{ilp}"] = row
    cuda.CHUNK, cuda.ILP = default
    for cached in (cuda._adamw_kernel, cuda._adamw_flat_kernel, cuda._norm_kernel, cuda._meta, cuda._flat_meta):
        cached.cache_clear()
    ref = mx.compile(lambda *a: kernels.reference_adamw_step(*a))
    norm = mx.compile(lambda gs, s: sum((g * s.astype(g.dtype)).square().sum() for g in gs))
    out["mlx compiled"] = {"adamw_tensors": _time(lambda: ref(params, grads, m, v, *hyper), args.reps),
                           "adamw_flat": _time(lambda: ref(*flat, *hyper), args.reps),
                           "norm_tensors": _time(lambda: norm(grads, hyper[1]), args.reps),
                           "norm_flat": _time(lambda: norm(flat[1], hyper[1]), args.reps)}
    columns = {"adamw_tensors": "AdamW, tensors", "adamw_flat": "AdamW, flat", "adamw_kept": "AdamW, kept",
               "norm_tensors": "norm, tensors", "norm_flat": "norm, flat"}
    print(f"{'(ms, median / min)':<22}" + "".join(f"{c:>18}" for c in columns.values()))
    for name, row in out.items():
        print(f"{name:<22}" + "".join(f"{row[k][0]:>10.3f} / {row[k][1]:<5.3f}" if k in row else f"{'-':>18}"
                                      for k in columns))
    return out


if __name__ == "__main__":
    main()
