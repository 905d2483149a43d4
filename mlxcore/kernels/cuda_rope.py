"""RoPE on the heads' projection layout as one CUDA kernel each way (`mx.fast.cuda_kernel`).

mlx-lm's attention views each projection `[B, T, H*D]` as `[B, H, T, D]` (a transpose, no copy)
and ropes that view. MLX's CUDA `rope` keeps the input's layout for its output, which is what
the cuDNN attention after it wants, but reads and writes two bytes per thread with a `sin` and a
`cos` per pair: on an H100 (200mb, bf16, B32xT1024) its 60 launches a step took 3.9 ms of kernel
time, about a third of the memory bandwidth (README, "Kernel by kernel").

`rope` here computes the same rotation over the same layout: it takes the view back to its
row-major `[B, T, H, D]` (free when it is the projection's view), rotates each head's row with
16-byte loads, the angles' cosines and sines read from a small float32 table (one row of `dims`
values per position), and hands back the `[B, H, T, D]` view of its `[B, T, H, D]` output. The
backward is the inverse rotation by the same kernel. Values match `mx.fast.rope` to float32
rounding of the angles (tests: the GPU subset against float64; on the CPU, the host side through
a stand-in of the kernel).

`supports(...)` says which calls it takes: a float dtype, an int offset, no custom `freqs`, and
rows that split into 16-byte pieces (head_dim 64 in bf16: four threads a head). `mlxcore.kernels.rope`
sends training-sized inputs here on CUDA (`MLXFLOW_CUDA_LAYERS=off` keeps MLX's: `cuda.layer_on`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlxcore.kernels import cuda

VERSION = 2
BLOCK = 256


def on() -> bool:
    return cuda.layer_on("rope")


def supports(dtype: mx.Dtype, head_dim: int, dims: int, traditional: bool) -> bool:
    vec = cuda.vec(dtype) if dtype in cuda.FLOAT_TYPES else 0
    rotated = dims if traditional else dims // 2
    return (vec > 0 and 0 < dims <= head_dim and dims % 2 == 0 and rotated % vec == 0
            and (head_dim - dims) % vec == 0)


def _threads_per_row(dtype: mx.Dtype, head_dim: int, dims: int, traditional: bool) -> int:
    vec = cuda.vec(dtype)
    return (dims if traditional else dims // 2) // vec + (head_dim - dims) // vec


@lru_cache(maxsize=64)
def table(positions: int, offset: int, dims: int, base: float, scale: float) -> mx.array:
    """float32 [positions, dims]: per position, the cosines of its dims / 2 angles then their sines,
    the angles computed as MLX's kernel computes them (float32 `exp2(-(i / half) * log2(base))`
    times `scale * position`); the cosines and sines rounded from float64."""
    half = dims // 2
    d = np.arange(half, dtype=np.float32) / np.float32(half)
    inv_freq = np.exp2(-d * np.float32(math.log2(base)))
    pos = np.float32(scale) * np.arange(offset, offset + positions, dtype=np.float32)
    theta = (pos[:, None] * inv_freq[None, :]).astype(np.float64)
    return mx.array(np.concatenate([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32))


def _source(dtype: mx.Dtype, head_dim: int, dims: int, traditional: bool, forward: bool) -> tuple[str, str]:
    vec, half = cuda.vec(dtype), dims // 2
    rotated_threads = (dims if traditional else half) // vec
    header = cuda.vector_io(dtype) + f"""
