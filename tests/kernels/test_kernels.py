"""mlxcore.kernels: the fast CPU path equals plain MLX (values and gradients), composes with
mx.compile / nn.value_and_grad / mx.checkpoint, and falls back cleanly.

Tolerances: both paths compute in float32 but sum in different orders and use different exp
implementations (ours: < 1 ulp). Losses agree to 1e-5 relative (logsumexp of ~6k terms),
probabilities/gradients to 2e-6 absolute (they are bounded by 1); attention outputs and
gradients to 2e-5 absolute for unit-normal inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlxcore  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.kernels import _build

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=2e-6)
ATT_TOL = dict(rtol=1e-4, atol=2e-5)



def close(a, b, **tol):
    np.testing.assert_allclose(np.array(a), np.array(b), **tol)


def _logits(shape, seed=0, scale=3.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def _targets(shape, v, seed=1):
    return mx.random.randint(0, v, shape, key=mx.random.key(seed))


# ------------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (64, 1000), (2, 9, 6400)])
def test_cross_entropy_matches_mlx(fast, shape):
    x, t = _logits(shape), _targets(shape[:-1], shape[-1])
    ref = nn.losses.cross_entropy(x, t, reduction="none")
    close(kernels.cross_entropy(x, t), ref, **LOSS_TOL)
    w = mx.random.uniform(shape=shape[:-1])  # a non-uniform cotangent
    g_ref = mx.grad(lambda x: (nn.losses.cross_entropy(x, t, reduction="none") * w).sum())(x)
    g_new = mx.grad(lambda x: (kernels.cross_entropy(x, t) * w).sum())(x)
    close(g_new, g_ref, **GRAD_TOL)


def test_cross_entropy_extreme_values(fast):
    x = mx.array([[1e4, 0.0, -1e4, 5.0], [-float("inf"), 2.0, 1.0, -float("inf")],
                  [80.0, 80.0, 80.0, 80.0]])
    t = mx.array([0, 1, 3])
    close(kernels.cross_entropy(x, t), kernels.reference_cross_entropy(x, t), **LOSS_TOL)
    g = mx.grad(lambda x: kernels.cross_entropy(x, t).sum())(x)
    g_ref = mx.grad(lambda x: kernels.reference_cross_entropy(x, t).sum())(x)
    close(g, g_ref, **GRAD_TOL)
    nan = kernels.cross_entropy(mx.array([[0.0, float("nan"), 1.0]]), mx.array([0]))
    assert np.isnan(np.array(nan)).all()  # a diverged model must not look fine


def test_cross_entropy_ignores_out_of_range_targets(fast):
    x, t = _logits((6, 50)), mx.array([3, -100, 49, 50, 0, -1])
    for fn in (kernels.cross_entropy, kernels.reference_cross_entropy):
        loss = np.array(fn(x, t))
        assert (loss[[1, 3, 5]] == 0).all() and (loss[[0, 2, 4]] > 0).all()
        g = np.array(mx.grad(lambda x: fn(x, t).sum())(x))
        assert (g[[1, 3, 5]] == 0).all()
    close(kernels.cross_entropy(x, t), kernels.reference_cross_entropy(x, t), **LOSS_TOL)


def test_cross_entropy_strided_and_low_precision_inputs(fast):
    base = _logits((40, 300))
    x = base.T[:, ::2]  # non-contiguous [300, 20]
    t = _targets((300,), 20)
    close(kernels.cross_entropy(x, t), kernels.reference_cross_entropy(x, t), **LOSS_TOL)
    xb = base.astype(mx.bfloat16)
    t2 = _targets((40,), 300).astype(mx.int64)
    out = kernels.cross_entropy(xb, t2)
    assert out.dtype == mx.float32
    close(out, kernels.reference_cross_entropy(xb, t2), **LOSS_TOL)
    g = mx.grad(lambda x: kernels.cross_entropy(x, t2).sum())(xb)
    assert g.dtype == mx.bfloat16


def _head_model(seed=0, d=32, v=500):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, v))
    mx.eval(model.parameters())
    return model


def test_cross_entropy_in_compiled_value_and_grad(fast):
    """The training-step pattern: compiled value_and_grad over a model, masked token sum."""
    from mlx.utils import tree_flatten

    x = mx.random.normal((4, 16, 32), key=mx.random.key(3))
    y = _targets((4, 16), 500, seed=4)
    m = (mx.random.uniform(shape=(4, 16), key=mx.random.key(5)) > 0.3).astype(mx.float32)
    results = []
    for ce in (kernels.cross_entropy, kernels.reference_cross_entropy):
        model = _head_model()

        def loss(model, x, y, m, ce=ce):
            return (ce(model(x), y) * m).sum() / m.sum()

        loss_and_grad = nn.value_and_grad(model, loss)
        # as mlxcore.train.step.make_step: the model is a closure, its state an implicit input
        step = mx.compile(lambda x, y, m: loss_and_grad(model, x, y, m),
                          inputs=model.state, outputs=model.state)
        for _ in range(2):  # the second call runs the cached compiled graph
            value, grads = step(x, y, m)
            mx.eval(value, grads)
        results.append((value.item(), dict(tree_flatten(grads))))
    (v1, g1), (v2, g2) = results
    assert v1 == pytest.approx(v2, rel=1e-5)
    for k in g1:
        close(g1[k], g2[k], rtol=1e-4, atol=1e-6)


def test_cross_entropy_under_checkpoint(fast):
    """mx.checkpoint (used by the chunked loss) recomputes the forward inside the vjp."""
    x, t = _logits((8, 100)), _targets((8,), 100)
    w = mx.random.normal((100, 100), key=mx.random.key(7)) * 0.1
    f = mx.checkpoint(lambda w, x: kernels.cross_entropy(x @ w, t).sum())
    g = mx.grad(f)(w, x)
    g_ref = mx.grad(lambda w, x: kernels.reference_cross_entropy(x @ w, t).sum())(w, x)
    close(g, g_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- attention
ATT_SHAPES = [  # B, H, Hkv, T, S, D, causal
    (2, 4, 2, 37, 37, 64, True),
    (1, 2, 1, 20, 45, 16, True),  # fewer queries than keys (decode-style, bottom-right mask)
    (2, 4, 4, 33, 33, 8, False),
    (1, 3, 1, 70, 70, 24, True),
    (2, 4, 2, 128, 128, 64, True),
]


@pytest.mark.parametrize("B,H,Hkv,T,S,D,causal", ATT_SHAPES)
def test_attention_matches_sdpa(fast, B, H, Hkv, T, S, D, causal):
    keys = mx.random.split(mx.random.key(11), 4)
    q = mx.random.normal((B, H, T, D), key=keys[0])
    k = mx.random.normal((B, Hkv, S, D), key=keys[1])
    v = mx.random.normal((B, Hkv, S, D), key=keys[2])
    w = mx.random.normal((B, H, T, D), key=keys[3])
    scale = D**-0.5
    close(kernels.attention(q, k, v, scale, causal),
          kernels.reference_attention(q, k, v, scale, causal), **ATT_TOL)

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v, scale, causal) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(kernels.attention), grads(kernels.reference_attention)):
        close(a, b, **ATT_TOL)


def test_attention_compiled_transposed_inputs_and_bf16(fast):
    """mlx-lm passes q/k/v as transposed views of [B, T, H, D]; bf16 goes through float32."""
    B, T, H, Hkv, D = 2, 40, 4, 2, 32
    qs = mx.random.normal((B, T, H, D), key=mx.random.key(1)).transpose(0, 2, 1, 3)
    ks = mx.random.normal((B, T, Hkv, D), key=mx.random.key(2)).transpose(0, 2, 1, 3)
    vs = mx.random.normal((B, T, Hkv, D), key=mx.random.key(3)).transpose(0, 2, 1, 3)
    f = mx.compile(mx.value_and_grad(lambda q, k, v: kernels.attention(q, k, v, 0.2).square().sum(), argnums=(0, 1, 2)))
    f_ref = mx.value_and_grad(lambda q, k, v: kernels.reference_attention(q, k, v, 0.2).square().sum(), argnums=(0, 1, 2))
    (v1, g1), (v2, g2) = f(qs, ks, vs), f_ref(qs, ks, vs)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    for a, b in zip(g1, g2):
        close(a, b, rtol=1e-4, atol=1e-4)
    qb, kb, vb = (a.astype(mx.bfloat16) for a in (qs, ks, vs))
    out = kernels.attention(qb, kb, vb, 0.2)
    assert out.dtype == mx.bfloat16
    close(out.astype(mx.float32), kernels.reference_attention(qb, kb, vb, 0.2).astype(mx.float32), atol=3e-2)


def test_attention_unsupported_shape_falls_back(fast):
    q = mx.random.normal((1, 2, 5, 12))  # D % 8 != 0: plain SDPA
    close(kernels.attention(q, q, q, 0.3), kernels.reference_attention(q, q, q, 0.3), atol=1e-6)


# ------------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("shape", [(1,), (13,), (8, 37, 70)])
def test_swiglu_matches_mlx(fast, shape):
    a = mx.random.normal(shape, key=mx.random.key(1)) * 4
    b = mx.random.normal(shape, key=mx.random.key(2))
    w = mx.random.normal(shape, key=mx.random.key(3))
    close(kernels.swiglu(a, b), nn.silu(a) * b, rtol=1e-5, atol=1e-6)
    f = mx.compile(mx.grad(lambda a, b: (kernels.swiglu(a, b) * w).sum(), argnums=(0, 1)))
    g_ref = mx.grad(lambda a, b: ((nn.silu(a) * b) * w).sum(), argnums=(0, 1))(a, b)
    for x, y in zip(f(a, b), g_ref):
        close(x, y, rtol=1e-5, atol=1e-5)


def test_swiglu_extremes_and_fallback_dtypes(fast):
    a = mx.array([-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, float("nan")])
    b = mx.ones_like(a)
    close(kernels.swiglu(a, b), nn.silu(a) * b, rtol=1e-6, atol=1e-6)
    ab = a.astype(mx.bfloat16)
    assert kernels.swiglu(ab, ab).dtype == mx.bfloat16  # non-float32: the lean-backward MLX path


# ----------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("shape", [(1, 8), (3, 37), (8, 33, 256), (2, 3, 5, 64)])
def test_rms_norm_matches_mlx_in_value_and_both_gradients(fast, shape):
    """The kernel is mx.fast.rms_norm's function: values, d/dx and d/dweight (rows of any width,
    a tail past the 8 lanes included; any leading dims), also compiled."""
    x = mx.random.normal(shape, key=mx.random.key(1)) * 3
    w = mx.random.normal(shape[-1:], key=mx.random.key(2))
    c = mx.random.normal(shape, key=mx.random.key(3))
    close(kernels.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    ours = mx.compile(mx.grad(lambda x, w: (kernels.rms_norm(x, w, 1e-5) * c).sum(), argnums=(0, 1)))(x, w)
    ref = mx.grad(lambda x, w: (mx.fast.rms_norm(x, w, 1e-5) * c).sum(), argnums=(0, 1))(x, w)
    scale = float(mx.abs(ref[1]).max())
    close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    close(ours[1], ref[1], rtol=1e-4, atol=1e-5 * scale)


def test_rms_norm_takes_strided_input_and_falls_back_off_float32(fast):
    x = mx.random.normal((4, 64, 6), key=mx.random.key(4)).transpose(0, 2, 1)  # rows not contiguous
    w = mx.random.normal((64,), key=mx.random.key(5))
    close(kernels.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    xb, wb = x.astype(mx.bfloat16), w.astype(mx.bfloat16)
    assert kernels.rms_norm(xb, wb, 1e-6).dtype == mx.bfloat16  # MLX's op
    close(kernels.rms_norm(xb, wb, 1e-6).astype(mx.float32), mx.fast.rms_norm(xb, wb, 1e-6).astype(mx.float32))


# -------------------------------------------------------------------------------- rope
def _rope_pair(x, **kw):
    return kernels.rope(x, x.shape[-1], traditional=False, **kw), mx.fast.rope(x, x.shape[-1], traditional=False, **kw)


@pytest.mark.parametrize("shape, offset", [((1, 1, 1, 2), 0), ((2, 3, 17, 12), 5), ((8, 4, 256, 64), 0)])
def test_rope_matches_mx_fast_rope_in_value_and_gradient(fast, shape, offset):
    """mlx-lm's default RoPE: the kernel equals mx.fast.rope on contiguous input and on the
    [B, T, H, D] -> [B, H, T, D] transpose mlx-lm passes, for a position offset and a scale; its
    gradient (the inverse rotation) equals MLX's. Angles agree to float32 cos/sin precision."""
    B, H, T, D = shape
    x = mx.random.normal(shape, key=mx.random.key(1))
    xt = mx.random.normal((B, T, H, D), key=mx.random.key(2)).transpose(0, 2, 1, 3)
    c = mx.random.normal(shape, key=mx.random.key(3))
    for inp, kw in ((x, dict(base=1e6, scale=1.0, offset=offset)), (xt, dict(base=1e4, scale=0.5, offset=offset))):
        ours, ref = _rope_pair(inp, **kw)
        assert ours.shape == ref.shape and ours.dtype == mx.float32
        close(ours, ref, rtol=1e-4, atol=1e-4)
        g = mx.compile(mx.grad(lambda a: (kernels.rope(a, D, traditional=False, **kw) * c).sum()))(inp)
        g_ref = mx.grad(lambda a: (mx.fast.rope(a, D, traditional=False, **kw) * c).sum())(inp)
        close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_rope_takes_per_sequence_offsets_as_a_packed_batch_passes_them(fast):
    """Integer offsets [B] (mx.fast.rope's array offset): values and gradients equal MLX's, and
    the packed layout (one sequence per token, offset = the token's position in its row) rotates
    every token bit for bit as the unpacked row does from position 0."""
    B, H, T, D = 3, 4, 16, 32
    x = mx.random.normal((B, T, H, D), key=mx.random.key(6)).transpose(0, 2, 1, 3)
    c = mx.random.normal((B, H, T, D), key=mx.random.key(7))
    offs = mx.array([0, 5, 2], dtype=mx.int32)
    kw = dict(base=1e4, scale=1.0, offset=offs)
    ours, ref = _rope_pair(x, **kw)
    close(ours, ref, rtol=1e-4, atol=1e-4)
    g = mx.compile(mx.grad(lambda a: (kernels.rope(a, D, traditional=False, **kw) * c).sum()))(x)
    g_ref = mx.grad(lambda a: (mx.fast.rope(a, D, traditional=False, **kw) * c).sum())(x)
    close(g, g_ref, rtol=1e-4, atol=1e-4)

    rows = [(0, 4), (4, 13), (13, 16)]  # three packed rows per sequence
    pos = mx.array([t - lo for lo, hi in rows for t in range(lo, hi)], dtype=mx.int32)
    flat = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)
    packed = kernels.rope(flat, D, traditional=False, base=1e4, scale=1.0, offset=mx.tile(pos, (B,)))
    packed = packed.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    for lo, hi in rows:
        alone = kernels.rope(x[:, :, lo:hi], D, traditional=False, base=1e4, scale=1.0, offset=0)
        assert np.array_equal(np.array(packed[:, :, lo:hi]), np.array(alone))

    # offsets far apart (a table row per sequence and step instead of per position): each
    # sequence as with its int offset
    far = mx.array([3, 7, 100_000, 5], dtype=mx.int32)[::-1][1:]  # a reversed view: [100000, 7, 3]
    wide = kernels.rope(x, D, traditional=False, base=1e4, scale=0.5, offset=far)
    for b, off in enumerate(far.tolist()):
        alone = kernels.rope(x[b:b + 1], D, traditional=False, base=1e4, scale=0.5, offset=off)
        assert np.array_equal(np.array(wide[b:b + 1]), np.array(alone))


