"""AdamW and the clip's squared norm over many tensors at once, as CUDA kernels (`mx.fast.cuda_kernel`).

On an NVIDIA GPU MLX runs the clip and the optimizer tensor by tensor: for the `200mb` model (137
tensors, bfloat16) the clip alone took 4.0 ms of a 77 ms step on an H100 (a square, a sum and a
scaled copy per tensor), where reading every gradient once takes ~0.06 ms. These kernels take up
to `MAX_TENSORS` tensors per launch, each tensor's own buffer in place (no concatenation): a thread
block owns `CHUNK` elements of one tensor, found from a small table of block offsets (`meta`), and
a `switch` on the tensor picks its pointers. Measured (README, "AdamW and the clip norm as CUDA
kernels"): the norm 5x faster than MLX's per-tensor sums; the update at 70% of the memory
bandwidth on one flat tensor, but over 137 tensors held back, as MLX's own ops are, by MLX's cost
per array (allocating 411 outputs).

- `adamw_step`: `mlxcore.kernels.adamw_step`'s contract (mlx.optimizers.AdamW without bias
  correction, the gradient taken as `(g * scale) * normalizer`, each product rounded to `g`'s dtype
  as the per-tensor scale and `clip_grad_norm` leave it). With float32 moments and any float
  parameter dtype the update is computed in float32 and rounded to the parameter's dtype, as
  `AdamWFloat32State` does. With moments in the parameters' bfloat16 / float16 (plain `AdamW` on
  such parameters, the `200mb` benchmark's optimizer, as torch's AdamW keeps them) every operation
  and scalar is rounded to that dtype, as MLX's ops on those arrays round theirs. Every operation
  is an explicitly rounded IEEE one (`__fmul_rn`, ...), so no multiply-add is contracted: MLX's
  arithmetic, in MLX's order.
- `squared_norm`: the sum of squares of every `g * scale` (rounded to `g`'s dtype, as
  `g * scale.astype(g.dtype)` is), in float32: per block a fixed-order tree, then one MLX sum, so
  the result is deterministic. Only the order of the additions differs from `clip_grad_norm`'s.

Each kernel's source depends only on the dtypes and the number of tensors of a launch (the sizes
and hyper-parameters are inputs), so a model compiles a few kernels once, cached by MLX on disk
(`MLX_PTX_CACHE_DIR`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

CHUNK = 4096  # elements of one tensor per thread block
BLOCK = 256  # threads per block
ILP = 4  # elements a thread loads before it computes (CHUNK / BLOCK must be a multiple)
# Pointers per launch: 2 + 7 x 32 = 226 of 8 bytes, inside CUDA's classic 4 KB of kernel parameters.
MAX_TENSORS = 32
# The flat kernels take one pointer per gradient: 8 + 256 = 264 pointers.
MAX_FLAT = 256
VERSION = 2  # part of every kernel's name: MLX caches compiled kernels by name (also on disk)

_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}


# Conversions shared by every kernel source here and in the layer kernels (`cuda_rope`,
# `cuda_swiglu`): to float32, rounded to a dtype's precision, and stored in it.
CONVERT = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace mlxflow {
__device__ __forceinline__ float f32(float x) { return x; }
__device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float f32(__half x) { return __half2float(x); }
// x rounded to the precision of T (what an MLX op computing in T leaves)
__device__ __forceinline__ float rounded(float x, const float*) { return x; }
__device__ __forceinline__ float rounded(float x, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float rounded(float x, const __half*) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ void put(float* o, float x) { *o = x; }
__device__ __forceinline__ void put(__nv_bfloat16* o, float x) { *o = __float2bfloat16_rn(x); }
__device__ __forceinline__ void put(__half* o, float x) { *o = __float2half_rn(x); }
}  // namespace mlxflow
"""


FLOAT_TYPES = tuple(_TYPES)


def vec(dtype: mx.Dtype) -> int:
    """Elements of `dtype` in one 16-byte piece."""
    return 16 // dtype.size


