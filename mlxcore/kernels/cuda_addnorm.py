"""The residual add and the RMSNorm after it, `s = a + b; y = rms_norm(s) * w`, as one CUDA kernel each way.

A pre-norm decoder layer adds each sub-layer's output to the residual stream and normalises the
sum for the next sub-layer: `h = x + attn(...)`, `post_attention_layernorm(h)`, `out = h +
mlp(...)`, the next layer's `input_layernorm(out)`. MLX runs each add as a pass of its own, and
autodiff adds the two gradients that reach every residual sum (the norm's and the next add's):
on an H100 (200mb, bf16, B32xT1024) 60 `binary_vv<Add>` launches, 3.2 ms of kernel time a
step, where torch's compiler folds both into its RMSNorm kernels (README, "Kernel by kernel").
Here the forward reads `a` and `b` once and writes the sum and the normalised sum; the backward
reads the sum, both cotangents and the weight and writes the sum's whole gradient (the
cotangent of `s` plus the norm's) and each block's share of the weight's gradient (its warps'
sums added in shared memory in a fixed order), which a column-sum kernel adds up: deterministic.
So no add is left between layers (`kernels.patch` hands each layer's fused output to the next
layer's norm); the README ("The residual adds and the loss as kernels") has what it saves.

Arithmetic: the sum is rounded to the inputs' dtype, as `a + b` is, and the norm is taken of
that rounded sum, so `s` and `y` are the unfused ops' values up to the norm's own rounding
(computed in float32, rounded once). One warp owns a row; each lane holds `PIECES` 16-byte
pieces of it in registers, so a kernel is built per dtype and `PIECES` (`D` up to
`PIECES * 32 * VEC`, `MAX_PIECES`); wider rows, rows not a whole number of pieces and other
dtypes take MLX's ops (`supports`). Values are checked against float64 by the GPU subset.
"""

from __future__ import annotations

from functools import lru_cache

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlxcore.kernels import cuda

VERSION = 3
BLOCK = 256  # 8 warps
MAX_WARPS = 8192  # the backward's warps (4 rows each at B32 x T1024); a block of them writes one partial row
MAX_PIECES = 8  # 16-byte pieces of a row per lane: D <= 2048 in bf16 / f16, 1024 in f32


def on() -> bool:
    return cuda.layer_on("addnorm")


