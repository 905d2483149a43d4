// Portable 8-wide float SIMD helpers, a vectorized exp, and a tiny parallel_for.
//
// Why GCC/Clang vector extensions instead of <immintrin.h>: the same source compiles to
// AVX2+FMA ymm code with -march=native on this x86 box, to 2x SSE on an old x86, and to
// 2x NEON on Linux/aarch64, with no per-ISA code paths. The compiler is asked to contract
// a*b+c into FMA (-ffp-contract=fast); we never use -ffast-math, because the exp below
// relies on exact IEEE rounding for its round-to-nearest trick and we want NaN to propagate.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace mlxk {

constexpr int W = 8;  // lanes per vector
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);  // compiles to one unaligned vector load
  return v;
}
static inline void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof v);
}
static inline vf splat(float s) {
  // Not `vf{} + s`: 0.0f + s is not an identity for s = -0.0f, so without -ffast-math the
  // compiler keeps a scalar add before the broadcast (measured: 1/4 of the gemm loop).
  return vf{s, s, s, s, s, s, s, s};
}
// NaN handling: `a > b ? a : b` returns b when a is NaN; callers that need NaN to
// surface (row max) get it back through the exp/sum that follows (exp(NaN) = NaN).
static inline vf vmax(vf a, vf b) {
  return a > b ? a : b;
}
static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
static inline float hsum(vf v) {
  // pairwise: fewer dependent adds and a little more accurate than a serial sum
  float a = (v[0] + v[4]) + (v[2] + v[6]);
  float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

// exp(x) for 8 lanes: max error 0.92 ulp (measured on 1.7M points in [-87, 88]), exactly 0 for
// x < -87.3 (including -inf) and NaN for NaN.
//   e^x = 2^n * e^r,  n = round(x / ln2),  r = x - n*ln2 in [-ln2/2, ln2/2]
// ln2 is split in a high part with few mantissa bits (so n*LN2_HI is exact) and a low
// correction (Cody-Waite). e^r is a degree-7 Taylor polynomial: the truncation error
// r^8/8! < 6e-9 is below float precision on this interval. 2^n is built by writing n+127
// into the exponent field.
static inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  vf xc = x < lo ? lo : x;  // written so that NaN falls through unchanged
  xc = xc > hi ? hi : xc;
  // round-to-nearest via the 1.5*2^23 "magic number": adding it pushes the fraction
  // bits out of the mantissa, the integer lands in the low mantissa bits.
  const vf magic = splat(12582912.0f);
  vf t = xc * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)magic;  // bit reinterpretation: the integer n itself
  vf r = xc - n * splat(0.693359375f);  // LN2_HI: 9 significant bits
  r = r - n * splat(-2.12194440e-4f);   // LN2_LO = ln2 - LN2_HI
  vf p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vf scale = (vf)((ni + 127) << 23);
  vf y = p * scale;
  return x < lo ? vf{} : y;
}

static inline float sexp(float x) {  // scalar tail helper, same numerics as vexp
  vf v = splat(x);
  return vexp(v)[0];
}

// sum_j exp(x_j - m) over a row of V floats (the softmax normaliser once m = max_j x_j)
static inline float row_sum_exp(const float* x, int64_t V, float m) {
  vf vm = splat(m), s0{}, s1{};
  int64_t j = 0;
  for (; j + 2 * W <= V; j += 2 * W) {
    s0 += vexp(load(x + j) - vm);
    s1 += vexp(load(x + j + W) - vm);
  }
  for (; j + W <= V; j += W) s0 += vexp(load(x + j) - vm);
  float s = hsum(s0 + s1);
  for (; j < V; ++j) s += sexp(x[j] - m);
  return s;
}

// ---------------------------------------------------------------------------------------
// Threads. MLX runs every CPU primitive on a single stream thread, so an op that wants
// more cores must fan out itself. The pool size is the number of CPUs this process may
// run on (sched_getaffinity, which respects taskset/cgroup cpusets), overridable with
// MLXFLOW_KERNEL_THREADS. Threads are spawned per call: ~20 us each, negligible next to
// the millisecond-scale ops this is used for, and it avoids a process-global pool that
// would outlive the interpreter's teardown.
static inline int num_threads() {
  static int n = [] {
    if (const char* s = std::getenv("MLXFLOW_KERNEL_THREADS")) {
      int v = std::atoi(s);
      if (v > 0) return std::min(v, 256);
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return int(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// Runs f(begin, end) over [0, n) split into contiguous chunks, one per thread, using
// fewer threads when there are fewer than `grain` items per thread.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  int64_t nt = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  if (nt <= 1) {
    f(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  int64_t chunk = (n + nt - 1) / nt;
  for (int64_t t = 1; t < nt; ++t) {
    int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&f, b, e] { f(b, e); });
  }
  f(int64_t(0), std::min(n, chunk));
  for (auto& th : pool) th.join();
}

// Like parallel_for but hands out items one by one from a shared counter: for work items
// of uneven cost (causal attention rows).
template <class F>
void parallel_items(int64_t n, F&& f) {
  int64_t nt = std::min<int64_t>(num_threads(), n);
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace mlxk