def test_rope_off_its_fast_path_is_mlxs():
    """bfloat16, traditional, partial dims, 3-D input and float or 2-D offsets go to mx.fast.rope
    itself: the results are MLX's bit for bit."""
    x = mx.random.normal((2, 3, 9, 16), key=mx.random.key(4))
    cases = [(x.astype(mx.bfloat16), 16, False, 0), (x, 16, True, 0), (x, 8, False, 0), (x[:, 0], 16, False, 2),
             (x, 16, True, mx.array([0, 4]))]
    for inp, dims, trad, off in cases:
        ours = kernels.rope(inp, dims, traditional=trad, base=1e4, scale=1.0, offset=off)
        ref = mx.fast.rope(inp, dims, traditional=trad, base=1e4, scale=1.0, offset=off)
        assert np.array_equal(np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32)))


def test_use_fast_kernels_routes_the_models_norms_and_ropes_through_the_kernels(fast):
    """use_fast_kernels turns every mlx.nn.RMSNorm and mlx.nn.RoPE of a model into FastRMSNorm /
    FastRoPE (same parameters, same outputs to float32 rounding), and restore_all turns them
    back. MLXFLOW_FAST_NORM=off (read at import) keeps MLX's layers."""
    from mlxcore.kernels import patch
    from mlxcore.kernels.patch import FastRMSNorm, FastRoPE

    assert patch._FAST_LAYERS == {nn.RMSNorm: FastRMSNorm, nn.RoPE: FastRoPE, nn.Linear: patch.FastLinear}
    from mlxcore.models.model import from_config, hf_config
    from tests.conftest import micro_model

    model = from_config(hf_config(micro_model(), 300), seed=0)
    x = mx.array(np.random.default_rng(0).integers(0, 300, (2, 17)))
    before = model(x)
    use_fast_kernels(model)
    norms = [m for _, m in model.named_modules() if isinstance(m, nn.RMSNorm)]
    ropes = [m for _, m in model.named_modules() if isinstance(m, nn.RoPE)]
    assert norms and all(type(m) is FastRMSNorm for m in norms)
    assert ropes and all(type(m) is FastRoPE for m in ropes)

    close(model(x), before, rtol=1e-4, atol=1e-4)
    patch.restore_all()
    assert all(type(m) is nn.RMSNorm for m in norms) and all(type(m) is nn.RoPE for m in ropes)
    code = ("import os; os.environ['MLXFLOW_FAST_NORM'] = 'off'; from mlxcore.kernels import patch; "
            "assert set(patch._FAST_LAYERS) == {patch.nn.Linear}, patch._FAST_LAYERS")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------- all three inside an mlx-lm LLaMA
