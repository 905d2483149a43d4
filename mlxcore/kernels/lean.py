"""Custom VJPs for the training step's layers: the same forward as MLX's, a backward that keeps
less alive (`lean_swiglu`) or lays its result out for its consumers (`lean_linear`).
`mlxcore.kernels.swiglu` / `linear` decide where they are used."""

from __future__ import annotations

from functools import partial

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx


@mx.custom_function
def lean_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x whose backward keeps only `gate` and `x` alive (same shapes).

    Autodiff of `silu(gate) * x` keeps sigmoid(gate) and silu(gate) from the forward until the
    backward: two more [tokens, intermediate] arrays per layer, the largest activations of a
    LLaMA layer. This vjp recomputes them from `gate` (elementwise, in float32), so a training
    step holds 2 x intermediate fewer values per token and layer (bench/activation_memory.py)."""
    return _silu_mul(gate, x)


@partial(mx.compile, shapeless=True)  # one fused kernel when called outside a compiled step (decoding)
def _silu_mul(gate: mx.array, x: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * x  # nn.silu(gate) * x, the forward mlx-lm computes


@lean_swiglu.vjp
def _lean_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _lean_swiglu_grads(gate, x, cotangent)


@partial(mx.compile, shapeless=True)
def _lean_swiglu_grads(gate: mx.array, x: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    """Two fused kernels, one per gradient, each reading only the inputs it needs and writing
    nothing else (`test_lean_swiglu_backward_is_two_kernels`).

    MLX fuses elementwise work into one kernel per output and writes to memory any node that
    two kernels share, or that its fuser reaches before all its users. So the gradients share
    no node: d_gate works in float32 inside its own kernel, and d_x computes silu(gate) in the
    input's dtype (as autodiff's backward does) with a sigmoid of its own, 0.5 (1 + tanh(gate / 2)).
    Sharing one float32 sigmoid and float32 copies of `gate` and `cotangent` wrote three float32
    [tokens, intermediate] arrays a layer and read them back: 10% of a 200mb step on an H100.
    Neither sigmoid may be the forward's `mx.sigmoid(gate)`, which `mx.compile` would merge with
    the forward's node and so keep alive for the backward after all: for float32 inputs (where
    `astype` is the input itself) d_gate writes the sigmoid as 1 / (1 + exp(-gate))."""
    g = gate.astype(mx.float32)
    if gate.dtype == mx.float32:  # exp(-g) has two users here, both reached before it is fused
        e = mx.exp(-g)
        dsilu = (1.0 + e * (1.0 + g)) / mx.square(1.0 + e)  # = s + g s (1 - s), s = 1 / (1 + e)
    else:
        s = mx.sigmoid(g)  # of the float32 copy: not the forward's node
        dsilu = s * (1.0 + g * (1.0 - s))
    d_gate = cotangent.astype(mx.float32) * x.astype(mx.float32) * dsilu
    d_x = cotangent * (gate * (0.5 + 0.5 * mx.tanh(0.5 * gate)))
    return d_gate.astype(gate.dtype), d_x.astype(x.dtype)


def _linear_grads(x, weights, cotangents, weight_grads_first: bool):
    """The input gradient (`sum_i g_i @ w_i`, each product after the first an `addmm` onto the
    running sum) and the weight gradients (`g_i.T @ x`); with `weight_grads_first`, the input
    gradient's products wait for the weight gradients (`mx.depends`)."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat = [c.reshape(-1, c.shape[-1]) for c in cotangents]
    d_w = [g.T @ flat_x for g in flat]
    if weight_grads_first:
        flat = mx.depends(flat, d_w)
    dx = flat[0] @ weights[0]
    for g, w in zip(flat[1:], weights[1:]):
        dx = mx.addmm(dx, g, w)
    return dx.reshape(x.shape), d_w


@mx.custom_function
def lean_linear(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T` (mlx.nn.Linear without a bias) whose weight gradient is `g.T @ x`: a
    [out, in] array in the weight's own row-major layout.

    Autodiff computes it as `(x.T @ g).T`, the [in, out] product viewed transposed. On an H100
    (200mb, bf16, B32xT1024) every consumer that needs the gradient contiguous then copies it:
    the multi-tensor clip norm and AdamW kernels (`mlxcore.kernels.cuda`) did, twice per weight,
    210 `copy_col_row` kernels and 5.3 ms of a step. The input gradient is autodiff's own `g @ weight`.
    A gradient nobody asks for (a frozen base weight under LoRA) is never evaluated."""
    return x @ weight.T


@lean_linear.vjp
def _lean_linear_vjp(primals, cotangent, output):
    dx, (d_w,) = _linear_grads(primals[0], primals[1:], [cotangent], weight_grads_first=False)
    return dx, d_w


@mx.custom_function
def lean_linear_trained(x: mx.array, weight: mx.array) -> mx.array:
    """`lean_linear` for a weight that is trained: its gradient is computed before the input's.

    MLX-CUDA runs the independent kernels of its graph side by side, so the two GEMMs of a
    linear layer's backward shared the GPU, and cuBLASLt's split-K weight-gradient GEMMs and their
    reductions took up to 7x their time alone (README, "Kernel by kernel"). Ordered so, the
    200mb bf16 step on an H100 took 1.3-1.8% less time, and its peak memory fell 6% (README,
    "Weight gradients first"). Only for a weight whose gradient is wanted: the dependency makes
    it evaluated (`lean_linear` leaves a frozen weight's unevaluated)."""
    return x @ weight.T


@lean_linear_trained.vjp
def _lean_linear_trained_vjp(primals, cotangent, output):
    dx, (d_w,) = _linear_grads(primals[0], primals[1:], [cotangent], weight_grads_first=True)
    return dx, d_w


@mx.custom_function
def lean_projections(x: mx.array, *weights: mx.array) -> tuple[mx.array, ...]:
    """`tuple(x @ w.T for w in weights)`: the bias-free projections of one input (an attention's
    q, k, v; an MLP's gate and up) whose input gradient is one sum built in the products' epilogues.

    Autodiff computes each projection's input gradient `g_i @ w_i` and adds them with separate
    kernels: on an H100 (200mb, bf16, B32xT1024) three of the five bf16 additions a layer of the
    backward, each a pass over a [tokens, hidden] array. Here the first product is the sum's
    start and every other one is `mx.addmm(sum, g_i, w_i)`, which cuBLASLt computes as one GEMM
    that reads the running sum as its C. The weight gradients are `lean_linear`'s, `g_i.T @ x`."""
    return tuple(x @ w.T for w in weights)


@lean_projections.vjp
def _lean_projections_vjp(primals, cotangents, outputs):
    dx, d_w = _linear_grads(primals[0], primals[1:], cotangents, weight_grads_first=False)
    return (dx, *d_w)


@mx.custom_function
def lean_projections_trained(x: mx.array, *weights: mx.array) -> tuple[mx.array, ...]:
    """`lean_projections` for trained weights: their gradients are computed before the input's
    (see `lean_linear_trained`)."""
    return tuple(x @ w.T for w in weights)


@lean_projections_trained.vjp
def _lean_projections_trained_vjp(primals, cotangents, outputs):
    dx, d_w = _linear_grads(primals[0], primals[1:], cotangents, weight_grads_first=True)
    return (dx, *d_w)
