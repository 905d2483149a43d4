// Rotary position embedding (mlx-lm's default, non-traditional form: the two halves of each head
// rotate as pairs) as one MLX CPU primitive, its own vjp (the inverse rotation):
//   Rope(x [B, H, T, D]) -> out [B, H, T, D] (row-contiguous), for dims == D, positions
//   offset + t scaled by `scale`, frequencies base^(-i / (D/2)), exactly as mx.fast.rope computes
//   them (float32 theta = position * exp(-i * log(base) / (D/2))).
//   Rope(x, offsets [B] int32): per-sequence offsets (mx.fast.rope's array offset), positions
//   offsets[b] + t. A packed batch passes one sequence per token ([B*T, H, 1, D], each token's
//   position within its row); the angles come from the same table formula, so a token is rotated
//   bit for bit as at that position of its unpacked row.
// The input may be any strided view whose last axis is contiguous (mlx-lm rotates the
// [B, T, H, D] -> [B, H, T, D] transpose of the projections): the copy is folded into the pass.
//
// Why: on the CPU mx.fast.rope has no kernel; its fallback builds the angles, cos, sin, four
// products, two sums and a concatenation: 1.2 ms for q [8, 4, 256, 64] (and as much again in
// the backward), for each of q and k in every layer.
#include <cmath>
#include <stdexcept>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/ops.h"
#include "simd.h"

namespace mlxk {
namespace {

struct Tables {
  std::vector<float> cos, sin;  // [T, D/2]
};

// cos / sin of every position pos(r), r < n: theta = float(pos) * scale * base^(-i / half). One
// formula for every layout, so a token is rotated bit for bit alike at the same position.
template <class Pos>
Tables tables(int64_t n, int64_t half, float base, float scale, Pos pos) {
  Tables tb{std::vector<float>(size_t(n * half)), std::vector<float>(size_t(n * half))};
  const float step = float(std::log(double(base)) / double(half));
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::exp(float(-i) * step);
  for (int64_t r = 0; r < n; ++r) {
    const float p = float(pos(r)) * scale;
    for (int64_t i = 0; i < half; ++i) {
      const float th = p * inv[size_t(i)];
      tb.cos[size_t(r * half + i)] = std::cos(th);
      tb.sin[size_t(r * half + i)] = std::sin(th);
    }
  }
  return tb;
}

// One row: out1 = x1 c - x2 s, out2 = x1 s + x2 c (forward); the inverse with -s.
inline void rotate(const float* x, int64_t sd, float* o, const float* c, const float* s, int64_t half,
                   bool forward) {
  const float* x1 = x;
  const float* x2 = x + half * sd;
  float *o1 = o, *o2 = o + half;
  int64_t i = 0;
  if (sd == 1) {
    for (; i + W <= half; i += W) {
      vf a = load(x1 + i), b = load(x2 + i), cv = load(c + i), sv = load(s + i);
      if (forward) {
        store(o1 + i, a * cv - b * sv);
        store(o2 + i, a * sv + b * cv);
      } else {
        store(o1 + i, b * sv + a * cv);
        store(o2 + i, b * cv - a * sv);
      }
    }
  }
  for (; i < half; ++i) {
    float a = x1[i * sd], b = x2[i * sd];
    if (forward) {
      o1[i] = a * c[i] - b * s[i];
      o2[i] = a * s[i] + b * c[i];
    } else {
      o1[i] = b * s[i] + a * c[i];
      o2[i] = b * c[i] - a * s[i];
    }
  }
}

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream s, float base, float scale, int offset, bool forward)
      : mx::UnaryPrimitive(s), base_(base), scale_(scale), offset_(offset), forward_(forward) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const auto& x = in[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    const int32_t* offs = nullptr;
    if (in.size() > 1) {
      require_row_contiguous({in[1]}, "rope offsets");
      enc.set_input_array(in[1]);
      offs = in[1].data<int32_t>();
    }
    enc.set_output_array(out);
    int64_t B = x.shape(0), H = x.shape(1), T = x.shape(2), D = x.shape(3);
    auto st = x.strides();
    enc.dispatch([xp = x.data<float>(), offs, o = out.data<float>(), B, H, T, D, sb = int64_t(st[0]),
                  sh = int64_t(st[1]), stt = int64_t(st[2]), sd = int64_t(st[3]), base = base_,
                  scale = scale_, offset = offset_, forward = forward_]() {
      const int64_t half = D / 2;
      // Table rows: positions lo .. hi when that span is at most B * T rows (always without
      // offsets, and for a packed batch); else one row per (sequence, t).
      int64_t lo = offset, hi = int64_t(offset) + T - 1;
      if (offs != nullptr) {
        lo = offs[0], hi = offs[0];
        for (int64_t b = 1; b < B; ++b) lo = std::min<int64_t>(lo, offs[b]), hi = std::max<int64_t>(hi, offs[b]);
        hi += T - 1;
      }
      const bool by_position = hi - lo + 1 <= B * T;
      Tables tb = by_position
                      ? tables(hi - lo + 1, half, base, scale, [lo](int64_t r) { return lo + r; })
                      : tables(B * T, half, base, scale, [offs, T](int64_t r) { return int64_t(offs[r / T]) + r % T; });
      parallel_for(B * H * T, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       int64_t t = r % T, bh = r / T, h = bh % H, b = bh / H;
                       int64_t row = by_position ? (offs != nullptr ? int64_t(offs[b]) : int64_t(offset)) + t - lo
                                                 : b * T + t;
                       rotate(xp + b * sb + h * sh + t * stt, sd, o + r * D, tb.cos.data() + row * half,
                              tb.sin.data() + row * half, half, forward);
                     }
                   });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    no_gpu(name());
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto g = mx::astype(cotangents[0], mx::float32, s);
    std::vector<mx::array> inputs{g};
    if (primals.size() > 1) inputs.push_back(primals[1]);
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0)
        grads.push_back(mx::array(g.shape(), mx::float32, std::make_shared<Rope>(s, base_, scale_, offset_, !forward_), inputs));
      else  // integer offsets: no gradient
        grads.push_back(mx::zeros_like(primals[a], s));
    }
    return grads;
  }
  const char* name() const override {
    return "MlxflowRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Rope&>(other);
    return base_ == o.base_ && scale_ == o.scale_ && offset_ == o.offset_ && forward_ == o.forward_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

 private:
  float base_, scale_;
  int offset_;
  bool forward_;
};

}  // namespace

mx::array rope(const mx::array& x, float base, float scale, int offset, const std::optional<mx::array>& offsets,
               mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("rope");
  if (x.ndim() != 4 || x.dtype() != mx::float32 || x.shape(3) % 2 != 0)
    throw std::invalid_argument("[mlxflow kernels] rope: x must be float32 [B, H, T, D] with D even");
  std::vector<mx::array> in{x};
  if (offsets) {
    if (offsets->ndim() != 1 || offsets->shape(0) != x.shape(0))
      throw std::invalid_argument("[mlxflow kernels] rope: offsets must be [B] for x [B, H, T, D]");
    in.push_back(mx::contiguous(mx::astype(*offsets, mx::int32, st), false, st));
    offset = 0;
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(st, base, scale, offset, true), in);
}

}  // namespace mlxk
