// Token cross-entropy as two MLX CPU primitives:
//   CrossEntropy     (logits, targets)             -> (loss, lse)
//   CrossEntropyVJP  (logits, targets, lse, g, gl) -> dlogits = softmax*(g+gl) - onehot*g
//
// Why a primitive and not MLX ops: MLX's CPU exp/logsumexp/softmax are scalar code
// (~25 ns per element here) and single-threaded; the whole loss is three memory passes
// over an [N, V] matrix that is usually the largest activation of a small LLM. Here the
// forward is two passes over each row while it sits in L1/L2 (max, then sum of exp) and
// the backward is one read + one write pass, all 8-wide and spread over the cores.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "simd.h"

namespace mlxk {

std::atomic<int64_t> ce_grad_donations{0};

[[noreturn]] void no_gpu(const char* name) {
  throw std::runtime_error(
      std::string("[mlxflow kernels] ") + name +
      " is a CPU-only primitive; mlxcore.kernels uses it only on CPU streams");
}

mx::cpu::CommandEncoder& begin_eval(const mx::Stream& s, const std::vector<mx::array>& in,
                                    std::vector<mx::array>& outs) {
  for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(s);
  for (const auto& a : in) enc.set_input_array(a);
  for (auto& o : outs) enc.set_output_array(o);
  return enc;
}

void require_row_contiguous(const std::vector<mx::array>& in, const char* what) {
  for (const auto& a : in)
    if (!a.flags().row_contiguous)
      throw std::runtime_error(std::string("[mlxflow kernels] ") + what + " input is not row-contiguous");
}

std::vector<mx::array> pair_vjp(const mx::Stream& s, const std::vector<mx::array>& primals,
                                const mx::array& cotangent, std::shared_ptr<mx::Primitive> grad,
                                const std::vector<int>& argnums) {
  auto g = mx::contiguous(mx::astype(cotangent, mx::float32, s), false, s);
  auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape()}, {mx::float32, mx::float32},
                                      std::move(grad), {primals[0], primals[1], g});
  std::vector<mx::array> res;
  for (int a : argnums) res.push_back(grads[a]);
  return res;
}

namespace {

// Rows per parallel chunk: at least ~256k elements per thread so thread start-up
// (~20 us) stays below 1% of the work.
int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(V, 1));
}

// Row max with four independent accumulators so the max latency chain does not bound it.
float row_max(const float* x, int64_t V) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf m0 = splat(ninf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * W <= V; j += 4 * W) {
    m0 = vmax(m0, load(x + j));
    m1 = vmax(m1, load(x + j + W));
    m2 = vmax(m2, load(x + j + 2 * W));
    m3 = vmax(m3, load(x + j + 3 * W));
  }
  for (; j + W <= V; j += W) m0 = vmax(m0, load(x + j));
  float m = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; j < V; ++j) m = x[j] > m ? x[j] : m;
  return m;
}


void forward_rows(const float* x, const int32_t* t, float* loss, float* lse, int64_t V,
                  int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * V;
    float m = row_max(row, V);
    // An all -inf row has m = -inf; keep the reference's NaN (x - m = NaN) semantics.
    float l = m + std::log(row_sum_exp(row, V, m));
    lse[r] = l;
    int32_t c = t[r];
    loss[r] = (c >= 0 && c < V) ? l - row[c] : 0.0f;
  }
}

// d loss_r / d x_rj = softmax_rj - [j == t_r];  d lse_r / d x_rj = softmax_rj.
// `out` may alias `x` (buffer donation): each element is read before it is written.
void backward_rows(const float* x, const int32_t* t, const float* lse, const float* g,
                   const float* gl, float* out, int64_t V, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * V;
    float* orow = out + r * V;
    int32_t c = t[r];
    bool valid = c >= 0 && c < V;
    float gr = valid ? g[r] : 0.0f;
    float coef = gr + (gl ? gl[r] : 0.0f);
    float target_logit = valid ? row[c] : 0.0f;  // read before a donated write
    vf vl = splat(lse[r]), vc = splat(coef);
    int64_t j = 0;
    for (; j + 2 * W <= V; j += 2 * W) {
      vf a = vexp(load(row + j) - vl), b = vexp(load(row + j + W) - vl);
      store(orow + j, a * vc);
      store(orow + j + W, b * vc);
    }
    for (; j + W <= V; j += W) store(orow + j, vexp(load(row + j) - vl) * vc);
    for (; j < V; ++j) orow[j] = sexp(row[j] - lse[r]) * coef;
    if (valid) orow[c] = sexp(target_logit - lse[r]) * coef - gr;
  }
}

