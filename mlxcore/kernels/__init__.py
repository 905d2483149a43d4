"""Fast CPU kernels for the training step (token cross-entropy, causal GQA attention, SwiGLU)
and for sampling (categorical sampling with temperature / top-p, log-softmax).

    from mlxcore.kernels import cross_entropy, attention, swiglu
    losses = cross_entropy(logits, targets)          # [..., V], [...] -> float32 [...]
    out = attention(q, k, v, scale=D**-0.5)          # [B,H,T,D], [B,Hkv,S,D] x2 -> [B,H,T,D]
    out = attention(q, k, v, scale, segments=ids)    # packed rows: ids [B,T], attend within runs
    h = swiglu(gate, up)                             # silu(gate) * up, same shapes
    y = linear(x, w)                                 # x @ w.T; on CUDA the weight gradient in w's layout
    tok, lp = categorical_sample(logits, u, temperature=1.0, top_p=1.0)  # [..., V], [...] uniforms
    logp = log_softmax(logits)                       # logits - logsumexp(logits, -1), float32

Same API and semantics on every device. On the Linux CPU backend they run custom MLX
primitives from a small C++ extension (vectorized, multi-threaded; built on first use, see
`_build.py`); on CUDA, attention in bfloat16 / float16 runs cuDNN through `cuda_attention`
(also built on first use; `MLXFLOW_CUDA_LAYERS` without `attention` keeps MLX's); elsewhere — macOS/Metal, no compiler, `MLXFLOW_KERNELS=off`, an
unsupported shape — they are plain MLX ops (`reference_cross_entropy`,
`mx.fast.scaled_dot_product_attention`). Both paths are lazy graph ops: they compose with
`mx.compile`, `mx.grad` and `nn.value_and_grad` (the extension's vjp is a custom primitive).

Semantics beyond mlx.nn.losses.cross_entropy: targets outside [0, V) (e.g. -100 padding)
give loss 0 and no gradient, on both paths. Numbers and design notes: README.md here.
"""

from __future__ import annotations

import os

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlxcore.kernels import _build, cuda, cuda_addnorm, cuda_attention, cuda_rope, cuda_swiglu, cuda_xent
from mlxcore.kernels.lean import (_lean_swiglu_grads, _silu_mul, lean_linear, lean_linear_trained, lean_projections,  # noqa: F401  (API)
                                  lean_projections_trained, lean_swiglu)

__all__ = ["add_rms_norm", "add_rms_norm_on", "adamw_step", "attention", "available", "categorical_sample", "cross_entropy", "log_softmax",
           "reference_adamw_step", "reference_attention", "reference_categorical_sample", "reference_cross_entropy",
           "lean_linear", "lean_linear_trained", "lean_projections", "lean_projections_trained", "lean_swiglu", "linear", "projections", "reference_log_softmax", "reference_swiglu", "segment_starts", "status", "swiglu"]


def _ext():
    """The extension if it may run here and now (CPU default device), else None."""
    if _build.mode() == "off" or mx.default_device().type != mx.cpu:
        return None
    return _build.load()


def available() -> bool:
    """True when the fast CPU path will be used for calls made now (builds on first call)."""
    return _ext() is not None


def status() -> str:
    """One line for logs: which path is used and why."""
    if cuda.available():
        layers = [name for name in cuda.LAYERS if cuda.layer_on(name)]
        linear = (("lean linears and projection groups"
                   + (", weight gradients first" if _weight_grads_first() else " (MLXFLOW_WGRAD_FIRST=off)"))
                  if _lean_linear_on() else "autodiff's linears (MLXFLOW_LEAN_LINEAR=off)")
        return (f"CUDA: mlxflow kernels for {', '.join(layers) or 'no layer (MLXFLOW_CUDA_LAYERS=off)'}, "
                f"AdamW and the clip norm (fused_optimizer: auto); {linear}; {cuda_attention.status()}; "
                "MLX's ops elsewhere")
    if _build.mode() == "off":
        return "plain MLX ops (MLXFLOW_KERNELS=off)"
    if mx.default_device().type != mx.cpu:
        return f"plain MLX ops (default device {mx.default_device()})"
    ext = _build.load()
    if ext is None:
        return f"plain MLX ops ({_build.error()})"
    aligned = ", 64-byte aligned arrays" if _build.aligned() else ""
    return f"mlxflow CPU kernels ({ext.num_threads()} threads{aligned}, cache {_build.cache_root()})"