def test_llama_training_step_with_all_kernels(fast, monkeypatch):
    """A compiled value_and_grad step of mlx-lm's LLaMA gives the same loss and gradients
    when its attention, SwiGLU and loss are swapped for the kernels (scratch-style patching:
    the model code itself is not changed)."""
    import mlx_lm.models.llama as llama_mod
    from mlx.utils import tree_flatten

    from mlxcore.models.model import from_config, hf_config
    from tests.conftest import micro_model

    orig_sdpa = llama_mod.scaled_dot_product_attention

    def fast_sdpa(q, k, v, cache, scale, mask, sinks=None):
        if cache is None and sinks is None and isinstance(mask, str) and mask == "causal":
            return kernels.attention(q, k, v, scale, causal=True)
        return orig_sdpa(q, k, v, cache, scale=scale, mask=mask, sinks=sinks)

    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, 300, (2, 40))) for _ in range(2))
    results = []
    for use in (False, True):
        if use:
            monkeypatch.setattr(llama_mod, "scaled_dot_product_attention", fast_sdpa)
            monkeypatch.setattr(llama_mod, "swiglu", kernels.swiglu)
        ce = kernels.cross_entropy if use else kernels.reference_cross_entropy
        model = from_config(hf_config(micro_model(), 300), seed=0)
        loss_and_grad = nn.value_and_grad(model, lambda model, x, y: ce(model(x), y).mean())
        step = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=model.state,
                          outputs=model.state)
        value, grads = step(x, y)
        mx.eval(value, grads)
        results.append((value.item(), dict(tree_flatten(grads))))
    (v1, g1), (v2, g2) = results
    assert v1 == pytest.approx(v2, rel=1e-5)
    for k in g1:
        close(g2[k], g1[k], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- fallback
def test_env_off_uses_plain_mlx(monkeypatch):
    monkeypatch.setenv("MLXFLOW_KERNELS", "off")
    assert not kernels.available()
    assert "MLXFLOW_KERNELS=off" in kernels.status()
    x, t = _logits((4, 10)), _targets((4,), 10)
    close(kernels.cross_entropy(x, t), nn.losses.cross_entropy(x, t, reduction="none"), **LOSS_TOL)
    q = mx.random.normal((1, 2, 6, 8))
    close(kernels.attention(q, q, q, 0.5), kernels.reference_attention(q, q, q, 0.5), atol=0)
    close(kernels.swiglu(q, q), nn.silu(q) * q, rtol=1e-6, atol=1e-7)


def test_status_names_the_cuda_paths_a_step_takes(monkeypatch):
    """On CUDA the one-line status names the layer kernels `MLXFLOW_CUDA_LAYERS` leaves on,
    whether the linears are lean, whether their weight gradients go first and which attention
    runs (`mlxflow doctor` prints it)."""
    from mlxcore.kernels import cuda

    monkeypatch.setattr(cuda, "available", lambda: True)
    # the cuDNN attention is on by default, and cannot build without MLX's CUDA backend: the status says why
    assert kernels.status().startswith("CUDA: mlxflow kernels for rope, swiglu, addnorm, cross_entropy, attention, AdamW")
    assert "projection groups, weight gradients first; MLX's attention (KernelsUnavailable: this MLX has no CUDA backend" \
        in kernels.status()
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "rope,swiglu,addnorm,cross_entropy")
    assert "cross_entropy, AdamW" in kernels.status() and "; MLX's attention;" in kernels.status()
    monkeypatch.delenv("MLXFLOW_CUDA_LAYERS")
    monkeypatch.setenv("MLXFLOW_WGRAD_FIRST", "off")
    assert "projection groups (MLXFLOW_WGRAD_FIRST=off);" in kernels.status()
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "swiglu")
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "off")
    assert "kernels for swiglu, AdamW" in kernels.status() and "MLXFLOW_LEAN_LINEAR=off" in kernels.status()
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "off")
    assert "no layer (MLXFLOW_CUDA_LAYERS=off)" in kernels.status()


