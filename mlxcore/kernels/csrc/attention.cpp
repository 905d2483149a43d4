// Grouped-query (optionally causal) attention as two MLX CPU primitives:
//   Attention     (q, k, v)                 -> (out, lse)
//   AttentionVJP  (q, k, v, out, lse, dout) -> (dq, dk, dv)
//
// Layout: q [B, H, T, D], k/v [B, Hkv, S, D], float32, row-contiguous; query head h reads
// kv head h / (H / Hkv). Causal: query i sees keys j <= i + (S - T) (bottom-right aligned,
// as mx.fast.scaled_dot_product_attention with mask="causal").
//
// Segments (packed sequences, causal only, T == S): int32 ids [B, T]; a run of equal ids is
// one segment, and query i sees only keys j <= i of its own run. Runs are contiguous, so a
// query's visible keys are one interval [start(i), i], and start(i) never decreases along a
// row: every block below works on the key columns [start of its first row, limit of its
// last row), with each row's probabilities zero outside its own interval, so all the
// reduction-range skipping of the causal case carries over unchanged.
//
// The forward processes blocks of BQ query rows: scores for the keys the block can see
// (S = Q K^T, with K pre-transposed so gemm.h streams contiguous rows), a masked softmax
// in place, then O = P V. Only the per-row log-sum-exp is saved; the backward recomputes
// P from it (FlashAttention's trade: T*T probabilities are never stored). The backward
// runs one task per (batch, kv head): that task owns dK/dV of its kv head and dQ of the
// query heads that share it, so no two threads ever write the same gradient row.
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>

#include "gemm.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mlxk {
namespace {

constexpr int64_t BQ = 32;  // query rows per block: P/dP blocks of BQ x S stay in L2

struct Dims {
  int64_t B, H, Hkv, G, T, S, D, Spad, off;
  float scale;
  bool causal;
  const int32_t* start = nullptr;  // [B, T] first visible key of each query (segments), or null
  // Number of keys query row i may attend (can be <= 0 when T > S and causal).
  int64_t lim(int64_t i) const {
    return causal ? std::min(S, i + off + 1) : S;
  }
  // First key query row i of batch b may attend.
  int64_t lo(int64_t b, int64_t i) const {
    return start ? start[b * T + i] : 0;
  }
  // First key column of a block starting at query row i0: its first row's start, rounded
  // down to a vector boundary so key rows stay at the same offsets modulo W.
  int64_t first_col(int64_t b, int64_t i0) const {
    return lo(b, i0) / W * W;
  }
};

// start[b, i] = the first index of the run of equal ids that contains i.
std::vector<int32_t> segment_starts(const int32_t* seg, int64_t B, int64_t T) {
  std::vector<int32_t> start(B * T);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* s = seg + b * T;
    int32_t* st = start.data() + b * T;
    for (int64_t i = 0; i < T; ++i) st[i] = (i > 0 && s[i] == s[i - 1]) ? st[i - 1] : int32_t(i);
  }
  return start;
}

Dims make_dims(const mx::array& q, const mx::array& k, float scale, bool causal) {
  Dims d;
  d.B = q.shape(0), d.H = q.shape(1), d.T = q.shape(2), d.D = q.shape(3);
  d.Hkv = k.shape(1), d.S = k.shape(2);
  d.G = d.H / d.Hkv;
  d.Spad = (d.S + W - 1) / W * W;
  d.off = d.S - d.T;
  d.scale = scale;
  d.causal = causal;
  return d;
}

// [B*Hkv, S, D] -> [B*Hkv, D, Spad], zero padded, so S = Q K^T reads contiguous key rows.
void transpose_heads(const float* src, float* dst, const Dims& d) {
  parallel_for(d.B * d.Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const float* s = src + bh * d.S * d.D;
      float* t = dst + bh * d.D * d.Spad;
      for (int64_t j = 0; j < d.S; ++j)
        for (int64_t c = 0; c < d.D; ++c) t[c * d.Spad + j] = s[j * d.D + c];
      for (int64_t c = 0; c < d.D; ++c)
        for (int64_t j = d.S; j < d.Spad; ++j) t[c * d.Spad + j] = 0.0f;
    }
  });
}

// row[0:n] *= scale, returns the max of the scaled values.
float scale_and_max(float* row, int64_t n, float scale) {
  vf vs = splat(scale), m = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf x = load(row + j) * vs;
    store(row + j, x);
    m = vmax(m, x);
  }
  float mm = hmax(m);
  for (; j < n; ++j) {
    row[j] *= scale;
    mm = row[j] > mm ? row[j] : mm;
  }
  return mm;
}