# ------------------------------------------------------------------------ cross-entropy
def reference_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Plain-MLX per-token cross-entropy (float32), with out-of-range targets ignored."""
    x = logits.astype(mx.float32)
    t = targets.astype(mx.int32)
    valid = (t >= 0) & (t < x.shape[-1])
    safe = mx.where(valid, t, 0)
    picked = mx.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return mx.where(valid, mx.logsumexp(x, axis=-1) - picked, 0.0)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy `logsumexp(logits) - logits[target]`, float32.

    logits [..., V] (any float dtype; computed in float32), targets [...] integer class ids.
    Differentiable w.r.t. logits: d/dlogits = (softmax - onehot) * g. On the CPU the fused C++
    kernel; on CUDA, for a training batch, `cuda_xent` (one kernel each way); else MLX's ops.
    """
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: logits {logits.shape} vs targets {targets.shape}: "
                         "targets must have the logits' shape without the last axis")
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"cross_entropy: targets must be integers, got {targets.dtype}")
    if logits.size >= LEAN_MIN_ELEMENTS and cuda_xent.supports(logits, targets) and cuda_xent.on():
        return cuda_xent.cross_entropy(logits, targets)  # CUDA: one kernel each way
    ext = _ext()
    if ext is None or not mx.issubdtype(logits.dtype, mx.floating) or logits.size == 0:
        return reference_cross_entropy(logits, targets)
    v = logits.shape[-1]
    x = logits.reshape(-1, v).astype(mx.float32)  # both no-ops for contiguous float32
    t = targets.reshape(-1).astype(mx.int32)
    return ext.cross_entropy(x, t).reshape(targets.shape)


# ---------------------------------------------------------------------------- attention
def segment_starts(segments: mx.array) -> mx.array:
    """int32 [..., T]: the index where each token's run of equal segment ids begins."""
    idx = mx.arange(segments.shape[-1], dtype=mx.int32)
    first = mx.ones((*segments.shape[:-1], 1), dtype=mx.bool_)
    new_run = mx.concatenate([first, segments[..., 1:] != segments[..., :-1]], axis=-1)
    return mx.cummax(mx.where(new_run, idx, 0), axis=-1)


def reference_attention(q, k, v, scale: float, causal: bool = True, segments: mx.array | None = None) -> mx.array:
    if segments is None:
        return mx.fast.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal" if causal else None)
    # block-diagonal causal: key j is visible to query i iff start(i) <= j <= i
    idx = mx.arange(q.shape[2])
    visible = (idx[None, :] <= idx[:, None]) & (idx[None, None, :] >= segment_starts(segments)[..., None])
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible[:, None])


