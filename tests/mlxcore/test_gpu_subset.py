"""Device checks for `pytest -m gpu`: mlxcore.kernels' public functions (on a GPU: their plain-MLX
fallbacks) and quantized layers on the default device against float64 NumPy references.

These run on every backend (on the CPU: the fast kernels where built). Few, tiny shapes: MLX's
CUDA backend JIT-compiles each new shape the first time it sees it.
Tolerances: float32 results to 1e-4 (sums of up to 1k terms in another order, fast exp);
bfloat16 inputs to 2e-2 (its 8-bit mantissa); quantized products to 1e-3 of the output scale
(the reference multiplies the same dequantized weights in float64).
"""

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels

RNG = np.random.default_rng(0)


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_log_softmax_and_swiglu_match_float64(dtype):
    logits = mx.array(RNG.standard_normal((3, 5, 1000)) * 3).astype(getattr(mx, dtype))
    targets = mx.array(RNG.integers(0, 1000, (3, 5)))
    x = _np(logits)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    want = lse - np.take_along_axis(x, np.array(targets)[..., None], -1)[..., 0]
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(_np(kernels.cross_entropy(logits, targets)), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(_np(kernels.log_softmax(logits)), x - lse[..., None], rtol=tol, atol=tol)
    g = mx.grad(lambda z: kernels.cross_entropy(z, targets).sum())(logits.astype(mx.float32))
    onehot = np.eye(1000)[np.array(targets)]
    np.testing.assert_allclose(_np(g), _softmax(x) - onehot, atol=1e-5 if dtype == "float32" else 1e-2)
    a, b = (mx.array(RNG.standard_normal((4, 37))).astype(getattr(mx, dtype)) for _ in range(2))
    an, bn = _np(a), _np(b)
    np.testing.assert_allclose(_np(kernels.swiglu(a, b)), an / (1 + np.exp(-an)) * bn, rtol=tol, atol=tol)
    # the gradients (the default path's and lean_swiglu's own backward) against d/d(a,b) of silu(a) * b
    c = RNG.standard_normal((4, 37))
    sig = 1 / (1 + np.exp(-an))
    for swiglu in (kernels.swiglu, kernels.lean_swiglu):
        ga, gb = mx.grad(lambda a, b: (swiglu(a, b) * mx.array(c).astype(a.dtype)).sum(), argnums=(0, 1))(a, b)
        np.testing.assert_allclose(_np(ga), c * bn * (sig + an * sig * (1 - sig)), rtol=tol, atol=tol * 4)
        np.testing.assert_allclose(_np(gb), c * an * sig, rtol=tol, atol=tol * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("segmented", [False, True], ids=["causal", "packed"])
def test_attention_matches_float64(segmented):
    B, H, Hkv, T, D = 2, 4, 2, 24, 16
    q, k, v = (mx.array(RNG.standard_normal(s)).astype(mx.float32) for s in [(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)])
    seg = np.repeat(np.array([[0] * 10 + [1] * 14, [0] * 24]), 1, axis=0)
    out = kernels.attention(q, k, v, D**-0.5, True, mx.array(seg) if segmented else None)
    qn, kn, vn = _np(q), np.repeat(_np(k), H // Hkv, 1), np.repeat(_np(v), H // Hkv, 1)
    s = qn @ kn.transpose(0, 1, 3, 2) * D**-0.5
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    visible = np.broadcast_to(j <= i, (B, T, T)).copy()
    if segmented:
        visible &= seg[:, :, None] == seg[:, None, :]
    s = np.where(visible[:, None], s, -np.inf)
    np.testing.assert_allclose(_np(out), _softmax(s) @ vn, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lean_linear", "lean_linear_trained"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_linear_matches_float64_in_value_and_both_gradients(dtype, name):
    """`kernels.lean_linear` (a training step's linear layers on CUDA; `_trained`: the weight
    gradient first), compiled with its gradient: the product, the input gradient `g @ w` and the
    weight gradient `g.T @ x` (in the weight's layout) against float64 NumPy."""
    dt, fn = getattr(mx, dtype), getattr(kernels, name)
    x, w, c = (mx.array(RNG.standard_normal(s)).astype(dt) for s in ((2, 48, 64), (96, 64), (2, 48, 96)))
    grad = mx.compile(mx.grad(lambda x, w: (fn(x, w) * c).astype(mx.float32).sum(), argnums=(0, 1)))
    (gx, gw), y = grad(x, w), fn(x, w)
    xn, wn, cn = _np(x), _np(w), _np(c)
    _close_to_scale([(y, xn @ wn.T), (gx, cn @ wn), (gw, cn.reshape(-1, 96).T @ xn.reshape(-1, 64))], dt)


def _close_to_scale(pairs, dt) -> None:
    """Each (got, want) of dtype `dt` equals float64 `want` relative to its largest value."""
    tol = 1e-4 if dt == mx.float32 else 2e-2
    for got, want in pairs:
        assert got.dtype == dt and got.shape == want.shape
        scale = np.abs(want).max()
        np.testing.assert_allclose(_np(got) / scale, want / scale, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lean_projections", "lean_projections_trained"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_projections_match_float64_in_values_and_gradients(dtype, name):
    """`kernels.lean_projections` (a training step's q / k / v and gate / up on CUDA; `_trained`:
    the weight gradients first), compiled with its gradient: the input gradient summed with
    `addmm` (cuBLASLt's epilogue on CUDA) and each weight's, against float64 NumPy."""
    dt, fn = getattr(mx, dtype), getattr(kernels, name)
    x, wa, wb, ca, cb = (mx.array(RNG.standard_normal(s)).astype(dt)
                         for s in ((2, 48, 64), (96, 64), (32, 64), (2, 48, 96), (2, 48, 32)))
    grad = mx.compile(mx.grad(lambda x, wa, wb: sum((p * c).astype(mx.float32).sum() for p, c in
                                                    zip(fn(x, wa, wb), (ca, cb))),
                              argnums=(0, 1, 2)))
    gx, ga, gb = grad(x, wa, wb)
    xn, an, bn, can, cbn = (_np(a) for a in (x, wa, wb, ca, cb))
    wants = (can @ an + cbn @ bn, can.reshape(-1, 96).T @ xn.reshape(-1, 64), cbn.reshape(-1, 32).T @ xn.reshape(-1, 64))
    _close_to_scale(list(zip((gx, ga, gb), wants)), dt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_of_a_training_batch_matches_float64(dtype):
    """`kernels.swiglu` on a training-sized batch (on CUDA `cuda_swiglu`'s kernels; elsewhere the
    CPU kernel or `lean_swiglu`), compiled with its gradients. 66,057 values: not a multiple of
    the kernels' 16-byte pieces, so the last piece is partial."""
    dt = getattr(mx, dtype)
    a, b, c = (mx.array(RNG.standard_normal((3, 97, 227)) * 2).astype(dt) for _ in range(3))
    grad = mx.compile(mx.grad(lambda a, b: (kernels.swiglu(a, b) * c).astype(mx.float32).sum(), argnums=(0, 1)))
    y, (ga, gb) = kernels.swiglu(a, b), grad(a, b)
    an, bn, cn = _np(a), _np(b), _np(c)
    sig = 1 / (1 + np.exp(-an))
    tol = 1e-4 if dtype == "float32" else 2e-2
    for got, want in ((y, an * sig * bn), (ga, cn * bn * (sig + an * sig * (1 - sig))), (gb, cn * an * sig)):
        assert got.dtype == dt and got.shape == want.shape
        np.testing.assert_allclose(_np(got), want, rtol=tol, atol=tol * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [("float32", 768), ("bfloat16", 768), ("bfloat16", 904)])
def test_add_rms_norm_of_a_training_batch_matches_float64(dtype, d, monkeypatch):
    """`kernels.add_rms_norm` (on CUDA `cuda_addnorm`'s kernels, else the two ops), compiled with
    the gradients of a, b and the weight through both outputs. 904 wide: the last 16-byte piece of
    a row is held by some lanes only; 97 rows or more on 16 warps, so each warp loops over rows
    and they hold different numbers of them."""
    from mlxcore.kernels import cuda_addnorm

    monkeypatch.setattr(cuda_addnorm, "MAX_WARPS", 16)
    dt = getattr(mx, dtype)
    a, b, cs, cy = (mx.array(RNG.standard_normal((97, d))).astype(dt) for _ in range(4))
    w = mx.array(1 + 0.2 * RNG.standard_normal(d)).astype(dt)
    big = kernels.LEAN_MIN_ELEMENTS
    reps = -(-big // a.size)  # a training-sized batch: the kernels' path on CUDA
    a, b, cs, cy = (mx.tile(x, (reps, 1)) for x in (a, b, cs, cy))

    def loss(a, b, w):
        s, y = kernels.add_rms_norm(a, b, w, 1e-5)
        return (s * cs).astype(mx.float32).sum() + (y * cy).astype(mx.float32).sum()

    (s, y), (ga, gb, gw) = kernels.add_rms_norm(a, b, w, 1e-5), mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(a, b, w)
    an, bn, wn, csn, cyn = (_np(x) for x in (a, b, w, cs, cy))
    sn = _np((a + b))  # the sum rounded to the dtype, as the unfused add leaves it
    r = 1 / np.sqrt((sn * sn).mean(-1, keepdims=True) + 1e-5)
    g = cyn * wn
    d_s = csn + r * g - r ** 3 * (g * sn).sum(-1, keepdims=True) / d * sn
    tol = 1e-4 if dtype == "float32" else 2e-2
    for got, want in ((s, sn), (y, wn * sn * r), (ga, d_s), (gb, d_s)):
        assert got.dtype == dt and got.shape == want.shape
        np.testing.assert_allclose(_np(got), want, rtol=tol, atol=tol * 4)
    gw_want = (cyn * sn * r).sum(0)  # a sum over 97 x reps rows: to the scale of its terms
    assert gw.dtype == dt
    np.testing.assert_allclose(_np(gw), gw_want, rtol=tol, atol=tol * np.abs(cyn * sn * r).sum(0).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,v", [("float32", 6400), ("bfloat16", 6400), ("bfloat16", 1003)])
def test_cross_entropy_of_a_training_batch_matches_float64(dtype, v):
    """`kernels.cross_entropy` on a training-sized batch (on CUDA `cuda_xent`'s kernels), compiled
    with its gradient, ignored targets (-1 and V) included. 1,003 columns: rows start unaligned and
    end in a partial piece."""
    dt = getattr(mx, dtype)
    n = -(-kernels.LEAN_MIN_ELEMENTS // v) + 5
    x = mx.array(RNG.standard_normal((n, v)) * 3).astype(dt)
    t_np = RNG.integers(0, v, n)
    t_np[:2] = (-1, v)
    t, wts = mx.array(t_np), mx.array(RNG.uniform(size=n).astype(np.float32))
    loss = kernels.cross_entropy(x, t)
    g = mx.compile(mx.grad(lambda z: (kernels.cross_entropy(z, t) * wts).sum()))(x)
    xn, wn = _np(x), _np(wts)
    lse = np.log(np.exp(xn - xn.max(-1, keepdims=True)).sum(-1)) + xn.max(-1)
    valid = (t_np >= 0) & (t_np < v)
    picked = xn[np.arange(n), np.where(valid, t_np, 0)]
    want = np.where(valid, lse - picked, 0.0)
    onehot = np.zeros_like(xn)
    onehot[np.arange(n)[valid], t_np[valid]] = 1
    g_want = (np.exp(xn - lse[:, None]) - onehot) * np.where(valid, wn, 0.0)[:, None]
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert loss.dtype == mx.float32 and g.dtype == dt
    np.testing.assert_allclose(_np(loss), want, rtol=1e-4, atol=1e-4)  # float32 arithmetic on the dtype's logits
    np.testing.assert_allclose(_np(g), g_want, rtol=tol, atol=tol * 1e-2)


def _rope64(x, dims, traditional, base, positions):
    """float64 RoPE of x [B, H, T, D] at the given positions."""
    half = dims // 2
    theta = positions[:, None] * base ** (-np.arange(half) / half)[None, :]
    c, s = np.cos(theta), np.sin(theta)
    x1, x2 = (x[..., 0:dims:2], x[..., 1:dims:2]) if traditional else (x[..., :half], x[..., half:dims])
    r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    rot = np.stack([r1, r2], -1).reshape(*x.shape[:-1], dims) if traditional else np.concatenate([r1, r2], -1)
    return np.concatenate([rot, x[..., dims:]], -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dims, traditional", [("float32", 64, False), ("bfloat16", 64, False),
                                                     ("bfloat16", 32, True)])
def test_rope_matches_float64_in_value_and_gradient(dtype, dims, traditional):
    """`kernels.rope` on the projection view mlx-lm ropes (on CUDA a training batch takes
    `cuda_rope`'s kernel; elsewhere MLX's or the CPU kernel), compiled with its gradient. The
    gradient of sum(rope(x) * c) is the inverse rotation of c."""
    B, T, H, D = 2, 128, 4, 64  # 65,536 values: a training batch
    dt = getattr(mx, dtype)
    flat = mx.array(RNG.standard_normal((B, T, H * D))).astype(dt)
    c = mx.array(RNG.standard_normal((B, H, T, D))).astype(dt)
    view = lambda f: f.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    rope = lambda f: kernels.rope(view(f), dims, traditional=traditional, base=10000.0, scale=1.0)  # noqa: E731
    grad = mx.compile(mx.grad(lambda f: (rope(f) * c).astype(mx.float32).sum()))
    y, g = rope(flat), grad(flat)
    positions = np.arange(T, dtype=np.float64)
    want_y = _rope64(_np(view(flat)), dims, traditional, 10000.0, positions)
    # the inverse rotation is the rotation by -theta
    want_g = _rope64(_np(c), dims, traditional, 10000.0, -positions).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert y.dtype == dt and y.shape == (B, H, T, D) and g.shape == flat.shape
    np.testing.assert_allclose(_np(y), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(_np(g), want_g, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_categorical_sample_inverts_the_cdf():
    logits = mx.array(RNG.standard_normal((6, 50)) * 2).astype(mx.float32)
    u = mx.array(RNG.uniform(size=6)).astype(mx.float32)
    tokens, logprobs = kernels.categorical_sample(logits, u)
    p = _softmax(_np(logits))
    cdf = np.cumsum(p, -1)
    want = (cdf < np.array(u)[:, None]).sum(-1)
    got = np.array(tokens)
    # a draw landing within float32 rounding of a CDF step may take the neighbour
    near = np.abs(cdf[np.arange(6), np.minimum(want, 49)] - np.array(u)) < 1e-5
    assert np.all((got == want) | near), (got, want)
    np.testing.assert_allclose(np.array(logprobs), np.log(p[np.arange(6), got]), rtol=1e-4, atol=1e-5)


# The micro model's quantized shapes (in -> out): q/o 64->64, k/v 64->32, gate/up 64->128,
# down 128->64, and the tied embedding's as_linear (vocab rows of 64).
QSHAPES = [(64, 32), (64, 128), (128, 64)]


# MLX-CUDA JIT-compiles a quantized matmul for each new (shape, bits, group) on first use, 17-24 s
# each on an H100/H200: the GPU subset keeps QLoRA's two settings (the adapter tests' 4/32 and
# 8/64, whose kernels they then share); the other two run everywhere else.
@pytest.mark.parametrize("bits, group_size", [pytest.param(4, 32, marks=pytest.mark.gpu(first=True)), (4, 64), (8, 32),
                                              pytest.param(8, 64, marks=pytest.mark.gpu(first=True))])
def test_quantized_layers_match_their_dequantized_weights_in_value_and_input_gradient(bits, group_size):
    """QLoRA's frozen base on this device, as mlxcore runs it (after `check_quantized_kernels`,
    which keeps a layer dense where the device's kernel is wrong): forward and d/dx of the linear
    layers and the embedding used as the output head, against float64 products with the weights
    dequantized on the CPU. On an H100 (MLX-CUDA 0.32.4) the raw 8-bit / group-64 head of 96 rows
    was wrong, NaNs included."""
    from mlxcore.models.adapters import check_quantized_kernels

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.lins = [nn.QuantizedLinear.from_linear(nn.Linear(fin, fout, bias=False), group_size, bits)
                         for fin, fout in QSHAPES]
            self.emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 64), group_size, bits)

    base = Base()
    dense = [_np(mx.dequantize(q.weight, q.scales, q.biases, group_size, bits, stream=mx.cpu))
             for q in (*base.lins, base.emb)]
    replaced = check_quantized_kernels(base)
    failures = []
    # decoding's one row (value only) and a training batch (value and input gradient): the kernels
    # mlxcore checks and runs, so no other kernel is compiled for this test
    for rows in (1, 40):
        for lin, w in zip(base.lins, dense):
            fin, fout = w.shape[1], w.shape[0]
            x = mx.array(RNG.standard_normal((rows, fin))).astype(mx.float32)
            cot = RNG.standard_normal((rows, fout))
            y = _np(lin(x))
            checks = [("y", y, _np(x) @ w.T)]
            if rows > 1:
                gx = _np(mx.grad(lambda x: (lin(x) * mx.array(cot).astype(mx.float32)).sum())(x))
                checks.append(("dx", gx, cot @ w))
            scale = np.abs(_np(x) @ w.T).max()
            for what, got, want in checks:
                err = np.abs(got - want).max() / max(scale, np.abs(want).max())
                if not err < 1e-3:
                    failures.append(f"{what} {rows}x{fin}->{fout}: rel err {err:.2e}")
    w = dense[-1]
    for rows in (1, 40):
        x = mx.array(RNG.standard_normal((rows, 64))).astype(mx.float32)
        np.testing.assert_allclose(_np(base.emb.as_linear(x)), _np(x) @ w.T, rtol=1e-3,
                                   atol=1e-3 * np.abs(_np(x) @ w.T).max(), err_msg=f"replaced: {replaced}")
    ids = mx.array([[0, 5, 95]])
    np.testing.assert_allclose(_np(base.emb(ids)), w[[0, 5, 95]][None], rtol=1e-5, atol=1e-6)
    assert not failures, (failures, replaced)