def vector_io(dtype: mx.Dtype) -> str:
    """Device helpers for kernels whose threads each own `VEC` consecutive elements of type `T`
    (one 16-byte piece): `load` / `store` move a piece as one 16-byte access when `whole` (the
    piece is complete and the pointers aligned, as MLX's buffers are), else the first `m`
    elements one by one. Every array index is static, so a thread's pieces stay in registers
    (a loop to a runtime bound put them in local memory: the source tests check for a stack frame)."""
    return CONVERT + f"""
namespace mlxflow_vec {{
using T = {_TYPES[dtype]};
constexpr int VEC = {vec(dtype)};
// v: an alignas(16) array of the caller's
__device__ __forceinline__ void load(const T* p, T (&v)[VEC], int m, bool whole) {{
  if (whole) *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
  else {{
#pragma unroll
    for (int j = 0; j < VEC; ++j) if (j < m) v[j] = p[j];
  }}
}}
__device__ __forceinline__ void store(T* p, const float (&r)[VEC], int m, bool whole) {{
  alignas(16) T v[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) ::mlxflow::put(v + j, r[j]);
  if (whole) *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
  else {{
#pragma unroll
    for (int j = 0; j < VEC; ++j) if (j < m) p[j] = v[j];
  }}
}}
}}  // namespace mlxflow_vec
"""


def _header() -> str:
    return CONVERT + f"""
namespace mlxflow {{
constexpr int CHUNK = {CHUNK}, BLOCK = {BLOCK}, ILP = {ILP};

// The tensor whose blocks hold `block`: starts[t] <= block < starts[t + 1] (a binary search).
__device__ __forceinline__ int tensor_of(const int64_t* starts, int n, int64_t block) {{
  int lo = 0, hi = n - 1;
  while (lo < hi) {{
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= block) lo = mid; else hi = mid - 1;
  }}
  return lo;
}}

// g * scale.astype(g.dtype), in g's dtype
template <typename G>
__device__ __forceinline__ float scaled(const G* g, int64_t i, float scale) {{
  return rounded(__fmul_rn(f32(g[i]), scale), g);
}}

// h: lr, scale (rounded to G), normalizer, b1, 1 - b1, b2, 1 - b2, eps, weight decay.
// M is the moments' dtype, and every operation of the update is rounded to it, as MLX's ops on M
// arrays round theirs: float32 for AdamWFloat32State or float32 parameters; bfloat16 / float16 for
// plain AdamW on such parameters, whose scalars (lr, betas, eps, decay) MLX also casts to M.
// ILP elements per thread are loaded before any is computed or stored: the outputs may alias the
// inputs as far as the compiler knows, so a plain loop would wait for each load in turn.
template <typename P, typename G, typename M>
__device__ __forceinline__ void adamw(const P* p, const G* g, const M* m, const M* v,
                                      P* po, M* mo, M* vo, int64_t i, int64_t n, const float* h) {{
  const M* c = nullptr;  // the rounding of every operation below
  const float lr = rounded(h[0], c), scale = h[1], nz = h[2], b1 = rounded(h[3], c), c1 = rounded(h[4], c);
  const float b2 = rounded(h[5], c), c2 = rounded(h[6], c), eps = rounded(h[7], c);
  const float decay = rounded(__fsub_rn(1.0f, rounded(__fmul_rn(lr, rounded(h[8], c)), c)), c);
  for (int k = 0; k < CHUNK / BLOCK; k += ILP) {{
    float gv[ILP], pv[ILP], mv[ILP], vv[ILP];
#pragma unroll
    for (int u = 0; u < ILP; ++u) {{
      const int64_t j = i + int64_t(k + u) * BLOCK;
      if (j < n) {{ gv[u] = f32(g[j]); pv[u] = f32(p[j]); mv[u] = f32(m[j]); vv[u] = f32(v[j]); }}
    }}
#pragma unroll
    for (int u = 0; u < ILP; ++u) {{
      const int64_t j = i + int64_t(k + u) * BLOCK;
      if (j < n) {{
        // (g * scale) * normalizer, each product in G as the per-tensor scale and clip_grad_norm leave it
        const float gs = rounded(rounded(__fmul_rn(rounded(__fmul_rn(gv[u], scale), g), nz), g), c);
        const float pd = rounded(__fmul_rn(rounded(pv[u], c), decay), c);
        const float mn = rounded(__fadd_rn(rounded(__fmul_rn(b1, mv[u]), c), rounded(__fmul_rn(c1, gs), c)), c);
        const float sq = rounded(__fmul_rn(gs, gs), c);
        const float vn = rounded(__fadd_rn(rounded(__fmul_rn(b2, vv[u]), c), rounded(__fmul_rn(c2, sq), c)), c);
        const float den = rounded(__fadd_rn(rounded(__fsqrt_rn(vn), c), eps), c);
        put(mo + j, mn);
        put(vo + j, vn);
        put(po + j, rounded(__fsub_rn(pd, rounded(__fdiv_rn(rounded(__fmul_rn(lr, mn), c), den), c)), c));
      }}
    }}
  }}
}}

template <typename G>
__device__ __forceinline__ float sum_squares(const G* g, int64_t i, int64_t n, float scale) {{
  float acc[ILP];
#pragma unroll
  for (int u = 0; u < ILP; ++u) acc[u] = 0.0f;
  for (int k = 0; k < CHUNK / BLOCK; k += ILP) {{
#pragma unroll
    for (int u = 0; u < ILP; ++u) {{
      const int64_t j = i + int64_t(k + u) * BLOCK;
      const float x = j < n ? scaled(g, j, scale) : 0.0f;
      acc[u] = __fadd_rn(acc[u], __fmul_rn(x, x));
    }}
  }}
  float total = acc[0];
#pragma unroll
  for (int u = 1; u < ILP; ++u) total = __fadd_rn(total, acc[u]);
  return total;
}}
}}  // namespace mlxflow
"""

