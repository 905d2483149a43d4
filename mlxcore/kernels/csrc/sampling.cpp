// Token sampling and log-softmax for generation, as MLX CPU primitives:
//   CategoricalSample (logits [N, V], u [N]) -> (tokens [N] uint32, logprob [N] float32)
//   LogSoftmax        (logits [N, V])        -> logits - logsumexp(logits)
//
// Why: mlx-lm samples a batch by normalising the logits (logsumexp, subtract), scaling them by
// 1/T, drawing N*V uniforms for the Gumbel trick (uniform, log, log, add) and an argmax:
// about ten full passes of MLX's scalar, single-threaded CPU elementwise code over [N, V].
// For N = 64 rows of V = 6400 that was ~10 ms a decode step against a ~16 ms model forward.
//
// Here one row is sampled by inverse-CDF with ONE uniform per row (drawn by the caller with
// mx.random.uniform, so mx.random.seed governs it): the row's weights w_j = exp((x_j - max)/T)
// (zero outside the top-p set) are written to a per-thread scratch row together with the sum
// of every 8-lane block; the token is the first j whose running sum exceeds u * sum(w). The
// row is read ~3 times while it sits in L1/L2, 8 lanes at a time, and rows are spread over
// the cores. The distribution is exactly softmax(x/T) restricted to the kept set (up to float
// rounding of the weights); the samples themselves differ from the Gumbel trick's.
//
// logprob is the MODEL's log-probability of the sampled token, log_softmax(x)[token] at
// temperature 1 and without top-p (what mlx-lm's batch_generate(return_logprobs=True) reports
// and what an RL update calls the behaviour policy).
//
// top-p (0 < top_p < 1) follows mlx_lm.sample_utils.apply_top_p: it is applied to the
// temperature-1 probabilities; sorted descending, a token is kept while the probability mass
// strictly above it is < top_p; every token whose logit is >= the smallest kept logit is kept
// (ties included). Only the top of the row is sorted: nth_element on the 64 largest, doubling
// until the kept set is complete.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "simd.h"

namespace mlxk {
namespace {

constexpr float NINF = -std::numeric_limits<float>::infinity();

int64_t grain_rows(int64_t V) {  // >= ~64k elements per thread, so thread start-up is noise
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(V, 1));
}

float max_of(const float* x, int64_t V) {
  vf m0 = splat(NINF), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * W <= V; j += 2 * W) {
    m0 = vmax(m0, load(x + j));
    m1 = vmax(m1, load(x + j + W));
  }
  for (; j + W <= V; j += W) m0 = vmax(m0, load(x + j));
  float m = hmax(vmax(m0, m1));
  for (; j < V; ++j) m = x[j] > m ? x[j] : m;
  return m;
}


// The smallest logit kept by top-p (see the header comment). `buf` is V floats of scratch.
// total = sum_j exp(x_j - m); the rule compares unnormalised masses, as the ratio is the same.
float top_p_threshold(const float* x, int64_t V, float m, double total, float top_p, float* buf) {
  for (int64_t j = 0; j < V; ++j) buf[j] = std::isnan(x[j]) ? NINF : x[j];
  const double target = double(top_p) * total;
  double above = 0;  // mass of the tokens before position d (in descending order)
  int64_t done = 0, k = std::min<int64_t>(V, 64);
  for (;;) {
    // buf[done, k) := the next k - done largest values, sorted descending
    std::nth_element(buf + done, buf + k - 1, buf + V, std::greater<float>());
    std::sort(buf + done, buf + k, std::greater<float>());
    for (int64_t d = done; d < k; ++d) {
      if (d > 0 && above >= target) return buf[d - 1];  // d is the first dropped position
      above += double(sexp(buf[d] - m));
    }
    if (k == V) return buf[V - 1];
    done = k;
    k = std::min<int64_t>(V, 2 * k);
  }
}

// Samples one row. `w` (V floats) and `bs` (V/W + 1 floats) are scratch.
void sample_row(const float* x, int64_t V, float u, float inv_temp, float top_p, float* w,
                float* bs, float* sortbuf, uint32_t* token, float* logprob) {
  const float m = max_of(x, V);
  if (!(m > NINF)) {  // every logit -inf (or NaN): nothing can be sampled
    *token = 0;
    *logprob = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const bool plain = inv_temp == 1.0f && !(top_p > 0.0f && top_p < 1.0f);
  float z1 = plain ? 0.0f : row_sum_exp(x, V, m);  // temperature-1 normaliser (computed below if plain)
  const float thr = (top_p > 0.0f && top_p < 1.0f) ? top_p_threshold(x, V, m, z1, top_p, sortbuf)
                                                   : NINF;
  // Weights and their 8-lane block sums. `xv >= thr` is false for NaN logits (weight 0).
  const vf vm = splat(m), vit = splat(inv_temp), vthr = splat(thr);
  int64_t j = 0, nb = 0;
  for (; j + W <= V; j += W, ++nb) {
    vf xv = load(x + j);
    vf e = vexp((xv - vm) * vit);
    e = xv >= vthr ? e : vf{};
    store(w + j, e);
    bs[nb] = hsum(e);
  }
  if (j < V) {
    float s = 0;
    for (int64_t t = j; t < V; ++t) {
      w[t] = x[t] >= thr ? sexp((x[t] - m) * inv_temp) : 0.0f;
      s += w[t];
    }
    bs[nb++] = s;
  }
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) total += bs[b];
  if (plain) z1 = float(total);
  const float lse = m + std::log(z1);

  // Inverse CDF: first block whose running sum passes the target, then the element inside it.
  const double target = double(u) * total;
  double acc = 0;
  int64_t b = 0;
  for (; b < nb; ++b) {
    if (acc + bs[b] > target) break;
    acc += bs[b];
  }
  int64_t pick = -1;
  if (b < nb) {
    const int64_t lo = b * W, hi = std::min<int64_t>(V, lo + W);
    for (int64_t t = lo; t < hi; ++t) {
      if (w[t] > 0.0f) {
        pick = t;  // also the answer if in-block rounding never passes the target
        acc += w[t];
        if (acc > target) break;
      }
    }
  }
  if (pick < 0) {  // target at the very top (float rounding): the last token with weight
    for (int64_t t = V - 1; t >= 0 && pick < 0; --t)
      if (w[t] > 0.0f) pick = t;
    if (pick < 0) pick = 0;
  }
  *token = uint32_t(pick);
  *logprob = x[pick] - lse;
}

