"""Segment ids in the fused attention (packed SFT sequences): a query attends only to earlier keys
of its own run of equal ids, forward and backward, equal to the block-diagonal causal mask through
mx.fast.scaled_dot_product_attention and to each row computed alone.

Tolerances as test_kernels.py (float32, different summation orders): 2e-5 absolute for
unit-normal inputs.
"""

from __future__ import annotations

import mlxcore  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from mlxcore import kernels

ATT_TOL = dict(rtol=1e-4, atol=2e-5)


def close(a, b, **tol):
    np.testing.assert_allclose(np.array(a), np.array(b), **tol)


def _segments(B, T, seed, max_len=50, pad=True) -> np.ndarray:
    """Runs of random lengths 1..max_len with ids 1, 2, ..., the tail (if `pad`) as a run of 0s."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, T), dtype=np.int32)
    for b in range(B):
        at, r = 0, 1
        end = T - int(rng.integers(0, T // 4)) if pad else T
        while at < end:
            n = min(int(rng.integers(1, max_len + 1)), end - at)
            out[b, at : at + n] = r
            at, r = at + n, r + 1
    return out


def _qkvw(B, H, Hkv, T, D, seed=0):
    keys = mx.random.split(mx.random.key(seed), 4)
    return (mx.random.normal((B, H, T, D), key=keys[0]), mx.random.normal((B, Hkv, T, D), key=keys[1]),
            mx.random.normal((B, Hkv, T, D), key=keys[2]), mx.random.normal((B, H, T, D), key=keys[3]))


def _masked_sdpa(q, k, v, scale, seg: np.ndarray):
    """The definition: query i sees key j iff j <= i and no id change between them."""
    T = seg.shape[1]
    run = np.cumsum(np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1), axis=1)
    allowed = (np.arange(T)[None, :] <= np.arange(T)[:, None])[None] & (run[:, :, None] == run[:, None, :])
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mx.array(allowed)[:, None])


SHAPES = [  # B, H, Hkv, T, D, longest run
    (2, 4, 2, 37, 16, 50),
    (1, 2, 1, 130, 64, 50),  # runs across 32-row query blocks
    (3, 4, 4, 64, 8, 3),  # many short runs (starts at every offset mod 8)
    (2, 6, 2, 200, 32, 120),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,longest", SHAPES)
def test_segment_attention_matches_the_block_diagonal_mask(fast, B, H, Hkv, T, D, longest):
    seg = _segments(B, T, seed=T, max_len=longest)
    q, k, v, w = _qkvw(B, H, Hkv, T, D, seed=T)
    s, scale = mx.array(seg), D**-0.5
    expected = _masked_sdpa(q, k, v, scale, seg)
    close(kernels.attention(q, k, v, scale, segments=s), expected, **ATT_TOL)
    close(kernels.reference_attention(q, k, v, scale, segments=s), expected, **ATT_TOL)

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    fused = grads(lambda q, k, v: kernels.attention(q, k, v, scale, segments=s))
    for a, b in zip(fused, grads(lambda q, k, v: _masked_sdpa(q, k, v, scale, seg))):
        close(a, b, **ATT_TOL)


def test_each_row_of_a_pack_is_computed_as_if_alone(fast):
    """Rows packed back to back give the outputs and gradients of each row by itself (plain causal)."""
    H, Hkv, D, lengths = 4, 2, 32, [45, 7, 33, 1, 20]
    T = sum(lengths) + 6  # then 6 positions of padding
    q, k, v, w = _qkvw(1, H, Hkv, T, D, seed=3)
    seg = np.zeros((1, T), np.int32)
    at = 0
    for r, n in enumerate(lengths):
        seg[0, at : at + n] = r + 1
        at += n
    s = mx.array(seg)
    out = kernels.attention(q, k, v, 0.2, segments=s)
    g = mx.grad(lambda q, k, v: (kernels.attention(q, k, v, 0.2, segments=s) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    at = 0
    for n in lengths:
        sl = slice(at, at + n)
        alone = kernels.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], 0.2)
        close(out[:, :, sl], alone, **ATT_TOL)
        g_alone = mx.grad(lambda q, k, v: (kernels.attention(q, k, v, 0.2) * w[:, :, sl]).sum(),
                          argnums=(0, 1, 2))(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        for a, b in zip(g, g_alone):
            close(a[:, :, sl], b, **ATT_TOL)
        at += n


def test_other_rows_cannot_reach_a_row(fast):
    """Changing every other row's keys and values leaves a row's output bit for bit unchanged."""
    B, H, Hkv, T, D = 1, 2, 1, 96, 16
    seg = np.repeat(np.array([[1, 2, 3]], np.int32), 32, axis=1)  # rows 0-31, 32-63, 64-95
    seg[0, 90:] = 0
    q, k, v, _ = _qkvw(B, H, Hkv, T, D, seed=5)
    noise = mx.random.normal(k.shape, key=mx.random.key(9)) * 10
    others = mx.array(np.broadcast_to((seg != 2)[:, None, :, None], k.shape).astype(np.float32))
    a = kernels.attention(q, k, v, 0.25, segments=mx.array(seg))
    b = kernels.attention(q, k + noise * others, v - noise * others, 0.25, segments=mx.array(seg))
    assert np.array_equal(np.array(a[:, :, 32:64]), np.array(b[:, :, 32:64]))
    assert not np.allclose(np.array(a[:, :, :32]), np.array(b[:, :, :32]))


def test_one_segment_is_plain_causal_attention_and_compiles(fast):
    B, H, Hkv, T, D = 2, 4, 2, 70, 24
    q, k, v, _ = _qkvw(B, H, Hkv, T, D, seed=7)
    same = mx.full((B, T), 4, dtype=mx.int32)
    close(kernels.attention(q, k, v, 0.3, segments=same), kernels.attention(q, k, v, 0.3), atol=1e-6, rtol=0)
    seg = mx.array(_segments(B, T, seed=1))
    f = mx.compile(mx.value_and_grad(lambda q, k, v, s: kernels.attention(q, k, v, 0.3, segments=s).square().sum(),
                                     argnums=(0, 1, 2)))
    f_ref = mx.value_and_grad(lambda q, k, v: kernels.reference_attention(q, k, v, 0.3, segments=seg).square().sum(),
                              argnums=(0, 1, 2))
    for _ in range(2):  # the second call runs the cached graph
        (v1, g1), (v2, g2) = f(q, k, v, seg), f_ref(q, k, v)
        assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
        for a, b in zip(g1, g2):
            close(a, b, rtol=1e-4, atol=1e-4)


def test_segment_starts_and_bad_arguments(fast):
    seg = mx.array([[1, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]])
    assert kernels.segment_starts(seg).tolist() == [[0, 0, 2, 2, 2, 5, 5], [0] * 7]
    q = mx.zeros((2, 2, 7, 8))
    with pytest.raises(ValueError, match="causal"):
        kernels.attention(q, q, q, 1.0, causal=False, segments=seg)
    with pytest.raises(ValueError, match="segment ids"):
        kernels.attention(q, q, q, 1.0, segments=seg[:, :5])
    with pytest.raises(ValueError, match="segment ids"):
        kernels.attention(q, q[:, :, :5], q[:, :, :5], 1.0, segments=seg)


def test_unsupported_shape_and_no_kernels_use_the_mask(fast, monkeypatch):
    """Where the fused kernel does not apply (head_dim % 8 != 0, no extension) the mask path
    gives the same result."""
    seg = _segments(2, 40, seed=2)
    for D in (12, 16):
        q, k, v, _ = _qkvw(2, 2, 1, 40, D, seed=D)
        expected = _masked_sdpa(q, k, v, 0.3, seg)
        close(kernels.attention(q, k, v, 0.3, segments=mx.array(seg)), expected, **ATT_TOL)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_ext", lambda: None)  # as with MLXFLOW_KERNELS=off, Metal, CUDA
            close(kernels.attention(q, k, v, 0.3, segments=mx.array(seg)), expected, **ATT_TOL)
