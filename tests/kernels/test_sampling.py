"""mlxcore.kernels.categorical_sample / log_softmax and mlxcore.rl.sampling.sample: the right
distribution (chi-square against softmax(x/T), top-p as mlx-lm's apply_top_p, and against
mlx-lm's own sampler), exact log-softmax, reproducible under mx.random.seed, and the fast path
equal to the plain-MLX fallback draw for draw (both are the same inverse CDF of the same
uniforms; only float rounding at a CDF boundary could split them).
"""

from __future__ import annotations

import mlxcore  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_p, make_sampler

from mlxcore import kernels
from mlxcore.rl import sampling

# chi-square critical values at p = 1e-4 (df -> value); a fixed seed keeps the tests deterministic
CHI2_1E4 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}



def _logits(shape, seed=0, scale=3.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    used = expected > 0
    assert counts[~used].sum() == 0, "a token with probability 0 was drawn"
    return float((((counts - expected) ** 2)[used] / expected[used]).sum())


def _expected(row: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(row / T) over mlx-lm's top-p set (apply_top_p on the T=1 log-probs)."""
    logp = row - np.logaddexp.reduce(row)
    keep = np.ones_like(row, dtype=bool)
    if 0 < top_p < 1:
        keep = np.isfinite(np.array(apply_top_p(mx.array(logp[None]), top_p))[0])
    w = np.where(keep, np.exp((row - row.max()) / temperature), 0.0)
    return w / w.sum()


ROW = np.array([1.0, 2.5, -0.5, 0.3, 2.0, -3.0, 0.9, 1.7], dtype=np.float32)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.7, 1.0), (1.0, 0.8), (0.7, 0.5)])
def test_draws_follow_softmax_over_temperature_and_top_p(fast, temperature, top_p):
    n = 200_000
    logits = mx.broadcast_to(mx.array(ROW), (n, ROW.size))
    probs = _expected(ROW, temperature, top_p)
    df = int((probs > 0).sum()) - 1
    mx.random.seed(11)
    for path in (kernels.categorical_sample, kernels.reference_categorical_sample):
        tokens, _ = path(logits, mx.random.uniform(shape=(n,)), temperature, top_p)
        counts = np.bincount(np.array(tokens), minlength=ROW.size)
        assert _chi2(counts, probs) < CHI2_1E4[df], (path.__name__, counts / n, probs)


def test_top_p_keeps_exactly_mlx_lms_set(fast):
    x = _logits((64, 300), seed=3)
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    for top_p in (0.3, 0.9, 0.99):
        allowed = np.isfinite(np.array(apply_top_p(logp, top_p)))
        want = np.array(kernels._top_p_keep(logp, top_p))
        np.testing.assert_array_equal(want, allowed)
        mx.random.seed(0)
        for _ in range(20):
            tokens, _ = kernels.categorical_sample(x, mx.random.uniform(shape=(64,)), 1.3, top_p)
            assert allowed[np.arange(64), np.array(tokens)].all()


def test_same_distribution_as_mlx_lm_sampler(fast):
    """Two-sample chi-square: our draws vs mlx-lm's make_sampler (Gumbel trick) on one row."""
    n = 100_000
    logits = mx.broadcast_to(mx.array(ROW), (n, ROW.size))
    mx.random.seed(5)
    ours = np.bincount(np.array(sampling.sample(logits, 0.8)[0]), minlength=ROW.size)
    theirs = np.bincount(np.array(make_sampler(temp=0.8)(logits)), minlength=ROW.size)
    table = np.stack([ours, theirs]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    assert stat < CHI2_1E4[ROW.size - 1], (ours, theirs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.5, 0.9)])
def test_fast_path_and_fallback_are_the_inverse_cdf_of_the_same_uniforms(fast, temperature, top_p):
    """Both paths pick the token whose CDF interval holds u * total, computed in float64 here.
    The kernel accumulates in float64 and matches it; the fallback's float32 cumsum over 6400
    terms can land on a neighbour when u is within ~1e-6 (relative) of a boundary."""
    x = _logits((256, 6400), seed=1)
    u = mx.random.uniform(shape=(256,), key=mx.random.key(2))
    X, U = np.array(x).astype(np.float64), np.array(u).astype(np.float64)
    w = np.exp((X - X.max(1, keepdims=True)) / temperature)
    if top_p < 1:
        w = np.where(np.array(kernels._top_p_keep(x - mx.logsumexp(x, -1, keepdims=True), top_p)), w, 0.0)
    cdf = np.cumsum(w, axis=1)
    target = U * cdf[:, -1]
    exact = (cdf <= target[:, None]).sum(1)
    logp = np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))
    rows = np.arange(256)
    for path, min_exact in ((kernels.categorical_sample, 0.995), (kernels.reference_categorical_sample, 0.95)):
        tokens, lp = path(x, u, temperature, top_p)
        assert tokens.dtype == mx.uint32
        t = np.array(tokens).astype(np.int64)
        assert (t == exact).mean() >= min_exact, (path.__name__, (t == exact).mean())
        lo = np.where(t > 0, cdf[rows, t - 1], 0.0)
        miss = np.maximum(lo - target, target - cdf[rows, t]) / cdf[:, -1]  # <= 0 inside the interval
        assert miss.max() < 1e-5 and (w[rows, t] > 0).all(), path.__name__
        np.testing.assert_allclose(np.array(lp), logp[rows, t], rtol=1e-5, atol=1e-5)