_LOCATE = """
  const int64_t block = blockIdx.x;
  const int t = ::mlxflow::tensor_of(meta, {n}, block);
  const int64_t i = (block - meta[t]) * ::mlxflow::CHUNK + threadIdx.x;
  const int64_t n = meta[{n} + 1 + t];
"""


_LOCATE_FLAT = _LOCATE + "  const int64_t off = meta[2 * {n} + 1 + t];\n"


def available() -> bool:
    """Whether MLX's default device is an NVIDIA GPU (the CUDA backend)."""
    return mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()


LAYERS = ("rope", "swiglu", "addnorm", "cross_entropy", "attention")  # ours: cuda_rope, cuda_swiglu, cuda_addnorm, cuda_xent, cuda_attention
# Layers `auto` leaves off until they have passed on a GPU (none now; `cuda_attention` was here until
# its run on an H100, README "Attention through our own cuDNN graph"). `all`, or a list naming
# such a layer, turns it on.
NOT_DEFAULT: tuple[str, ...] = ()


def layer_on(name: str) -> bool:
    """Whether layer `name`'s CUDA kernel runs: on CUDA, unless `MLXFLOW_CUDA_LAYERS` turns it
    off (`auto`, the default: `LAYERS` but `NOT_DEFAULT`; `all`: every one of `LAYERS`; `off`:
    none, MLX's ops; or a comma list such as `rope`: only those)."""
    mode = os.environ.get("MLXFLOW_CUDA_LAYERS", "auto").strip().lower()
    if mode in ("0", "off", "false", "no", "none") or not available():
        return False
    if mode == "all":
        return True
    if mode in ("auto", "on", "1", "true", "yes"):
        return name not in NOT_DEFAULT
    return name in {m.strip() for m in mode.split(",")}


def dtypes_supported(dtypes) -> bool:
    return set(dtypes) <= set(_TYPES)


def moments_supported(p: mx.Dtype, g: mx.Dtype, m: mx.Dtype) -> bool:
    """Moments the AdamW kernels keep: float32 (AdamWFloat32State, or float32 parameters) for any
    parameter dtype, or the parameters' own dtype when the gradients have it too (plain AdamW on
    bfloat16 / float16 parameters: every operation rounded to that dtype, as MLX's ops are)."""
    return dtypes_supported((p, g, m)) and (m == mx.float32 or p == g == m)


def _name(kind: str, *dtypes: mx.Dtype, n: int) -> str:
    types = "_".join(str(d).split(".")[-1] for d in dtypes)
    return f"mlxflow_{kind}_v{VERSION}_{CHUNK}_{BLOCK}_{ILP}_{types}_{n}"


def _switch_kernel(kind: str, dtypes: tuple, n: int, locate: str, call, inputs: list, outputs: list):
    """A kernel whose block finds its tensor `t` (`locate`) and runs `call(k)` for t == k."""
    cases = "\n".join(f"    case {k}: {call(k)}; break;" for k in range(n))
    return mx.fast.cuda_kernel(name=_name(kind, *dtypes, n=n), input_names=inputs, output_names=outputs,
                               source=locate.format(n=n) + f"  switch (t) {{\n{cases}\n  }}\n", header=_header())