// row[j] = exp(row[j] - m) for j < n, 0 for n <= j < npad; returns the sum.
float exp_and_sum(float* row, int64_t n, int64_t npad, float m) {
  vf vm = splat(m), s{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf e = vexp(load(row + j) - vm);
    store(row + j, e);
    s += e;
  }
  float ss = hsum(s);
  for (; j < n; ++j) ss += (row[j] = sexp(row[j] - m));
  for (; j < npad; ++j) row[j] = 0.0f;
  return ss;
}

float dot(const float* a, const float* b, int64_t n) {
  vf s{};
  int64_t j = 0;
  for (; j + W <= n; j += W) s += load(a + j) * load(b + j);
  float r = hsum(s);
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}

void forward_block(const Dims& d, const float* q, const float* kt, const float* v, float* o,
                   float* lse, int64_t item, float* sbuf) {
  int64_t nqb = (d.T + BQ - 1) / BQ;
  int64_t bh = item / nqb, i0 = (item % nqb) * BQ;
  int64_t b = bh / d.H, h = bh % d.H, kvh = b * d.Hkv + h / d.G;
  int64_t bq = std::min(BQ, d.T - i0);
  const float* Q = q + (bh * d.T + i0) * d.D;
  const float* Kt = kt + kvh * d.D * d.Spad;
  const float* V = v + kvh * d.S * d.D;
  float* O = o + (bh * d.T + i0) * d.D;
  float* L = lse + bh * d.T + i0;

  // sbuf holds key columns [kb, kb + width) of the block's score rows.
  int64_t kb = d.first_col(b, i0);
  int64_t kend = std::max<int64_t>(kb, d.lim(i0 + bq - 1));
  int64_t width = (kend - kb + W - 1) / W * W;
  auto all_d = [&](int64_t, int) { return std::pair<int64_t, int64_t>(0, d.D); };
  if (width > 0) gemm(bq, width, Q, d.D, 1, Kt + kb, d.Spad, sbuf, width, false, all_d);

  float inv[BQ];
  for (int64_t r = 0; r < bq; ++r) {
    float* row = sbuf + r * width;
    int64_t a = d.lo(b, i0 + r) - kb, n = std::max<int64_t>(a, d.lim(i0 + r) - kb);
    if (n == a) {  // no visible key: output 0, lse -inf (backward treats P as 0)
      std::fill(row, row + width, 0.0f);
      L[r] = -std::numeric_limits<float>::infinity();
      inv[r] = 0.0f;
      continue;
    }
    std::fill(row, row + a, 0.0f);  // keys of earlier segments
    float m = scale_and_max(row + a, n - a, d.scale);
    float sum = exp_and_sum(row + a, n - a, width - a, m);
    L[r] = m + std::log(sum);
    inv[r] = 1.0f / sum;
  }
  // O = P V over the keys each 4-row group can see (P is 0 outside a row's own interval).
  gemm(bq, d.D, sbuf, width, 1, V + kb * d.D, d.D, O, d.D, false, [&](int64_t i, int mr) {
    int64_t first = d.lo(b, i0 + i) - kb;
    return std::pair<int64_t, int64_t>(first, std::max<int64_t>(first, d.lim(i0 + i + mr - 1) - kb));
  });
  for (int64_t r = 0; r < bq; ++r) {
    vf s = splat(inv[r]);
    float* orow = O + r * d.D;
    for (int64_t c = 0; c < d.D; c += W) store(orow + c, load(orow + c) * s);
  }
}