def test_non_cpu_default_device_uses_plain_mlx(monkeypatch):
    class FakeDevice:
        type = "gpu"
    monkeypatch.setattr(mx, "default_device", lambda: FakeDevice())
    assert kernels._ext() is None


def test_nanobind_abi_mismatch_is_reported(monkeypatch):
    nanobind, nb_dir = _build._nanobind()
    monkeypatch.setattr(_build, "_mlx_internals", lambda: 9999)
    with pytest.raises(_build.KernelsUnavailable, match="pip install nanobind=="):
        _build._check_nanobind_abi(nanobind, nb_dir)


def test_no_compiler_falls_back_in_a_fresh_process(tmp_path):
    code = (
        "import mlxcore.kernels as K, mlx.core as mx, mlx.nn as nn\n"
        "x = mx.random.normal((3, 11)); t = mx.array([1, 2, 10])\n"
        "d = mx.abs(K.cross_entropy(x, t) - nn.losses.cross_entropy(x, t)).max().item()\n"
        "print(K.status()); assert d < 1e-5, d\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "MLXFLOW_KERNELS_CACHE": str(tmp_path / "cache"), "MLXFLOW_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "plain MLX ops" in r.stdout and "no C++ compiler" in r.stdout


_THREADED = """
import mlxcore, mlx.core as mx, numpy as np
from mlxcore import kernels
mx.random.seed(3)
q, k, v = (mx.random.normal((2, 4, 96, 32)) for _ in range(3))
logits, targets = mx.random.normal((300, 517)), mx.random.randint(0, 517, (300,))
gate, x = mx.random.normal((64, 700)), mx.random.normal((64, 700))
w = mx.random.normal((700,))
outs = [kernels.attention(q, k, v, 32 ** -0.5), kernels.cross_entropy(logits, targets), kernels.swiglu(gate, x),
        mx.grad(lambda a: kernels.attention(a, k, v, 32 ** -0.5).sum())(q), kernels.rms_norm(gate, w, 1e-5),
        *mx.grad(lambda a, w: (kernels.rms_norm(a, w, 1e-5) * x).sum(), argnums=(0, 1))(gate, w),
        kernels.rope(q, 32, traditional=False, base=1e4, scale=1.0, offset=3)]
np.savez(OUT, *[np.array(o) for o in outs])
"""


def test_kernels_give_the_same_bits_on_one_thread_and_on_four(fast, tmp_path):
    """The suite runs its workers with MLXFLOW_KERNEL_THREADS=1; the threaded split (rows and heads
    across threads) is checked here, in fresh processes, against one thread."""
    import os
    import subprocess
    import sys

    import numpy as np

    results = []
    for threads in ("1", "4"):
        out = tmp_path / f"t{threads}.npz"
        env = {**os.environ, "MLXFLOW_KERNEL_THREADS": threads}
        subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + _THREADED], env=env, check=True)
        results.append(np.load(out))
    one, four = results
    assert len(one.files) == 8 and all(np.array_equal(one[f], four[f]) for f in one.files)