@lru_cache(maxsize=None)
def _adamw_kernel(p: mx.Dtype, g: mx.Dtype, m: mx.Dtype, n: int):
    return _switch_kernel(
        "adamw", (p, g, m), n, _LOCATE,
        lambda k: f"::mlxflow::adamw(p{k}, g{k}, m{k}, v{k}, po{k}, mo{k}, vo{k}, i, n, hyp)",
        ["meta", "hyp", *(f"{x}{k}" for x in "pgmv" for k in range(n))],
        [f"{x}{k}" for x in ("po", "mo", "vo") for k in range(n)])


@lru_cache(maxsize=None)
def _adamw_flat_kernel(p: mx.Dtype, g: mx.Dtype, m: mx.Dtype, n: int):
    """AdamW over flat parameter / moment buffers, each tensor's gradient read in place."""
    return _switch_kernel(
        "adamw_flat", (p, g, m), n, _LOCATE_FLAT,
        lambda k: f"::mlxflow::adamw(p + off, g{k}, m + off, v + off, po + off, mo + off, vo + off, i, n, hyp)",
        ["meta", "hyp", "p", "m", "v", *(f"g{k}" for k in range(n))], ["po", "mo", "vo"])


@lru_cache(maxsize=None)
def _norm_kernel(g: mx.Dtype, n: int):
    cases = "\n".join(f"    case {k}: acc = ::mlxflow::sum_squares(g{k}, i, n, hyp[0]); break;" for k in range(n))
    source = _LOCATE.format(n=n) + f"""
  float acc = 0.0f;
  switch (t) {{
{cases}
  }}
  __shared__ float part[::mlxflow::BLOCK];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = ::mlxflow::BLOCK / 2; s > 0; s >>= 1) {{
    if (threadIdx.x < s) part[threadIdx.x] = __fadd_rn(part[threadIdx.x], part[threadIdx.x + s]);
    __syncthreads();
  }}
  if (threadIdx.x == 0) out[block] = part[0];
"""
    return mx.fast.cuda_kernel(name=_name("sumsq", g, n=n), input_names=["meta", "hyp", *(f"g{k}" for k in range(n))],
                               output_names=["out"], source=source, header=_header())


