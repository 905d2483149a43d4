"""mlxflow's cuDNN attention (`mlxcore.kernels.cuda_attention`) against MLX-CUDA's, on an NVIDIA GPU.

    python bench/cudnn_attention_check.py [--trace] [--skip-speed]

1. Smoke: one tiny forward and backward, each evaluated on its own (with `--trace`, every build
   and run step and, on a crash, the native frames: `MLXFLOW_CUDA_ATTENTION_TRACE=1`).
2. Error: output and dq / dk / dv of ours and of `mx.fast.scaled_dot_product_attention` against a
   float32 reference, for causal and full attention, grouped heads, head sizes 32-128, bf16/fp16.
3. Speed: forward + backward (compiled `mx.grad`) of the 200mb step's attention (B32 x T1024,
   12 heads, 3 kv, 64 dims, bf16), interleaved rounds; prints ours / MLX's median time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--trace", action="store_true", help="MLXFLOW_CUDA_ATTENTION_TRACE=1")
p.add_argument("--skip-speed", action="store_true")
p.add_argument("--rounds", type=int, default=30)
args = p.parse_args()
if args.trace:
    os.environ["MLXFLOW_CUDA_ATTENTION_TRACE"] = "1"
os.environ.setdefault("MLXFLOW_CUDA_LAYERS", "all")

import mlx.core as mx  # noqa: E402

from mlxcore import kernels  # noqa: E402
from mlxcore.kernels import cuda_attention  # noqa: E402

t0 = time.perf_counter()
ext = cuda_attention.EXTENSION.load()
print(f"extension: {'loaded' if ext else cuda_attention.EXTENSION.error()} in {time.perf_counter() - t0:.1f} s;"
      f" cuDNN {ext.cudnn_version() if ext else '-'}; {kernels.status()}", flush=True)
if ext is None:
    sys.exit(1)


def bthd(B, T, H, D, dt):
    """[B, H, T, D] as mlx-lm's attention sees it: a transposed view of [B, T, H, D]."""
    return mx.random.normal((B, T, H, D)).astype(dt).transpose(0, 2, 1, 3)


def reference(q, k, v, scale, causal):
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    s = (q * scale) @ k.transpose(0, 1, 3, 2)
    if causal:
        s = mx.where(mx.arange(k.shape[2])[None] <= mx.arange(q.shape[2])[:, None], s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


def ours(causal, scale):
    return lambda q, k, v: cuda_attention.attention(q, k, v, scale, causal)


def mlx(causal, scale):
    return lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                 mask="causal" if causal else None)


def value_and_grads(fn, q, k, v, w):
    return mx.value_and_grad(lambda q, k, v: (fn(q, k, v).astype(mx.float32) * w).sum(), argnums=(0, 1, 2))(q, k, v)


mx.random.seed(0)
q = bthd(1, 16, 2, 64, mx.bfloat16)
o = cuda_attention.attention(q, q, q, 0.125, True)
mx.eval(o)
print("smoke: forward evaluated", flush=True)
g = mx.grad(lambda a: cuda_attention.attention(a, q, q, 0.125, True).astype(mx.float32).sum())(q)
mx.eval(g)
print("smoke: backward evaluated", flush=True)


def err(a, b):
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


for B, T, H, Hk, D, dt, causal in [(2, 256, 8, 2, 64, mx.bfloat16, True), (2, 200, 4, 4, 128, mx.float16, True),
                                   (2, 128, 6, 3, 32, mx.bfloat16, False), (4, 1024, 12, 3, 64, mx.bfloat16, True)]:
    q, k, v = bthd(B, T, H, D, dt), bthd(B, T, Hk, D, dt), bthd(B, T, Hk, D, dt)
    w = mx.random.normal((B, H, T, D))
    sc = D ** -0.5
    got = {n: value_and_grads(f(causal, sc), q, k, v, w) for n, f in (("ours", ours), ("mlx", mlx))}
    exact = value_and_grads(lambda a, b, c: reference(a, b, c, sc, causal), q, k, v, w)
    outs = {"ours": ours(causal, sc)(q, k, v), "mlx": mlx(causal, sc)(q, k, v), "ref": reference(q, k, v, sc, causal)}
    mx.eval(got, exact, outs)
    print(f"B{B} T{T} H{H}/{Hk} D{D} {dt} causal={causal}: out ours {err(outs['ours'], outs['ref']):.2e} "
          f"mlx {err(outs['mlx'], outs['ref']):.2e}; "
          + "; ".join(f"d{n} ours {err(a, c):.2e} mlx {err(b, c):.2e}"
                      for n, a, b, c in zip("qkv", got["ours"][1], got["mlx"][1], exact[1])), flush=True)

if args.skip_speed:
    sys.exit(0)
B, T, H, Hk, D = 32, 1024, 12, 3, 64
q, k, v = bthd(B, T, H, D, mx.bfloat16), bthd(B, T, Hk, D, mx.bfloat16), bthd(B, T, Hk, D, mx.bfloat16)
w = bthd(B, T, H, D, mx.bfloat16)
steps = {n: mx.compile(mx.grad(lambda q, k, v, f=f: (f(True, D ** -0.5)(q, k, v) * w).astype(mx.float32).sum(),
                               argnums=(0, 1, 2))) for n, f in (("ours", ours), ("mlx", mlx))}
for f in steps.values():
    for _ in range(5):
        mx.eval(f(q, k, v))
times = {n: [] for n in steps}
mx.reset_peak_memory()
for _ in range(args.rounds):
    for n, f in steps.items():
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(f(q, k, v))
        mx.synchronize()
        times[n].append((time.perf_counter() - t) * 1e3)
med = {n: statistics.median(ts) for n, ts in times.items()}
for n, ts in times.items():
    print(f"attention fwd+bwd B{B} T{T} H{H}/{Hk} D{D} bf16, {n}: median {med[n]:.3f} ms, min {min(ts):.3f} ms")
print(f"ours / MLX's: {med['ours'] / med['mlx']:.2f}x the time; peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