def _attention_supported(q, k, v) -> bool:
    return (q.ndim == 4 and k.ndim == 4 and tuple(k.shape) == tuple(v.shape)
            and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and q.shape[3] % 8 == 0
            and q.size > 0 and k.size > 0
            and all(mx.issubdtype(a.dtype, mx.floating) for a in (q, k, v)))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              causal: bool = True, segments: mx.array | None = None) -> mx.array:
    """softmax(scale * q k^T [+ causal mask]) v with grouped-query heads.

    q [B, H, T, D], k/v [B, Hkv, S, D], H a multiple of Hkv. The causal mask is aligned
    bottom-right (query i sees keys j <= i + S - T), as mx.fast.scaled_dot_product_attention
    with mask="causal". Computed in float32; the result has q's dtype.

    `segments` (packed sequences; causal, S == T): integer ids [B, T]; query i then sees only
    the keys j <= i of its own run of equal ids (block-diagonal causal). The fused kernel
    skips the other runs' keys; the fallback passes the equivalent boolean mask to
    mx.fast.scaled_dot_product_attention.
    """
    if segments is not None and (not causal or tuple(segments.shape) != (q.shape[0], q.shape[2])
                                 or k.shape[2] != q.shape[2]):
        raise ValueError(f"attention: segment ids {segments.shape} need causal attention with "
                         f"ids [B, T] for q {q.shape} and as many keys as queries (k {k.shape})")
    if segments is None and cuda_attention.applies(q, k, v, causal):  # CUDA: cuDNN, top-left causal mask
        return cuda_attention.attention(q, k, v, scale, causal)
    ext = _ext()
    if ext is None or not _attention_supported(q, k, v):
        return reference_attention(q, k, v, scale, causal, segments)
    dtype = q.dtype
    f32 = [a.astype(mx.float32) for a in (q, k, v)]
    if segments is None:
        return ext.attention(*f32, float(scale), bool(causal)).astype(dtype)
    return ext.attention(*f32, float(scale), True, segments.astype(mx.int32)).astype(dtype)


# ------------------------------------------------------------------------------- swiglu
def reference_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return mx.sigmoid(gate) * gate * x  # = nn.silu(gate) * x, without importing mlx.nn


# Below this many elements (decoding: a few tokens a step) the lean backward saves under 512 KB a
# layer, and `mx.custom_function`'s dispatch (~5 us a call) costs more than it is worth.
LEAN_MIN_ELEMENTS = 1 << 16


def _lean_on() -> bool:
    """`MLXFLOW_LEAN`: auto (the default) and on take `lean_swiglu`, off mlx-lm's autodiff. On an H100
    (200mb, bf16, B32xT1024) the lean backward peaked at 15.5 instead of 19.2 GB (PyTorch: 12.5) in
    74.0 instead of 78.0 ms a step; on the CPU it keeps 21% fewer activation bytes per layer at the
    same speed (README, "Lean activations"). Metal runs the same two fused kernels (not measured)."""
    return os.environ.get("MLXFLOW_LEAN", "auto").lower() not in ("0", "off", "false", "no")


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x (the LLaMA MLP gate). Fast paths: float32 arrays of one shape on the CPU;
    on CUDA a training batch's `cuda_swiglu` (one kernel each way); elsewhere `lean_swiglu`
    (same shapes; `MLXFLOW_LEAN=off`: mlx-lm's own fused form, whose autodiff keeps two more
    arrays), else plain ops (broadcasting shapes)."""
    same = tuple(gate.shape) == tuple(x.shape) and gate.dtype == x.dtype and gate.size > 0
    ext = _ext()
    if ext is not None and same and gate.dtype == mx.float32:
        return ext.swiglu(gate, x)
    if not same:
        return reference_swiglu(gate, x)
    if gate.size < LEAN_MIN_ELEMENTS or not _lean_on():
        return _silu_mul(gate, x)
    return cuda_swiglu.swiglu(gate, x) if cuda_swiglu.supports(gate, x) and cuda_swiglu.on() else lean_swiglu(gate, x)


# ------------------------------------------------------------------------------- linear
def _lean_linear_on() -> bool:
    """`MLXFLOW_LEAN_LINEAR`: auto (the default) takes `lean_linear` on CUDA, on everywhere, off never."""
    mode = os.environ.get("MLXFLOW_LEAN_LINEAR", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    return mode in ("1", "on", "true", "yes") or cuda.available()


def _weight_grads_first() -> bool:
    """`MLXFLOW_WGRAD_FIRST`: on (the default) orders a trained linear layer's weight gradients
    before its input gradient (`lean_linear_trained`); off lets MLX schedule them."""
    return os.environ.get("MLXFLOW_WGRAD_FIRST", "on").lower() not in ("0", "off", "false", "no")


def linear(x: mx.array, weight: mx.array, trained: bool = False) -> mx.array:
    """`x @ weight.T`: `lean_linear` where `_lean_linear_on` says so and the input is a training
    batch (at least `LEAN_MIN_ELEMENTS` values), else the plain product (the CPU: MLX's autodiff
    keeps the existing bits; decoding: no custom-function dispatch). `trained`: the weight's
    gradient is wanted, so it may be computed first (`lean_linear_trained`)."""
    if x.size >= LEAN_MIN_ELEMENTS and x.ndim >= 2 and weight.ndim == 2 and _lean_linear_on():
        return (lean_linear_trained if trained and _weight_grads_first() else lean_linear)(x, weight)
    return x @ weight.T


def projections_on(x: mx.array) -> bool:
    """Whether `projections` of `x` take `lean_projections`: `linear`'s conditions for its lean path."""
    return x.size >= LEAN_MIN_ELEMENTS and x.ndim >= 2 and _lean_linear_on()


