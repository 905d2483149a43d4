// nanobind module `_mlxflow_kernels`.
//
// It must share nanobind's type registry with mlx.core so that a Python mlx.core.array
// converts to `const mlx::core::array&`: same nanobind internals ABI (the version mlx was
// built with; _build.py checks it) and the same NB_DOMAIN ("mlx", passed by _build.py).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"
#include "simd.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_mlxflow_kernels, m) {
  m.doc() = "mlxflow CPU kernels for MLX (built lazily by mlxcore.kernels._build)";

  m.def(
      "cross_entropy",
      [](const mlxk::mx::array& logits, const mlxk::mx::array& targets) {
        return mlxk::cross_entropy(logits, targets)[0];
      },
      "logits"_a, "targets"_a,
      "Per-row cross-entropy: float32 logits [N, V], int32 targets [N] -> float32 [N].");

  m.def(
      "attention",
      [](const mlxk::mx::array& q, const mlxk::mx::array& k, const mlxk::mx::array& v,
         float scale, bool causal, std::optional<mlxk::mx::array> segments) {
        return mlxk::attention(q, k, v, scale, causal, segments)[0];
      },
      "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a = true, "segments"_a = nb::none(),
      "Grouped-query attention, q [B,H,T,D], k/v [B,Hkv,T',D] float32 -> [B,H,T,D]; "
      "optional int32 segment ids [B,T] (causal, T' == T): attend within runs of equal ids.");

  m.def(
      "swiglu",
      [](const mlxk::mx::array& a, const mlxk::mx::array& b) { return mlxk::swiglu(a, b); },
      "a"_a, "b"_a, "silu(a) * b for float32 arrays of one shape.");

  m.def(
      "rms_norm",
      [](const mlxk::mx::array& x, const mlxk::mx::array& w, float eps) { return mlxk::rms_norm(x, w, eps); },
      "x"_a, "w"_a, "eps"_a, "x * rsqrt(mean(x^2, -1) + eps) * w for float32 x [..., D], w [D].");

  m.def(
      "rope",
      [](const mlxk::mx::array& x, float base, float scale, int offset,
         const std::optional<mlxk::mx::array>& offsets) { return mlxk::rope(x, base, scale, offset, offsets); },
      "x"_a, "base"_a, "scale"_a, "offset"_a, "offsets"_a = nb::none(),
      "mx.fast.rope(x, D, traditional=False, base, scale, offset) for float32 x [B, H, T, D]; offsets: "
      "integer [B], sequence b starting at offsets[b].");

  m.def(
      "categorical_sample",
      [](const mlxk::mx::array& logits, const mlxk::mx::array& uniforms, float temperature,
         float top_p) { return mlxk::categorical_sample(logits, uniforms, temperature, top_p); },
      "logits"_a, "uniforms"_a, "temperature"_a = 1.0f, "top_p"_a = 1.0f,
      "One token per row of float32 logits [N, V] from softmax(logits / T) (top-p optional), "
      "by inverse CDF with uniforms [N] -> [tokens uint32 [N], log_softmax(logits)[token] [N]].");

  m.def(
      "log_softmax", [](const mlxk::mx::array& logits) { return mlxk::log_softmax(logits); },
      "logits"_a, "logits - logsumexp(logits, -1) for float32 [N, V].");

  m.def(
      "adamw_step",
      [](const std::vector<mlxk::mx::array>& params, const std::vector<mlxk::mx::array>& grads,
         const std::vector<mlxk::mx::array>& ms, const std::vector<mlxk::mx::array>& vs,
         const mlxk::mx::array& lr, const mlxk::mx::array& scale, const mlxk::mx::array& normalizer,
         double b1, double b2, double eps, double weight_decay) {
        return mlxk::adamw_step(params, grads, ms, vs, lr, scale, normalizer, b1, b2, eps, weight_decay);
      },
      "params"_a, "grads"_a, "m"_a, "v"_a, "lr"_a, "scale"_a, "normalizer"_a, "b1"_a, "b2"_a,
      "eps"_a, "weight_decay"_a,
      "One AdamW step (no bias correction) over float32 tensors, the gradient taken as "
      "(g * scale) * normalizer -> [p'..., m'..., v'...].");

  m.def("align_allocations", &mlxk::align_allocations,
        "Give MLX's CPU arrays of 4 KiB and more 64-byte aligned data (libmlx's malloc / free); "
        "returns the malloc call sites switched, 0 if none.");

  // Cheap call used right after loading: raises TypeError if nanobind cannot see
  // mlx.core.array (an ABI/domain mismatch), so the loader can fall back cleanly.
  m.def("probe", [](const mlxk::mx::array& a) { return a.size(); }, "a"_a);
  m.def("num_threads", &mlxk::num_threads);
  m.def("ce_grad_donations", [] { return mlxk::ce_grad_donations.load(); });
}