void backward_task(const Dims& d, const float* q, const float* k, const float* kt,
                   const float* vt, const float* o, const float* lse, const float* dout,
                   float* dq, float* dk, float* dv, int64_t task, float* pbuf, float* dpbuf) {
  int64_t b = task / d.Hkv, kvh = task;  // task indexes (b, kv head) == flat kv head
  const float* K = k + kvh * d.S * d.D;
  const float* Kt = kt + kvh * d.D * d.Spad;
  const float* Vt = vt + kvh * d.D * d.Spad;
  float* dK = dk + kvh * d.S * d.D;
  float* dV = dv + kvh * d.S * d.D;
  std::fill(dK, dK + d.S * d.D, 0.0f);
  std::fill(dV, dV + d.S * d.D, 0.0f);
  auto all_d = [&](int64_t, int) { return std::pair<int64_t, int64_t>(0, d.D); };

  for (int64_t g = 0; g < d.G; ++g) {
    int64_t bh = b * d.H + (kvh % d.Hkv) * d.G + g;
    for (int64_t i0 = 0; i0 < d.T; i0 += BQ) {
      int64_t bq = std::min(BQ, d.T - i0);
      int64_t off_rows = (bh * d.T + i0) * d.D;
      const float *Q = q + off_rows, *O = o + off_rows, *dO = dout + off_rows;
      const float* L = lse + bh * d.T + i0;
      float* dQ = dq + off_rows;
      int64_t kb = d.first_col(b, i0);  // the block's key columns: [kb, kend)
      int64_t kend = std::max<int64_t>(kb, d.lim(i0 + bq - 1));
      int64_t width = (kend - kb + W - 1) / W * W;
      if (kend == kb) {
        std::fill(dQ, dQ + bq * d.D, 0.0f);
        continue;
      }
      gemm(bq, width, Q, d.D, 1, Kt + kb, d.Spad, pbuf, width, false, all_d);    // scores
      gemm(bq, width, dO, d.D, 1, Vt + kb, d.Spad, dpbuf, width, false, all_d);  // dP = dO V^T
      for (int64_t r = 0; r < bq; ++r) {
        float* p = pbuf + r * width;
        float* dp = dpbuf + r * width;
        int64_t a = d.lo(b, i0 + r) - kb, n = std::max<int64_t>(a, d.lim(i0 + r) - kb);
        float di = dot(dO + r * d.D, O + r * d.D, d.D);  // = sum_j P_ij dP_ij
        vf vs = splat(d.scale), vl = splat(L[r]), vdi = splat(di);
        std::fill(p, p + a, 0.0f);
        std::fill(dp, dp + a, 0.0f);
        int64_t j = a;
        for (; j + W <= n; j += W) {  // P = exp(scale*s - lse), dS = scale * P * (dP - Di)
          vf pv = vexp(load(p + j) * vs - vl);
          store(p + j, pv);
          store(dp + j, pv * (load(dp + j) - vdi) * vs);
        }
        for (; j < n; ++j) {
          p[j] = sexp(p[j] * d.scale - L[r]);
          dp[j] = p[j] * (dp[j] - di) * d.scale;
        }
        std::fill(p + n, p + width, 0.0f);
        std::fill(dp + n, dp + width, 0.0f);
      }
      // dV += P^T dO and dK += dS^T Q: rows are keys; key group j0 only gets
      // contributions from query rows i >= j0 - off (the others are masked to 0).
      auto key_rows = [&](int64_t j0, int) {
        int64_t first = d.causal ? std::clamp<int64_t>(kb + j0 - d.off - i0, 0, bq) : 0;
        return std::pair<int64_t, int64_t>(first, bq);
      };
      gemm(kend - kb, d.D, pbuf, 1, width, dO, d.D, dV + kb * d.D, d.D, true, key_rows);
      gemm(kend - kb, d.D, dpbuf, 1, width, Q, d.D, dK + kb * d.D, d.D, true, key_rows);
      gemm(bq, d.D, dpbuf, width, 1, K + kb * d.D, d.D, dQ, d.D, false, [&](int64_t i, int mr) {  // dQ = dS K
        int64_t first = d.lo(b, i0 + i) - kb;
        return std::pair<int64_t, int64_t>(first, std::max<int64_t>(first, d.lim(i0 + i + mr - 1) - kb));
      });
    }
  }
}

void check_contiguous(const std::vector<mx::array>& in) {
  for (const auto& a : in)
    if (!a.flags().row_contiguous)
      throw std::runtime_error("[mlxflow kernels] attention input is not row-contiguous");
}