def projections(x: mx.array, weights, trained: bool = False) -> tuple[mx.array, ...]:
    """`tuple(x @ w.T for w in weights)`: `lean_projections` (one input gradient, summed in the
    products' epilogues) where `projections_on(x)`, else plain products. `trained`: every
    weight's gradient is wanted (`lean_projections_trained`, as `linear`)."""
    weights = list(weights)
    if len(weights) > 1 and all(w.ndim == 2 for w in weights) and projections_on(x):
        return (lean_projections_trained if trained and _weight_grads_first() else lean_projections)(x, *weights)
    return tuple(x @ w.T for w in weights)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """`mx.fast.rms_norm(x, weight, eps)`. Fast path: float32 `x [..., D]` and `weight [D]` on the
    CPU (one pass each way; MLX has no CPU kernel for it and composes five ops); elsewhere MLX's."""
    ext = _ext()
    if (ext is not None and x.dtype == mx.float32 and weight is not None and weight.dtype == mx.float32
            and weight.ndim == 1 and x.ndim >= 1 and x.shape[-1] == weight.shape[0] and x.size > 0):
        return ext.rms_norm(x, weight, float(eps))
    return mx.fast.rms_norm(x, weight, eps)


def add_rms_norm_on(x: mx.array, weight: mx.array) -> bool:
    """Whether `add_rms_norm(x, ...)` takes `cuda_addnorm`'s kernels: on CUDA (`MLXFLOW_CUDA_LAYERS`),
    for a training batch of a supported dtype and width."""
    return x.size >= LEAN_MIN_ELEMENTS and cuda_addnorm.supports(x, x, weight) and cuda_addnorm.on()


def add_rms_norm(a: mx.array, b: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """`(s, rms_norm(s, weight, eps))` with `s = a + b`: a residual sum and the norm after it. On
    CUDA where `add_rms_norm_on` says so one kernel each way (`cuda_addnorm`), else the two ops."""
    if add_rms_norm_on(a, weight) and cuda_addnorm.supports(a, b, weight):
        return cuda_addnorm.add_rms_norm(a, b, weight, eps)
    s = a + b
    return s, rms_norm(s, weight, eps)


def rope(x: mx.array, dims: int, *, traditional: bool, base: float | None, scale: float,
         offset=0, freqs=None) -> mx.array:
    """`mx.fast.rope(x, dims, ...)`. Fast paths: mlx-lm's default RoPE on the CPU (float32 x [B, H,
    T, D], all D dims, not traditional, a base, an int offset or integer per-sequence offsets [B]
    as a packed batch passes them): one pass each way, the transposed input read in place; on
    CUDA, a training batch x [B, H, T, D] with a base and an int offset (`cuda_rope`); elsewhere MLX's."""
    if (x.ndim == 4 and isinstance(offset, int) and freqs is None and base is not None
            and x.size >= LEAN_MIN_ELEMENTS and cuda_rope.supports(x.dtype, x.shape[-1], dims, traditional)
            and cuda_rope.on()):
        return cuda_rope.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
    ext = _ext()
    per_sequence = (isinstance(offset, mx.array) and offset.ndim == 1 and x.ndim == 4
                    and offset.shape[0] == x.shape[0] and mx.issubdtype(offset.dtype, mx.integer))
    if (ext is not None and x.dtype == mx.float32 and x.ndim == 4 and dims == x.shape[-1] and dims % 2 == 0
            and not traditional and freqs is None and base is not None
            and (isinstance(offset, int) or per_sequence) and x.size > 0):
        if per_sequence:
            return ext.rope(x, float(base), float(scale), 0, offset)
        return ext.rope(x, float(base), float(scale), int(offset))
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)


