// AdamW over every parameter of a model as one MLX CPU primitive (a multi-tensor step):
//   AdamWStep(lr, scale, normalizer, p_0..p_{n-1}, g_0.., m_0.., v_0..) -> (p'_0.., m'_0.., v'_0..)
// per element, in float32, in exactly the order mlx.optimizers.AdamW and
// mlx.optimizers.clip_grad_norm evaluate it (without bias correction):
//   g  = (g * scale) * normalizer          the mean over tokens, then the clip
//   p  = p * (1 - lr * wd)                  decoupled weight decay
//   m' = b1 * m + (1 - b1) * g
//   v' = b2 * v + (1 - b2) * (g * g)
//   p' = p - (lr * m') / (sqrt(v') + eps)
// The scalars are rounded to float32 as MLX rounds Python floats (1 - b1 in double first).
//
// Why: on the CPU, MLX runs the update tensor by tensor, several single-threaded passes each
// (a `tiny` model: clip 11 ms + optimizer 19 ms of a 570 ms step). Here it is one pass over
// p, g, m, v on all cores. This file is compiled with -ffp-contract=off (see _build.py): an FMA
// would round differently from MLX's separate multiply and add, and the update must be MLX's
// bit for bit (tested).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "simd.h"

namespace mlxk {
namespace {

constexpr int64_t GRAIN = 1 << 15;  // elements per thread at least

struct Hyper {
  float b1, one_minus_b1, b2, one_minus_b2, eps, wd;
  bool operator==(const Hyper& o) const {
    return b1 == o.b1 && one_minus_b1 == o.one_minus_b1 && b2 == o.b2 &&
           one_minus_b2 == o.one_minus_b2 && eps == o.eps && wd == o.wd;
  }
};

static inline vf vsqrt(vf x) {  // correctly rounded, as std::sqrt (vectorized by the compiler)
  vf r;
  for (int k = 0; k < W; ++k) r[k] = std::sqrt(x[k]);
  return r;
}

struct Scalars {
  float lr, scale, normalizer, decay;  // decay = 1 - lr * wd
};

void update(const Hyper& h, const Scalars& s, const float* p, const float* g, const float* m,
            const float* v, float* po, float* mo, float* vo, int64_t i0, int64_t i1) {
  const vf b1 = splat(h.b1), c1 = splat(h.one_minus_b1), b2 = splat(h.b2), c2 = splat(h.one_minus_b2),
           eps = splat(h.eps), lr = splat(s.lr), sc = splat(s.scale), nz = splat(s.normalizer),
           decay = splat(s.decay);
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    vf gv = (load(g + i) * sc) * nz;
    vf pv = load(p + i) * decay;
    vf mv = b1 * load(m + i) + c1 * gv;
    vf vv = b2 * load(v + i) + c2 * (gv * gv);
    store(mo + i, mv);
    store(vo + i, vv);
    store(po + i, pv - (lr * mv) / (vsqrt(vv) + eps));
  }
  for (; i < i1; ++i) {
    float gs = (g[i] * s.scale) * s.normalizer;
    float pd = p[i] * s.decay;
    float mn = h.b1 * m[i] + h.one_minus_b1 * gs;
    float vn = h.b2 * v[i] + h.one_minus_b2 * (gs * gs);
    mo[i] = mn;
    vo[i] = vn;
    po[i] = pd - (s.lr * mn) / (std::sqrt(vn) + h.eps);
  }
}

class AdamWStep : public mx::Primitive {
 public:
  AdamWStep(mx::Stream s, Hyper h) : mx::Primitive(s), h_(h) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    require_row_contiguous(in, "adamw_step");
    auto& enc = begin_eval(stream(), in, outs);
    const int64_t n = int64_t(outs.size()) / 3;
    struct Tensor {
      const float *p, *g, *m, *v;
      float *po, *mo, *vo;
      int64_t start;  // offset of its first element in the concatenation of all tensors
    };
    std::vector<Tensor> ts(n);
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) {
      ts[t] = {in[3 + t].data<float>(),         in[3 + n + t].data<float>(),
               in[3 + 2 * n + t].data<float>(), in[3 + 3 * n + t].data<float>(),
               outs[t].data<float>(),           outs[n + t].data<float>(),
               outs[2 * n + t].data<float>(),   total};
      total += int64_t(outs[t].size());
    }
    enc.dispatch([h = h_, lr = in[0].data<float>(), scale = in[1].data<float>(),
                  normalizer = in[2].data<float>(), ts = std::move(ts), total]() {
      Scalars s{lr[0], scale[0], normalizer[0], 0.0f};
      s.decay = 1.0f - s.lr * h.wd;
      // each thread takes a contiguous range of the concatenation, across tensor boundaries
      parallel_for(total, GRAIN, [&](int64_t i0, int64_t i1) {
        auto t = std::upper_bound(ts.begin(), ts.end(), i0,
                                  [](int64_t i, const Tensor& x) { return i < x.start; }) - 1;
        for (; t != ts.end() && t->start < i1; ++t) {
          int64_t end = (t + 1 == ts.end()) ? total : (t + 1)->start;
          int64_t a = std::max(i0, t->start) - t->start, b = std::min(i1, end) - t->start;
          if (a < b) update(h, s, t->p, t->g, t->m, t->v, t->po, t->mo, t->vo, a, b);
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  const char* name() const override {
    return "MlxflowAdamWStep";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return h_ == static_cast<const AdamWStep&>(other).h_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    const size_t n = (in.size() - 3) / 4;
    std::vector<mx::Shape> shapes;
    for (int k = 0; k < 3; ++k)
      for (size_t t = 0; t < n; ++t) shapes.push_back(in[3 + t].shape());
    return shapes;
  }

 private:
  Hyper h_;
};

}  // namespace

std::vector<mx::array> adamw_step(const std::vector<mx::array>& params,
                                  const std::vector<mx::array>& grads,
                                  const std::vector<mx::array>& ms,
                                  const std::vector<mx::array>& vs, const mx::array& lr,
                                  const mx::array& scale, const mx::array& normalizer, double b1,
                                  double b2, double eps, double weight_decay,
                                  mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("adamw_step");
  const size_t n = params.size();
  if (grads.size() != n || ms.size() != n || vs.size() != n)
    throw std::invalid_argument("[mlxflow kernels] adamw_step: params, grads, m and v differ in length");
  std::vector<mx::array> in;
  in.reserve(3 + 4 * n);
  for (const auto* x : {&lr, &scale, &normalizer}) {
    if (x->size() != 1)
      throw std::invalid_argument("[mlxflow kernels] adamw_step: lr, scale and normalizer must be scalars");
    in.push_back(mx::reshape(mx::astype(*x, mx::float32, st), {1}, st));
  }
  std::vector<mx::Shape> shapes;
  for (const auto* group : {&params, &grads, &ms, &vs})
    for (size_t t = 0; t < n; ++t) {
      const auto& a = (*group)[t];
      if (a.dtype() != mx::float32 || a.shape() != params[t].shape())
        throw std::invalid_argument("[mlxflow kernels] adamw_step: tensor " + std::to_string(t) +
                                    " must be float32 of its parameter's shape in all four lists");
      in.push_back(mx::contiguous(a, false, st));
    }
  for (int k = 0; k < 3; ++k)
    for (size_t t = 0; t < n; ++t) shapes.push_back(params[t].shape());
  Hyper h{float(b1), float(1.0 - b1), float(b2), float(1.0 - b2), float(eps), float(weight_decay)};
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(3 * n, mx::float32),
                                std::make_shared<AdamWStep>(st, h), in);
}

}  // namespace mlxk
