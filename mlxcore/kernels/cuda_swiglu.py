"""SwiGLU, `silu(gate) * x`, as one CUDA kernel each way (`mx.fast.cuda_kernel`).

`lean_swiglu`'s backward is two MLX kernels, one per gradient, because MLX's fuser writes one
output per kernel: on an H100 (200mb, bf16, B32xT1024) they read `gate` twice and the cotangent
twice, 4.97 ms of kernel time a step where torch's compiled backward, one kernel with both
outputs, took 3.31 (README, "Kernel by kernel"). Here the backward reads `gate`, `x` and the
cotangent once and writes both gradients; the forward reads `gate` and `x` and writes the
product. Both use 16-byte loads and compute in float32, rounding each result once to the
inputs' dtype, with the same formulas as `lean_swiglu` (d_gate = c * x * s * (1 + g * (1 - s)),
d_x = c * g * s, s = sigmoid(g)), so they keep only `gate` and `x` alive for the backward, as it does.

`mlxcore.kernels.swiglu` sends training-sized inputs here on CUDA (`cuda.layer_on("swiglu")`;
`MLXFLOW_CUDA_LAYERS` turns it off). Values are checked against float64 by the GPU subset.
"""

from __future__ import annotations

from functools import lru_cache

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlxcore.kernels import cuda

VERSION = 2
BLOCK = 256


def on() -> bool:
    return cuda.layer_on("swiglu")


def supports(gate: mx.array, x: mx.array) -> bool:
    return gate.dtype in cuda.FLOAT_TYPES and gate.dtype == x.dtype and tuple(gate.shape) == tuple(x.shape) and gate.size > 0


# One thread owns VEC consecutive elements: loaded as one 16-byte piece when the piece is whole
# and every pointer aligned (MLX's buffers are), else one by one.
_BODY = """
  using namespace mlxflow_swiglu;
  const int64_t n = meta[0];
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i0 >= n) return;
  const bool whole = i0 + VEC <= n && ((0ull {pointers}) & 15) == 0;
"""


def _bits(*pointers: str) -> str:
    return "".join(f" | reinterpret_cast<unsigned long long>({p})" for p in pointers)


def _header(dtype: mx.Dtype) -> str:
    return cuda.vector_io(dtype) + """
namespace mlxflow_swiglu {
using namespace mlxflow_vec;
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + __expf(-g)); }
}  // namespace mlxflow_swiglu
"""


def _source(forward: bool) -> str:
    if forward:
        return _BODY.format(pointers=_bits("gate", "x", "out")) + """
  const int m = int(n - i0 < VEC ? n - i0 : VEC);
  alignas(16) T g[VEC], v[VEC];
  load(gate + i0, g, m, whole);
  load(x + i0, v, m, whole);
  float r[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float a = ::mlxflow::f32(g[j]);
    r[j] = a * sigmoid(a) * ::mlxflow::f32(v[j]);
  }
  store(out + i0, r, m, whole);
"""
    return _BODY.format(pointers=_bits("gate", "x", "cot", "d_gate", "d_x")) + """
  const int m = int(n - i0 < VEC ? n - i0 : VEC);
  alignas(16) T g[VEC], v[VEC], c[VEC];
  load(gate + i0, g, m, whole);
  load(x + i0, v, m, whole);
  load(cot + i0, c, m, whole);
  float rg[VEC], rx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float a = ::mlxflow::f32(g[j]), s = sigmoid(a), ct = ::mlxflow::f32(c[j]);
    rg[j] = ct * ::mlxflow::f32(v[j]) * (s * (1.0f + a * (1.0f - s)));
    rx[j] = ct * (a * s);
  }
  store(d_gate + i0, rg, m, whole);
  store(d_x + i0, rx, m, whole);
"""


@lru_cache(maxsize=None)
def _kernel(dtype: mx.Dtype, forward: bool):
    name = f"mlxflow_swiglu_v{VERSION}_{str(dtype).split('.')[-1]}_{'fwd' if forward else 'bwd'}"
    inputs = ["meta", "gate", "x"] + ([] if forward else ["cot"])
    outputs = ["out"] if forward else ["d_gate", "d_x"]
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=_source(forward),
                               header=_header(dtype))


def _launch(arrays: list, forward: bool) -> list:
    first = arrays[0]
    threads = -(-first.size // cuda.vec(first.dtype))
    meta = mx.array([first.size], dtype=mx.int64)
    outs = 1 if forward else 2
    return _kernel(first.dtype, forward)(
        inputs=[meta, *arrays], output_shapes=[first.shape] * outs, output_dtypes=[first.dtype] * outs,
        grid=(-(-threads // BLOCK) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1))


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x (`supports` must hold); its backward keeps only `gate` and `x`."""
    return _launch([gate, x], forward=True)[0]


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    d_gate, d_x = _launch([gate, x, cotangent], forward=False)
    return d_gate, d_x