@lru_cache(maxsize=256)
def _meta(sizes: tuple[int, ...]) -> tuple[mx.array, int]:
    """The launch's table (block offsets of each tensor, then each tensor's size) and its block count."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // CHUNK))
    return mx.array(starts + list(sizes), dtype=mx.int64), starts[-1]


def _launches(keys: list, most: int = MAX_TENSORS) -> list[list[int]]:
    """Indices grouped by key (the dtypes a kernel is compiled for), in order, at most `most` each."""
    by_key: dict = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    return [ids[a:a + most] for ids in by_key.values() for a in range(0, len(ids), most)]


@lru_cache(maxsize=256)
def _flat_meta(sizes: tuple[int, ...]) -> tuple[mx.array, int]:
    """`_meta`'s table followed by each tensor's offset in the flat buffers."""
    meta, blocks = _meta(sizes)
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    return mx.concatenate([meta, mx.array(offsets, dtype=mx.int64)]), blocks


def _f32(x) -> mx.array:
    return (x if isinstance(x, mx.array) else mx.array(x)).astype(mx.float32).reshape(1)


def _grid(blocks: int) -> dict:
    return dict(grid=(blocks * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1))


def squared_norm(grads: list, scale: mx.array) -> mx.array:
    """sum over tensors of sum((g * scale.astype(g.dtype)) ** 2), in float32."""
    total = mx.array(0.0, dtype=mx.float32)
    for ids in _launches([g.dtype for g in grads], MAX_FLAT):  # one pointer a tensor
        dtype = grads[ids[0]].dtype
        meta, blocks = _meta(tuple(grads[k].size for k in ids))
        if blocks == 0:  # only empty tensors: nothing to add (and no launch of zero threads)
            continue
        hyp = _f32(scale.astype(dtype))  # the scale as g's dtype rounds it
        (parts,) = _norm_kernel(dtype, len(ids))(
            inputs=[meta, hyp, *(grads[k] for k in ids)], output_shapes=[(blocks,)], output_dtypes=[mx.float32],
            **_grid(blocks))
        total = total + parts.sum()
    return total


def adamw_step(params, grads, m, v, lr, scale, normalizer, b1: float, b2: float, eps: float,
               weight_decay: float) -> list[mx.array]:
    """`mlxcore.kernels.adamw_step` on the GPU: `[p'..., m'..., v'...]`, the moments in their dtype
    (float32, or the parameters' own: `moments_supported`)."""
    params, grads, m, v = list(params), list(grads), list(m), list(v)
    n = len(params)
    out: list = [None] * (3 * n)
    consts = mx.array([b1, 1 - b1, b2, 1 - b2, eps, weight_decay], dtype=mx.float32)
    lr, normalizer = (_f32(x) for x in (lr, normalizer))
    for ids in _launches([(p.dtype, g.dtype, m_.dtype) for p, g, m_ in zip(params, grads, m)]):
        p_dtype, g_dtype, m_dtype = params[ids[0]].dtype, grads[ids[0]].dtype, m[ids[0]].dtype
        meta, blocks = _meta(tuple(params[k].size for k in ids))
        if blocks == 0:  # only empty tensors: nothing to compute (and no launch of zero threads)
            for k in ids:
                out[k], out[n + k], out[2 * n + k] = params[k], m[k], v[k]
            continue
        hyp = mx.concatenate([lr, _f32(scale.astype(g_dtype)), normalizer, consts])
        shapes = [params[k].shape for k in ids]
        res = _adamw_kernel(p_dtype, g_dtype, m_dtype, len(ids))(
            inputs=[meta, hyp, *(params[k] for k in ids), *(grads[k] for k in ids), *(m[k] for k in ids),
                    *(v[k] for k in ids)],
            output_shapes=shapes * 3, output_dtypes=[p_dtype] * len(ids) + [m_dtype] * (2 * len(ids)),
            **_grid(blocks))
        for j, k in enumerate(ids):
            out[k], out[n + k], out[2 * n + k] = res[j], res[len(ids) + j], res[2 * len(ids) + j]
    return out


def flat_groups(params, grads) -> list[list[int]]:
    """How `adamw_flat_step` lays tensors out: indices grouped by (parameter dtype, gradient dtype),
    in order, at most `MAX_FLAT` a group; each group is one flat buffer of parameters and of each moment."""
    return _launches([(p.dtype, g.dtype) for p, g in zip(params, grads)], MAX_FLAT)


def adamw_flat_step(flat_p: mx.array, flat_m: mx.array, flat_v: mx.array, grads, lr, scale, normalizer,
                    b1: float, b2: float, eps: float, weight_decay: float) -> tuple[mx.array, mx.array, mx.array]:
    """`adamw_step` for one group of `flat_groups`: the parameters and moments as flat buffers (the
    tensors' elements one after another, in `grads`' order), each gradient read from its own
    array. Returns the new flat parameters and moments: three outputs for any number of tensors,
    where `adamw_step` allocates three per tensor."""
    grads = list(grads)
    if not 0 < len(grads) <= MAX_FLAT:
        raise ValueError(f"adamw_flat_step takes 1 to {MAX_FLAT} gradients, got {len(grads)}")
    sizes = tuple(g.size for g in grads)
    if not flat_p.size == flat_m.size == flat_v.size == sum(sizes):
        raise ValueError(f"flat buffers of {flat_p.size}, {flat_m.size}, {flat_v.size} elements for gradients of {sum(sizes)}")
    p_dtype, g_dtype, m_dtype = flat_p.dtype, grads[0].dtype, flat_m.dtype
    if any(g.dtype != g_dtype for g in grads):
        raise ValueError("adamw_flat_step: every gradient of a group has one dtype")
    if flat_v.dtype != m_dtype or not moments_supported(p_dtype, g_dtype, m_dtype):
        raise ValueError(f"adamw_flat_step: moments of {m_dtype} / {flat_v.dtype} for {p_dtype} parameters")
    meta, blocks = _flat_meta(sizes)
    if blocks == 0:
        return flat_p, flat_m, flat_v
    consts = mx.array([b1, 1 - b1, b2, 1 - b2, eps, weight_decay], dtype=mx.float32)
    hyp = mx.concatenate([_f32(lr), _f32(scale.astype(g_dtype)), _f32(normalizer), consts])
    po, mo, vo = _adamw_flat_kernel(p_dtype, g_dtype, m_dtype, len(grads))(
        inputs=[meta, hyp, flat_p, flat_m, flat_v, *grads], output_shapes=[(flat_p.size,)] * 3,
        output_dtypes=[p_dtype, m_dtype, m_dtype], **_grid(blocks))
    return po, mo, vo
