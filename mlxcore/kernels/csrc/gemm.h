// A small register-blocked matrix kernel for the attention primitives.
//
//   C[i, 0:N] (= or +=) sum_{k in krange(i)} A(i, k) * B[k, 0:N]
//
// A is addressed through two strides (so A or A^T can be read without a copy), B is
// row-major with contiguous rows, N is a multiple of 8 (callers pad). Every product in
// attention has this "broadcast one A scalar, multiply a contiguous B row" shape once K
// and V are also kept transposed: S = Q K^T, O = P V, dP = dO V^T, dQ = dS K,
// dK = dS^T Q, dV = P^T dO.
//
// Why not MKL: the blocks are tiny (32 x 64 x kv_len) and strided, the causal structure
// gives every 4-row group its own reduction range, and calling a threaded BLAS from our
// own worker threads would oversubscribe the cores. 4 rows x 16 columns uses 8 of the 16
// AVX2 registers for accumulators; each k step is 2 loads + 4 broadcasts + 8 FMAs.
#pragma once

#include <utility>

#include "simd.h"

namespace mlxk {

template <int MR, int NV>
static inline void micro_kernel(int64_t kb, int64_t ke, const float* A, int64_t a_rs,
                                int64_t a_cs, const float* B, int64_t ldb, float* C,
                                int64_t ldc, bool accumulate) {
  vf c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = vf{};
  for (int64_t k = kb; k < ke; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = load(B + k * ldb + v * W);
#if defined(__x86_64__)
      // Keep b in a register: GCC otherwise folds the load into each of the MR FMAs,
      // turning 2 loads per k step into 2*MR and making the loop load-port bound.
      asm("" : "+x"(b[v]));
#endif
    }
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * a_rs + k * a_cs]);
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* p = C + r * ldc + v * W;
      store(p, accumulate ? load(p) + c[r][v] : c[r][v]);
    }
}

template <int NV>
static inline void micro_rows(int mr, int64_t kb, int64_t ke, const float* A, int64_t a_rs,
                              int64_t a_cs, const float* B, int64_t ldb, float* C, int64_t ldc,
                              bool accumulate) {
  switch (mr) {  // the row count is a template argument so c[][] stays in registers
    case 4: return micro_kernel<4, NV>(kb, ke, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
    case 3: return micro_kernel<3, NV>(kb, ke, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
    case 2: return micro_kernel<2, NV>(kb, ke, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
    default: return micro_kernel<1, NV>(kb, ke, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
  }
}

// krange(i0, mr) -> std::pair<int64_t, int64_t>: the reduction range for rows [i0, i0+mr).
// Rows outside a range must have A == 0 there (causal masking), so skipping is exact.
template <class KRange>
void gemm(int64_t M, int64_t N, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate, KRange&& krange) {
  for (int64_t i = 0; i < M; i += 4) {
    int mr = int(std::min<int64_t>(4, M - i));
    auto [kb, ke] = krange(i, mr);
    const float* Ai = A + i * a_rs;
    float* Ci = C + i * ldc;
    int64_t j = 0;
    for (; j + 2 * W <= N; j += 2 * W)
      micro_rows<2>(mr, kb, ke, Ai, a_rs, a_cs, B + j, ldb, Ci + j, ldc, accumulate);
    if (j < N) micro_rows<1>(mr, kb, ke, Ai, a_rs, a_cs, B + j, ldb, Ci + j, ldc, accumulate);
  }
}

}  // namespace mlxk
