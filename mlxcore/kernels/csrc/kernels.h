// Public C++ ops of the mlxflow CPU kernel extension (bound to Python in bindings.cpp).
//
// Every op builds MLX graph nodes (custom Primitives) lazily, exactly like mlx::core ops:
// nothing runs until the array is evaluated, the nodes work under mx.compile, and their
// vjp() returns further custom nodes, so nn.value_and_grad differentiates through them.
// They only implement eval_cpu: the Python layer calls them only for CPU streams.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mlxk {
namespace mx = mlx::core;

// Per-row cross-entropy of float32 logits [N, V] against int32 targets [N].
// Returns {loss [N], lse [N]} (float32); lse = logsumexp of each row, kept for the
// backward pass. Targets outside [0, V) give loss 0 and a zero loss-gradient (ignore).
std::vector<mx::array> cross_entropy(
    const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s = {});

// Causal-optional grouped-query attention. q [B, H, T, D], k/v [B, Hkv, T', D] float32,
// H a multiple of Hkv. With causal=true, query i attends keys j <= i + (T' - T).
// With int32 `segments` [B, T] (causal, T' == T: packed sequences) query i attends only
// keys j <= i of its own run of equal ids.
// Returns {out [B, H, T, D], lse [B, H, T]} (lse kept for the backward pass).
std::vector<mx::array> attention(
    const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
    const std::optional<mx::array>& segments = std::nullopt, mx::StreamOrDevice s = {});

// silu(a) * b for float32 a, b of one shape (the SwiGLU gate of LLaMA MLPs).
mx::array swiglu(const mx::array& a, const mx::array& b, mx::StreamOrDevice s = {});

// y = x * rsqrt(mean(x^2, -1) + eps) * w for float32 x [..., D] and w [D] (differentiable in
// both; the backward recomputes the row norms from x).
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});

// mlx-lm's default RoPE (non-traditional, all D dims rotated) of float32 x [B, H, T, D]: what
// mx.fast.rope(x, D, traditional=false, base, scale, offset) returns, row-contiguous. With
// `offsets` (integer [B]) sequence b starts at position offsets[b] (mx.fast.rope's array offset).
mx::array rope(const mx::array& x, float base, float scale, int offset,
               const std::optional<mx::array>& offsets = std::nullopt, mx::StreamOrDevice s = {});

// One token per row of float32 logits [N, V] by inverse-CDF sampling with the given
// uniforms u [N] in [0, 1): from softmax(logits / temperature), restricted to mlx-lm's top-p
// set when 0 < top_p < 1. Returns {tokens [N] uint32, logprob [N] float32}, logprob being
// log_softmax(logits)[token] at temperature 1 without top-p (the model's own log-prob).
std::vector<mx::array> categorical_sample(const mx::array& logits, const mx::array& uniforms,
                                          float temperature, float top_p,
                                          mx::StreamOrDevice s = {});

// logits - logsumexp(logits, axis=-1) for float32 [N, V] (differentiable).
mx::array log_softmax(const mx::array& logits, mx::StreamOrDevice s = {});

// One AdamW step (mlx.optimizers.AdamW without bias correction, after clip_grad_norm) over
// float32 tensors: gradient (g * scale) * normalizer, decoupled weight decay, then Adam, in MLX's
// order and rounding. lr, scale, normalizer: scalars. Returns {p'..., m'..., v'...} (3n arrays).
std::vector<mx::array> adamw_step(const std::vector<mx::array>& params,
                                  const std::vector<mx::array>& grads,
                                  const std::vector<mx::array>& ms,
                                  const std::vector<mx::array>& vs, const mx::array& lr,
                                  const mx::array& scale, const mx::array& normalizer, double b1,
                                  double b2, double eps, double weight_decay,
                                  mx::StreamOrDevice s = {});

// Points libmlx's malloc / free at a pair that gives blocks of 4 KiB and more 64-byte aligned
// array data (MLX's CPU allocator puts an 8-byte header in front of malloc's memory). Returns the
// number of malloc call sites switched (0: nothing changed). Idempotent. See align.cpp.
int align_allocations();

// How many cross-entropy gradients reused the logits buffer (for tests and tuning).
extern std::atomic<int64_t> ce_grad_donations;

// Shared helper: a primitive that only exists on the CPU.
[[noreturn]] void no_gpu(const char* name);

// The preamble of an eval_cpu: allocate `outs` and register `in` and `outs` with the stream's
// command encoder (which keeps them alive until the dispatched task has run); returns it.
mx::cpu::CommandEncoder& begin_eval(const mx::Stream& s, const std::vector<mx::array>& in,
                                    std::vector<mx::array>& outs);

// Throws unless every array of `in` is row-contiguous (`what` names the op in the message).
void require_row_contiguous(const std::vector<mx::array>& in, const char* what);

// The vjp of a two-input primitive whose backward is one node `grad` of (x0, x1, g), g the
// float32 row-contiguous cotangent, giving both inputs' float32 gradients (shapes of x0, x1):
// the ones `argnums` asks for.
std::vector<mx::array> pair_vjp(const mx::Stream& s, const std::vector<mx::array>& primals,
                                const mx::array& cotangent, std::shared_ptr<mx::Primitive> grad,
                                const std::vector<int>& argnums);

}  // namespace mlxk