namespace mlxflow_rope {{
using namespace mlxflow_vec;
constexpr int D = {head_dim}, DIMS = {dims}, HALF = {half}, ROT = {rotated_threads};
constexpr int TPR = ROT + (D - DIMS) / VEC;  // threads per row
// (x1, x2) rotated by the angle whose cosine is c and sine s: forward as MLX's rope writes it,
// backward its inverse (MLX's `forward=false` branch)
__device__ __forceinline__ void rotate(float x1, float x2, float c, float s, float& r1, float& r2) {{
  {"r1 = x1 * c - x2 * s; r2 = x1 * s + x2 * c;" if forward else "r1 = x2 * s + x1 * c; r2 = x2 * c - x1 * s;"}
}}
}}  // namespace mlxflow_rope
"""
    if traditional:  # pairs (2p, 2p + 1): a thread's VEC elements hold VEC / 2 pairs
        rotate = """
    const int e0 = k * VEC;
    alignas(16) T a[VEC];
    load(x + e0, a, VEC, aligned);
    float r[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const int p = (e0 + j) / 2;
      rotate(::mlxflow::f32(a[j]), ::mlxflow::f32(a[j + 1]), cs[p], cs[HALF + p], r[j], r[j + 1]);
    }
    store(y + e0, r, VEC, aligned);"""
    else:  # pairs (i, i + HALF): a thread rotates VEC of them
        rotate = """
    const int i0 = k * VEC;
    alignas(16) T a[VEC], b[VEC];
    load(x + i0, a, VEC, aligned);
    load(x + HALF + i0, b, VEC, aligned);
    float r1[VEC], r2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      rotate(::mlxflow::f32(a[j]), ::mlxflow::f32(b[j]), cs[i0 + j], cs[HALF + i0 + j], r1[j], r2[j]);
    store(y + i0, r1, VEC, aligned);
    store(y + HALF + i0, r2, VEC, aligned);"""
    source = f"""
  using namespace mlxflow_rope;
  const int64_t rows = meta[0], heads = meta[1], positions = meta[2];
  const int64_t gid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gid / TPR;
  const int k = int(gid - row * TPR);
  if (row >= rows) return;
  const bool aligned = ((reinterpret_cast<unsigned long long>(inp) | reinterpret_cast<unsigned long long>(out)) & 15) == 0;
  const T* x = inp + row * D;
  T* y = out + row * D;
  const float* cs = table + ((row / heads) % positions) * DIMS;
  if (k < ROT) {{{rotate}
  }} else {{  // the dims past `dims` pass through
    const int e0 = DIMS + (k - ROT) * VEC;
    alignas(16) T a[VEC];
    load(x + e0, a, VEC, aligned);
    float r[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) r[j] = ::mlxflow::f32(a[j]);
    store(y + e0, r, VEC, aligned);
  }}
"""
    return header, source


@lru_cache(maxsize=None)
def _kernel(dtype: mx.Dtype, head_dim: int, dims: int, traditional: bool, forward: bool):
    header, source = _source(dtype, head_dim, dims, traditional, forward)
    name = (f"mlxflow_rope_v{VERSION}_{str(dtype).split('.')[-1]}_{head_dim}_{dims}_"
            f"{'trad' if traditional else 'half'}_{'fwd' if forward else 'bwd'}")
    return mx.fast.cuda_kernel(name=name, input_names=["meta", "table", "inp"], output_names=["out"],
                               source=source, header=header)


def _launch(x: mx.array, tab: mx.array, dims: int, traditional: bool, forward: bool) -> mx.array:
    """The kernel over x [B, T, H, D] (row-major; MLX copies any other layout first)."""
    B, T, H, D = x.shape
    rows = B * T * H
    threads = rows * _threads_per_row(x.dtype, D, dims, traditional)
    meta = mx.array([rows, H, T], dtype=mx.int64)
    (y,) = _kernel(x.dtype, D, dims, traditional, forward)(
        inputs=[meta, tab, x], output_shapes=[x.shape], output_dtypes=[x.dtype],
        grid=(-(-threads // BLOCK) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1))
    return y


@lru_cache(maxsize=None)
def _rope_bthd(dims: int, traditional: bool):
    """The custom function for one (dims, traditional): x [B, T, H, D] and its table -> y [B, T, H, D]."""

    @mx.custom_function
    def rope_bthd(x, tab):
        return _launch(x, tab, dims, traditional, forward=True)

    @rope_bthd.vjp
    def rope_bthd_vjp(primals, cotangent, output):
        x, tab = primals
        return _launch(cotangent, tab, dims, traditional, forward=False), mx.zeros_like(tab)

    return rope_bthd


def rope(x: mx.array, dims: int, *, traditional: bool, base: float, scale: float, offset: int = 0) -> mx.array:
    """`mx.fast.rope(x, dims, traditional=..., base=..., scale=..., offset=offset)` for x [B, H, T, D]
    (`supports` must hold), as the `[B, H, T, D]` view of a row-major `[B, T, H, D]` result."""
    B, H, T, D = x.shape
    tab = table(T, int(offset), dims, float(base), float(scale))
    y = _rope_bthd(dims, bool(traditional))(x.transpose(0, 2, 1, 3), tab)
    return y.transpose(0, 2, 1, 3)