def test_logprob_is_the_models_log_softmax_at_the_token(fast):
    x = _logits((32, 1000), seed=4)
    tokens, lp = kernels.categorical_sample(x, mx.random.uniform(shape=(32,)), 0.5, 0.7)
    want = (x - mx.logsumexp(x, axis=-1, keepdims=True))[mx.arange(32), tokens.astype(mx.int32)]
    np.testing.assert_allclose(np.array(lp), np.array(want), rtol=1e-5, atol=1e-5)


def test_infinite_logits_and_odd_shapes(fast):
    x = _logits((3, 5, 37), seed=6)
    masked = mx.where(mx.arange(37) % 3 == 0, x, -mx.inf)  # only every third token possible
    mx.random.seed(1)
    tokens, lp = kernels.categorical_sample(masked, mx.random.uniform(shape=(3, 5)))
    assert tokens.shape == (3, 5) and (np.array(tokens) % 3 == 0).all() and np.isfinite(np.array(lp)).all()
    one = mx.array([[0.5], [-2.0]])  # V = 1
    assert np.array(kernels.categorical_sample(one, mx.array([0.0, 0.999]))[0]).tolist() == [0, 0]
    for u in (0.0, 0.9999999):  # the ends of [0, 1)
        t, _ = kernels.categorical_sample(masked[0], mx.full((5,), u))
        assert (np.array(t) % 3 == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        kernels.categorical_sample(x, mx.zeros((3, 5)), 0.0)


def test_sample_is_reproducible_under_seed(fast):
    x = _logits((64, 6400), seed=7)
    draws = []
    for seed in (3, 3, 4):
        mx.random.seed(seed)
        draws.append([np.array(sampling.sample(x, 1.0)[0]) for _ in range(3)])
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])


def test_temperature_zero_is_greedy():
    x = _logits((8, 50), seed=8)
    tokens, lp = sampling.sample(x, 0.0)
    np.testing.assert_array_equal(np.array(tokens), np.array(mx.argmax(x, axis=-1)))
    np.testing.assert_allclose(np.array(lp), np.array(mx.max(x - mx.logsumexp(x, -1, keepdims=True), -1)),
                               atol=1e-5)
    np.testing.assert_array_equal(np.array(sampling.make_sampler(0.0, 1.0)(x)), np.array(tokens))


# ---------------------------------------------------------------------------- log_softmax
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 6400), (2, 5, 33)])
def test_log_softmax_matches_logits_minus_logsumexp(fast, shape):
    x = _logits(shape, seed=9)
    np.testing.assert_allclose(np.array(kernels.log_softmax(x)),
                               np.array(x - mx.logsumexp(x, axis=-1, keepdims=True)), rtol=1e-5, atol=1e-5)


def test_log_softmax_extremes_low_precision_and_gradient(fast):
    x = mx.array([[0.0, -mx.inf, 3.0, 1e4], [-1e4, 5.0, 5.0, -mx.inf]])
    np.testing.assert_allclose(np.array(kernels.log_softmax(x)), np.array(kernels.reference_log_softmax(x)),
                               atol=1e-5)
    xb = _logits((4, 300), seed=10).astype(mx.bfloat16)
    out = kernels.log_softmax(xb)
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), np.array(kernels.reference_log_softmax(xb)), atol=1e-5)
    strided = _logits((300, 4), seed=12).T  # a transposed (non-contiguous) view
    np.testing.assert_allclose(np.array(kernels.log_softmax(strided)),
                               np.array(kernels.reference_log_softmax(strided)), atol=1e-5)
    x = _logits((6, 40), seed=11)
    w = mx.random.normal((6, 40), key=mx.random.key(1))
    g_fast = mx.grad(lambda a: (kernels.log_softmax(a) * w).sum())(x)
    g_ref = mx.grad(lambda a: (kernels.reference_log_softmax(a) * w).sum())(x)
    np.testing.assert_allclose(np.array(g_fast), np.array(g_ref), atol=2e-6)


# ----------------------------------------------------------------------------- fallback
def test_fallback_when_kernels_are_off(monkeypatch):
    x = _logits((16, 100), seed=13)
    u = mx.random.uniform(shape=(16,), key=mx.random.key(3))
    monkeypatch.setenv("MLXFLOW_KERNELS", "off")
    assert not kernels.available()
    t, lp = kernels.categorical_sample(x, u, 0.9, 0.95)
    t_ref, lp_ref = kernels.reference_categorical_sample(x, u, 0.9, 0.95)
    np.testing.assert_array_equal(np.array(t), np.array(t_ref))
    np.testing.assert_array_equal(np.array(kernels.log_softmax(x)), np.array(kernels.reference_log_softmax(x)))
    mx.random.seed(2)
    off = np.array(sampling.sample(x, 1.0)[0])
    monkeypatch.setenv("MLXFLOW_KERNELS", "auto")
    if kernels.available():  # same uniforms -> the same draws on the fast path
        mx.random.seed(2)
        np.testing.assert_array_equal(np.array(sampling.sample(x, 1.0)[0]), off)


def test_non_cpu_device_takes_the_plain_mlx_path(monkeypatch):
    class FakeDevice:
        type = "gpu"

    calls = []
    monkeypatch.setattr(mx, "default_device", lambda: FakeDevice())
    monkeypatch.setattr(kernels, "reference_categorical_sample",
                        lambda *a: calls.append("sample") or ("t", "lp"))
    monkeypatch.setattr(kernels, "reference_log_softmax", lambda x: calls.append("lsm") or "y")
    x = _logits((2, 10))
    assert kernels.categorical_sample(x, mx.zeros((2,))) == ("t", "lp")
    assert kernels.log_softmax(x) == "y" and calls == ["sample", "lsm"]