def pieces(dtype: mx.Dtype, d: int) -> int:
    return -(-d // (32 * cuda.vec(dtype)))


def supports(a: mx.array, b: mx.array, weight: mx.array) -> bool:
    d = a.shape[-1] if a.ndim else 0
    return (a.dtype in cuda.FLOAT_TYPES and a.dtype == b.dtype == weight.dtype and tuple(a.shape) == tuple(b.shape)
            and a.size > 0 and weight.ndim == 1 and weight.shape[0] == d and d % cuda.vec(a.dtype) == 0
            and pieces(a.dtype, d) <= MAX_PIECES)


def _header(dtype: mx.Dtype, n_pieces: int) -> str:
    return cuda.vector_io(dtype) + f"""
namespace mlxflow_addnorm {{
using namespace mlxflow_vec;
constexpr int PIECES = {n_pieces};
__device__ __forceinline__ float warp_sum(float v) {{
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}}
}}  // namespace mlxflow_addnorm
"""


# Every lane of a warp runs the same rows (the loop bound is the warp's), so the shuffles see all 32.
_PROLOGUE = """
  using namespace mlxflow_addnorm;
  const int64_t rows = meta[0];
  const int d = int(meta[1]);
  const float eps = eps_in[0];
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const bool whole = ((0ull {pointers}) & 15) == 0;
  alignas(16) T wv[PIECES][VEC];
#pragma unroll
  for (int p = 0; p < PIECES; ++p) {
    const int col = (p * 32 + lane) * VEC;
    if (col < d) load(w + col, wv[p], VEC, whole);
  }
"""


def _bits(*pointers: str) -> str:
    return "".join(f" | reinterpret_cast<unsigned long long>({p})" for p in pointers)


def _source(forward: bool) -> str:
    if forward:
        return _PROLOGUE.replace("{pointers}", _bits("a", "b", "w", "s", "y")) + """
  for (int64_t row = warp; row < rows; row += warps) {
    const int64_t base = row * d;
    float h[PIECES][VEC];
    float ss = 0.0f;
#pragma unroll
    for (int p = 0; p < PIECES; ++p) {
      const int col = (p * 32 + lane) * VEC;
      if (col < d) {
        alignas(16) T av[VEC], bv[VEC];
        load(a + base + col, av, VEC, whole);
        load(b + base + col, bv, VEC, whole);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          h[p][j] = ::mlxflow::rounded(::mlxflow::f32(av[j]) + ::mlxflow::f32(bv[j]), (const T*)nullptr);
          ss += h[p][j] * h[p][j];
        }
        store(s + base + col, h[p], VEC, whole);
      }
    }
    const float r = rsqrtf(warp_sum(ss) / d + eps);
#pragma unroll
    for (int p = 0; p < PIECES; ++p) {
      const int col = (p * 32 + lane) * VEC;
      if (col < d) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = ::mlxflow::f32(wv[p][j]) * (h[p][j] * r);
        store(y + base + col, o, VEC, whole);
      }
    }
  }
"""
    # d(rms_norm(s) * w)/ds applied to dy: r * g - (r^3 / d) * (g . s) * s, with g = dy * w.
    return _PROLOGUE.replace("{pointers}", _bits("s", "w", "ds", "dy", "d_s")) + """
  float acc[PIECES][VEC];
#pragma unroll
  for (int p = 0; p < PIECES; ++p)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[p][j] = 0.0f;
  for (int64_t row = warp; row < rows; row += warps) {
    const int64_t base = row * d;
    // kept in the dtype (half the registers of float); all three loaded before the row's sums
    alignas(16) T sv[PIECES][VEC], yv[PIECES][VEC], dv[PIECES][VEC];
    float ss = 0.0f, dot = 0.0f;
#pragma unroll
    for (int p = 0; p < PIECES; ++p) {
      const int col = (p * 32 + lane) * VEC;
      if (col < d) {
        load(s + base + col, sv[p], VEC, whole);
        load(dy + base + col, yv[p], VEC, whole);
        load(ds + base + col, dv[p], VEC, whole);
      }
    }
#pragma unroll
    for (int p = 0; p < PIECES; ++p) {
      const int col = (p * 32 + lane) * VEC;
      if (col < d) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float h = ::mlxflow::f32(sv[p][j]);
          ss += h * h;
          dot += ::mlxflow::f32(yv[p][j]) * ::mlxflow::f32(wv[p][j]) * h;
        }
      }
    }
    const float r = rsqrtf(warp_sum(ss) / d + eps);
    const float k = r * r * r * warp_sum(dot) / d;
#pragma unroll
    for (int p = 0; p < PIECES; ++p) {
      const int col = (p * 32 + lane) * VEC;
      if (col < d) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float h = ::mlxflow::f32(sv[p][j]), c = ::mlxflow::f32(yv[p][j]);
          o[j] = ::mlxflow::f32(dv[p][j]) + (r * (c * ::mlxflow::f32(wv[p][j])) - k * h);
          acc[p][j] += c * (h * r);
        }
        store(d_s + base + col, o, VEC, whole);
      }
    }
  }
  // The block's warps add their sums into shared memory one warp at a time (a fixed order, so the
  // result is deterministic), and the block writes one row of the weight's partial gradient.
  __shared__ float red[PIECES * 32 * VEC];
  const int in_block = threadIdx.x >> 5;
  for (int k = 0; k < int(blockDim.x >> 5); ++k) {
    if (in_block == k) {
#pragma unroll
      for (int p = 0; p < PIECES; ++p) {
        const int col = (p * 32 + lane) * VEC;
        if (col < d) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) red[col + j] = (k == 0 ? 0.0f : red[col + j]) + acc[p][j];
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < d; c += blockDim.x) d_w_part[int64_t(blockIdx.x) * d + c] = red[c];
"""


# The weight's gradient: the column sums of the blocks' partial rows [P, D] (float32), rounded once
# to the weight's dtype. A block owns 32 columns; its 32 x 32 threads each add every 32nd row of
# one column, then one thread a column adds those 32 sums in order.
_COLUMN_SUM = """
  const int64_t n_rows = meta[0];
  const int d = int(meta[1]);
  const int col = blockIdx.x * 32 + threadIdx.x;
  __shared__ float sums[32][33];
  float t = 0.0f;
  if (col < d)
    for (int64_t r = threadIdx.y; r < n_rows; r += 32) t += part[r * d + col];
  sums[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    float total = 0.0f;
    for (int k = 0; k < 32; ++k) total += sums[k][threadIdx.x];
    ::mlxflow::put(out + col, total);
  }
"""


@lru_cache(maxsize=None)
def _kernel(dtype: mx.Dtype, n_pieces: int, forward: bool):
    name = f"mlxflow_addnorm_v{VERSION}_{str(dtype).split('.')[-1]}_{n_pieces}_{'fwd' if forward else 'bwd'}"
    inputs = ["meta", "eps_in", "a", "b", "w"] if forward else ["meta", "eps_in", "s", "w", "ds", "dy"]
    outputs = ["s", "y"] if forward else ["d_s", "d_w_part"]
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=_source(forward),
                               header=_header(dtype, n_pieces))