void check_cpu_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::runtime_error(std::string("[mlxflow kernels] ") + what + " is not row-contiguous");
  }
}

class CrossEntropyVJP : public mx::Primitive {
 public:
  CrossEntropyVJP(mx::Stream s, bool has_gl) : mx::Primitive(s), has_gl_(has_gl) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    const auto& x = in[0];
    auto& out = outs[0];
    for (const auto& a : in) check_cpu_contiguous(a, "CrossEntropyVJP input");
    // Reuse the logits buffer for the gradient when nothing else needs the logits any
    // more (as MLX's own elementwise ops do): saves an [N, V] allocation + page faults.
    if (x.is_donatable() && x.dtype() == out.dtype()) {
      out.copy_shared_buffer(x);
      ce_grad_donations.fetch_add(1, std::memory_order_relaxed);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    int64_t N = x.shape(0), V = x.shape(1);
    enc.dispatch([xp = x.data<float>(), tp = in[1].data<int32_t>(), lp = in[2].data<float>(),
                  gp = in[3].data<float>(), glp = has_gl_ ? in[4].data<float>() : nullptr,
                  op = out.data<float>(), N, V]() {
      parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
        backward_rows(xp, tp, lp, gp, glp, op, V, r0, r1);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  const char* name() const override {
    return "MlxflowCrossEntropyVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_gl_ == static_cast<const CrossEntropyVJP&>(other).has_gl_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

 private:
  bool has_gl_;
};

class CrossEntropy : public mx::Primitive {
 public:
  explicit CrossEntropy(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    const auto& x = in[0];
    const auto& t = in[1];
    check_cpu_contiguous(x, "logits");
    check_cpu_contiguous(t, "targets");
    auto& enc = begin_eval(stream(), {x, t}, outs);
    int64_t N = x.shape(0), V = x.shape(1);
    enc.dispatch([xp = x.data<float>(), tp = t.data<int32_t>(), lossp = outs[0].data<float>(),
                  lsep = outs[1].data<float>(), N, V]() {
      parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
        forward_rows(xp, tp, lossp, lsep, V, r0, r1);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }

  // cotangents[0] is for the loss, cotangents[1] (if MLX passes one) for the lse output.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    auto s = stream();
    const auto& x = primals[0];
    const auto& t = primals[1];
    std::vector<mx::array> vjp_in = {x, t, outputs[1],
                                     mx::contiguous(mx::astype(cotangents[0], mx::float32, s), false, s)};
    bool has_gl = cotangents.size() > 1;
    if (has_gl) vjp_in.push_back(mx::contiguous(mx::astype(cotangents[1], mx::float32, s), false, s));
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        grads.push_back(mx::array(x.shape(), mx::float32,
                                  std::make_shared<CrossEntropyVJP>(s, has_gl), vjp_in));
      } else {  // integer targets: no gradient
        grads.push_back(mx::zeros_like(t, s));
      }
    }
    return grads;
  }
  const char* name() const override {
    return "MlxflowCrossEntropy";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;  // no parameters
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {{in[0].shape(0)}, {in[0].shape(0)}};
  }
};

}  // namespace

std::vector<mx::array> cross_entropy(const mx::array& logits, const mx::array& targets,
                                     mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("cross_entropy");
  if (logits.ndim() != 2 || logits.dtype() != mx::float32) {
    throw std::invalid_argument("[mlxflow kernels] cross_entropy: logits must be float32 [N, V]");
  }
  if (targets.ndim() != 1 || targets.dtype() != mx::int32 || targets.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("[mlxflow kernels] cross_entropy: targets must be int32 [N]");
  }
  // `contiguous` is free for already row-contiguous inputs (it shares the buffer).
  auto x = mx::contiguous(logits, false, st);
  auto t = mx::contiguous(targets, false, st);
  int n = logits.shape(0);
  return mx::array::make_arrays({{n}, {n}}, {mx::float32, mx::float32},
                                std::make_shared<CrossEntropy>(st), {x, t});
}

}  // namespace mlxk