void check_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous)
    throw std::runtime_error(std::string("[mlxflow kernels] ") + what + " is not row-contiguous");
}

class CategoricalSample : public mx::Primitive {
 public:
  CategoricalSample(mx::Stream s, float inv_temp, float top_p)
      : mx::Primitive(s), inv_temp_(inv_temp), top_p_(top_p) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_contiguous(in[0], "logits");
    check_contiguous(in[1], "uniforms");
    auto& enc = begin_eval(stream(), in, outs);
    int64_t N = in[0].shape(0), V = in[0].shape(1);
    enc.dispatch([x = in[0].data<float>(), u = in[1].data<float>(),
                  tok = outs[0].data<uint32_t>(), lp = outs[1].data<float>(), N, V,
                  it = inv_temp_, tp = top_p_]() {
      parallel_for(N, grain_rows(V), [&](int64_t r0, int64_t r1) {
        std::vector<float> w(V), bs(V / W + 1), sortbuf(tp > 0.0f && tp < 1.0f ? V : 0);
        for (int64_t r = r0; r < r1; ++r)
          sample_row(x + r * V, V, u[r], it, tp, w.data(), bs.data(), sortbuf.data(), tok + r,
                     lp + r);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  const char* name() const override {
    return "MlxflowCategoricalSample";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CategoricalSample&>(other);
    return inv_temp_ == o.inv_temp_ && top_p_ == o.top_p_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {{in[0].shape(0)}, {in[0].shape(0)}};
  }

 private:
  float inv_temp_, top_p_;
};

class LogSoftmax : public mx::Primitive {
 public:
  explicit LogSoftmax(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_contiguous(in[0], "logits");
    auto& enc = begin_eval(stream(), in, outs);
    int64_t N = in[0].shape(0), V = in[0].shape(1);
    enc.dispatch([x = in[0].data<float>(), out = outs[0].data<float>(), N, V]() {
      parallel_for(N, grain_rows(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* row = x + r * V;
          float* o = out + r * V;
          float m = max_of(row, V);
          // all -inf: m = -inf, x - m = NaN, as logits - logsumexp(logits) gives
          float lse = m + std::log(row_sum_exp(row, V, m));
          vf vl = splat(lse);
          int64_t j = 0;
          for (; j + W <= V; j += W) store(o + j, load(row + j) - vl);
          for (; j < V; ++j) o[j] = row[j] - lse;
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  // d/dx (x - lse(x)) applied to g: g - softmax(x) * sum(g); softmax = exp(output).
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cot,
                             const std::vector<int>&, const std::vector<mx::array>& outputs) override {
    auto s = stream();
    auto g = mx::astype(cot[0], mx::float32, s);
    auto gsum = mx::sum(g, -1, true, s);
    return {mx::subtract(g, mx::multiply(mx::exp(outputs[0], s), gsum, s), s)};
  }
  const char* name() const override {
    return "MlxflowLogSoftmax";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }
};

void check_logits(const mx::array& logits, const char* op) {
  if (logits.ndim() != 2 || logits.dtype() != mx::float32)
    throw std::invalid_argument(std::string("[mlxflow kernels] ") + op +
                                ": logits must be float32 [N, V]");
}

}  // namespace

std::vector<mx::array> categorical_sample(const mx::array& logits, const mx::array& uniforms,
                                          float temperature, float top_p, mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("categorical_sample");
  check_logits(logits, "categorical_sample");
  if (uniforms.ndim() != 1 || uniforms.dtype() != mx::float32 ||
      uniforms.shape(0) != logits.shape(0))
    throw std::invalid_argument("[mlxflow kernels] categorical_sample: uniforms must be float32 [N]");
  if (!(temperature > 0.0f))
    throw std::invalid_argument("[mlxflow kernels] categorical_sample: temperature must be > 0");
  auto x = mx::contiguous(logits, false, st);
  auto u = mx::contiguous(uniforms, false, st);
  int n = logits.shape(0);
  return mx::array::make_arrays({{n}, {n}}, {mx::uint32, mx::float32},
                                std::make_shared<CategoricalSample>(st, 1.0f / temperature, top_p),
                                {x, u});
}

mx::array log_softmax(const mx::array& logits, mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("log_softmax");
  check_logits(logits, "log_softmax");
  auto x = mx::contiguous(logits, false, st);
  return mx::array(x.shape(), mx::float32, std::make_shared<LogSoftmax>(st), {x});
}

}  // namespace mlxk