@lru_cache(maxsize=None)
def _column_sum_kernel():
    return mx.fast.cuda_kernel(name=f"mlxflow_addnorm_colsum_v{VERSION}", input_names=["meta", "part"],
                               output_names=["out"], source=_COLUMN_SUM, header=cuda.CONVERT)


def warps_for(rows: int, forward: bool) -> int:
    """Warps a launch runs: whole blocks of `BLOCK // 32`, one a row in the forward; in the
    backward up to `MAX_WARPS` (a multiple of that, or fewer than one block), each block writing
    one row of the weight's partial gradient."""
    per_block = BLOCK // 32
    whole = -(-rows // per_block) * per_block
    return max(1, whole if forward else min(whole, MAX_WARPS))


def _launch(arrays: list, eps: float, forward: bool) -> list:
    """The forward (`arrays` = a, b, w: returns s, y) or the backward (s, w, ds, dy: returns the
    sum's gradient and the weight's partial gradients, float32 [blocks, D])."""
    first = arrays[0]
    d = first.shape[-1]
    rows = first.size // d
    threads = warps_for(rows, forward) * 32  # exactly those warps: the kernel strides rows by its grid's
    block = min(BLOCK, threads)
    meta = mx.array([rows, d], dtype=mx.int64)
    eps_in = mx.array([eps], dtype=mx.float32)
    shapes = [first.shape] * 2 if forward else [first.shape, (threads // block, d)]
    dtypes = [first.dtype] * 2 if forward else [first.dtype, mx.float32]
    return _kernel(first.dtype, pieces(first.dtype, d), forward)(
        inputs=[meta, eps_in, *arrays], output_shapes=shapes, output_dtypes=dtypes,
        grid=(threads, 1, 1), threadgroup=(block, 1, 1))


def _column_sum(part: mx.array, dtype: mx.Dtype) -> mx.array:
    """`part.sum(axis=0).astype(dtype)` for the backward's partial rows."""
    n_rows, d = part.shape
    meta = mx.array([n_rows, d], dtype=mx.int64)
    return _column_sum_kernel()(inputs=[meta, part], output_shapes=[(d,)], output_dtypes=[dtype],
                                grid=(-(-d // 32) * 32, 32, 1), threadgroup=(32, 32, 1))[0]


@lru_cache(maxsize=None)
def _function(eps: float):
    @mx.custom_function
    def add_rms_norm(a, b, weight):
        return tuple(_launch([a, b, weight], eps, forward=True))

    @add_rms_norm.vjp
    def _vjp(primals, cotangents, outputs):
        weight = primals[2]
        d_s, d_w_part = _launch([outputs[0], weight, cotangents[0], cotangents[1]], eps, forward=False)
        return d_s, d_s, _column_sum(d_w_part, weight.dtype)

    return add_rms_norm


def add_rms_norm(a: mx.array, b: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(a + b, rms_norm(a + b) * weight) (`supports` must hold); the backward keeps only the sum."""
    return _function(float(eps))(a, b, weight)