// Inputs: (q, k, v, out, lse, dout[, segments]).
class AttentionVJP : public mx::Primitive {
 public:
  AttentionVJP(mx::Stream s, float scale, bool causal, bool segmented)
      : mx::Primitive(s), scale_(scale), causal_(causal), segmented_(segmented) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_contiguous(in);
    auto& enc = begin_eval(stream(), in, outs);
    Dims d = make_dims(in[0], in[1], scale_, causal_);
    enc.dispatch([d, q = in[0].data<float>(), k = in[1].data<float>(), v = in[2].data<float>(),
                  o = in[3].data<float>(), lse = in[4].data<float>(), dout = in[5].data<float>(),
                  seg = segmented_ ? in[6].data<int32_t>() : nullptr,
                  dq = outs[0].data<float>(), dk = outs[1].data<float>(),
                  dv = outs[2].data<float>()]() mutable {
      std::vector<int32_t> starts;
      if (seg) d.start = (starts = segment_starts(seg, d.B, d.T)).data();
      std::vector<float> kt(d.B * d.Hkv * d.D * d.Spad), vt(kt.size());
      transpose_heads(k, kt.data(), d);
      transpose_heads(v, vt.data(), d);
      parallel_items(d.B * d.Hkv, [&](int64_t task) {
        std::vector<float> buf(2 * BQ * d.Spad);
        backward_task(d, q, k, kt.data(), vt.data(), o, lse, dout, dq, dk, dv, task, buf.data(),
                      buf.data() + BQ * d.Spad);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  const char* name() const override {
    return "MlxflowAttentionVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttentionVJP&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && segmented_ == o.segmented_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape(), in[1].shape(), in[2].shape()};
  }

 private:
  float scale_;
  bool causal_, segmented_;
};

// Inputs: (q, k, v[, segments]).
class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream s, float scale, bool causal, bool segmented)
      : mx::Primitive(s), scale_(scale), causal_(causal), segmented_(segmented) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_contiguous(in);
    auto& enc = begin_eval(stream(), in, outs);
    Dims d = make_dims(in[0], in[1], scale_, causal_);
    enc.dispatch([d, q = in[0].data<float>(), k = in[1].data<float>(), v = in[2].data<float>(),
                  seg = segmented_ ? in[3].data<int32_t>() : nullptr,
                  o = outs[0].data<float>(), lse = outs[1].data<float>()]() mutable {
      std::vector<int32_t> starts;
      if (seg) d.start = (starts = segment_starts(seg, d.B, d.T)).data();
      std::vector<float> kt(d.B * d.Hkv * d.D * d.Spad);
      transpose_heads(k, kt.data(), d);
      int64_t items = d.B * d.H * ((d.T + BQ - 1) / BQ);
      parallel_items(items, [&](int64_t item) {
        thread_local std::vector<float> sbuf;  // reused across blocks of this thread
        sbuf.resize(BQ * d.Spad);
        forward_block(d, q, kt.data(), v, o, lse, item, sbuf.data());
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    auto s = stream();
    // The lse output is internal (never returned to Python), so its cotangent is zero.
    auto dout = mx::contiguous(mx::astype(cotangents[0], mx::float32, s), false, s);
    std::vector<mx::array> in = {primals[0], primals[1], primals[2], outputs[0], outputs[1], dout};
    if (segmented_) in.push_back(primals[3]);
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape(), primals[2].shape()},
        {mx::float32, mx::float32, mx::float32},
        std::make_shared<AttentionVJP>(s, scale_, causal_, segmented_), in);
    std::vector<mx::array> res;
    for (int a : argnums)  // segment ids are integers: no gradient
      res.push_back(a < 3 ? grads[a] : mx::zeros_like(primals[a], s));
    return res;
  }
  const char* name() const override {
    return "MlxflowAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && segmented_ == o.segmented_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto& q = in[0];
    return {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
  }

 private:
  float scale_;
  bool causal_, segmented_;
};

}  // namespace

std::vector<mx::array> attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                 float scale, bool causal,
                                 const std::optional<mx::array>& segments,
                                 mx::StreamOrDevice s) {
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) no_gpu("attention");
  for (const auto* a : {&q, &k, &v})
    if (a->ndim() != 4 || a->dtype() != mx::float32)
      throw std::invalid_argument("[mlxflow kernels] attention: q, k, v must be float32 4-D");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3) ||
      q.shape(1) % k.shape(1) != 0 || q.shape(3) % W != 0)
    throw std::invalid_argument(
        "[mlxflow kernels] attention: need q [B,H,T,D], k=v [B,Hkv,S,D], H % Hkv == 0, D % 8 == 0");
  std::vector<mx::array> in = {mx::contiguous(q, false, st), mx::contiguous(k, false, st),
                               mx::contiguous(v, false, st)};
  if (segments) {
    const auto& sg = *segments;
    if (!causal || q.shape(2) != k.shape(2) || sg.ndim() != 2 || sg.dtype() != mx::int32 ||
        sg.shape(0) != q.shape(0) || sg.shape(1) != q.shape(2))
      throw std::invalid_argument(
          "[mlxflow kernels] attention: segments need causal attention with T == S and int32 "
          "ids [B, T]");
    in.push_back(mx::contiguous(sg, false, st));
  }
  auto lse_shape = mx::Shape{q.shape(0), q.shape(1), q.shape(2)};
  return mx::array::make_arrays({q.shape(), lse_shape}, {mx::float32, mx::float32},
                                std::make_shared<Attention>(st, scale, causal, segments.has_value()),
                                in);
}

}  // namespace mlxk