# ----------------------------------------------------------------------------- sampling
def _top_p_keep(logp: mx.array, top_p: float) -> mx.array:
    """mlx_lm.sample_utils.apply_top_p's kept set as a mask: sorted descending, a token is kept
    while the probability mass strictly above it is < top_p (ties with the last kept one too)."""
    ascending = mx.sort(logp, axis=-1)
    probs = mx.exp(ascending)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    total = mass_above[..., :1] + probs[..., :1]
    dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    return logp >= mx.take_along_axis(ascending, dropped, axis=-1)


def reference_categorical_sample(logits: mx.array, uniforms: mx.array, temperature: float = 1.0,
                                 top_p: float = 1.0) -> tuple[mx.array, mx.array]:
    """Plain-MLX `categorical_sample`: the same inverse CDF with the same uniforms."""
    x = logits.astype(mx.float32)
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    w = mx.exp((x - mx.max(x, axis=-1, keepdims=True)) * (1.0 / temperature))
    if 0.0 < top_p < 1.0:
        w = mx.where(_top_p_keep(logp, top_p), w, 0.0)
    cdf = mx.cumsum(w, axis=-1)
    target = uniforms.astype(mx.float32)[..., None] * cdf[..., -1:]
    tokens = (cdf <= target).sum(axis=-1)
    # float rounding can put the target at the very top: take the last token with weight
    last = x.shape[-1] - 1 - mx.argmax((w > 0)[..., ::-1], axis=-1)
    tokens = mx.minimum(tokens, last).astype(mx.uint32)
    return tokens, mx.take_along_axis(logp, tokens[..., None].astype(mx.int32), axis=-1)[..., 0]


def categorical_sample(logits: mx.array, uniforms: mx.array, temperature: float = 1.0,
                       top_p: float = 1.0) -> tuple[mx.array, mx.array]:
    """One token per row from softmax(logits / temperature), by inverse CDF with `uniforms`.

    logits [..., V] (any float dtype; computed in float32), uniforms [...] in [0, 1) (e.g.
    `mx.random.uniform(shape=logits.shape[:-1])`, so `mx.random.seed` makes it reproducible).
    With 0 < top_p < 1 the draw is restricted to mlx-lm's top-p set (`apply_top_p`, computed on
    the temperature-1 probabilities). Returns (tokens uint32 [...], logprobs float32 [...]),
    logprobs being log_softmax(logits)[token]: the model's own log-probability of the token at
    temperature 1 and without top-p. temperature must be > 0 (greedy is an argmax).
    """
    if not temperature > 0:
        raise ValueError(f"categorical_sample: temperature must be > 0, got {temperature}")
    if logits.ndim < 1 or tuple(uniforms.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"categorical_sample: logits {logits.shape} vs uniforms {uniforms.shape}: "
                         "uniforms must have the logits' shape without the last axis")
    ext = _ext()
    if ext is None or not mx.issubdtype(logits.dtype, mx.floating) or logits.size == 0:
        return reference_categorical_sample(logits, uniforms, temperature, top_p)
    v = logits.shape[-1]
    tokens, logprobs = ext.categorical_sample(logits.reshape(-1, v).astype(mx.float32),
                                              uniforms.reshape(-1).astype(mx.float32),
                                              float(temperature), float(top_p))
    return tokens.reshape(uniforms.shape), logprobs.reshape(uniforms.shape)


def reference_log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def log_softmax(logits: mx.array) -> mx.array:
    """logits - logsumexp(logits, axis=-1) in float32, differentiable."""
    ext = _ext()
    if ext is None or logits.ndim < 1 or not mx.issubdtype(logits.dtype, mx.floating) or logits.size == 0:
        return reference_log_softmax(logits)
    v = logits.shape[-1]
    return ext.log_softmax(logits.reshape(-1, v).astype(mx.float32)).reshape(logits.shape)


# ------------------------------------------------------------------------ AdamW step
def reference_adamw_step(params, grads, m, v, lr, scale, normalizer, b1: float, b2: float, eps: float,
                         weight_decay: float) -> list[mx.array]:
    """Plain-MLX `adamw_step`: mlx.optimizers.AdamW's rule tensor by tensor, the same ops in the
    same order, computed in the moments' dtype and rounded to the parameter's (as
    `AdamWFloat32State` does for bfloat16 / float16 parameters; a no-op for float32 ones, and for
    plain AdamW's moments in the parameters' dtype)."""
    new_p, new_m, new_v = [], [], []
    for p, g, m_, v_ in zip(params, grads, m, v):
        lr_ = lr.astype(m_.dtype)  # AdamW's `learning_rate.astype(gradient.dtype)`
        g = ((g * scale.astype(g.dtype)) * normalizer).astype(g.dtype).astype(m_.dtype)  # as clip_grad_norm
        w = p.astype(m_.dtype) * (1 - lr_ * weight_decay)
        m_ = b1 * m_ + (1 - b1) * g
        v_ = b2 * v_ + (1 - b2) * mx.square(g)
        new_p.append((w - lr_ * m_ / (mx.sqrt(v_) + eps)).astype(p.dtype))
        new_m.append(m_)
        new_v.append(v_)
    return new_p + new_m + new_v


def fast_adamw(param_dtypes) -> bool:
    """Whether `adamw_step` has a fast path here for parameters of these dtypes: the CPU kernels
    for float32 parameters (and moments); on an NVIDIA GPU, `mlxcore.kernels.cuda` for float32,
    bfloat16 and float16 ones, with float32 moments or moments in the parameters' dtype."""
    dtypes = set(param_dtypes)
    if cuda.available():
        return _build.mode() != "off" and bool(dtypes) and cuda.dtypes_supported(dtypes)
    return _ext() is not None and dtypes == {mx.float32}


def adamw_step(params, grads, m, v, lr, scale, normalizer, b1: float, b2: float, eps: float,
               weight_decay: float) -> list[mx.array]:
    """One AdamW step (mlx.optimizers.AdamW without bias correction) over lists of parameters,
    gradients and moments (float32, or plain AdamW's in the parameters' dtype): the gradient taken
    as `(g * scale) * normalizer` (a mean over tokens, then `clip_grad_norm`'s scale), decoupled
    weight decay, then Adam, in the moments' dtype, the new parameters rounded to their dtype.
    Returns `[p'..., m'..., v'...]`. On the CPU (float32) one multi-threaded pass over every tensor,
    bit for bit MLX's arithmetic; on an NVIDIA GPU a few multi-tensor CUDA kernels
    (`mlxcore.kernels.cuda`); elsewhere (and with MLXFLOW_KERNELS=off) `reference_adamw_step`."""
    moments_f32 = all(x.dtype == mx.float32 for group in (m, v) for x in group)
    if fast_adamw(p.dtype for p in params):
        if cuda.available() and all(cuda.moments_supported(p.dtype, g.dtype, m_.dtype) and v_.dtype == m_.dtype
                                    for p, g, m_, v_ in zip(params, grads, m, v)):
            return cuda.adamw_step(params, grads, m, v, lr, scale, normalizer, b1, b2, eps, weight_decay)
        if not cuda.available() and moments_f32 and all(g.dtype == mx.float32 for g in grads):
            return _ext().adamw_step(list(params), list(grads), list(m), list(v), lr, scale, normalizer,
                                     float(b1), float(b2), float(eps), float(weight_decay))
    return reference_adamw_step(params, grads, m, v, lr, scale, normalizer, b1, b2, eps, weight_decay)
