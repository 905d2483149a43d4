"""The lean paths of `mlxcore.kernels` (any device): `lean_swiglu`, `lean_linear` and
`lean_projections` have autodiff's values and gradients and keep less alive or lay their results
out for their consumers, and `swiglu` / `linear` / `projections` take them where they should
(on CUDA by default, or when asked) and plain MLX elsewhere."""

from __future__ import annotations

import re

import mlxcore  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels.patch import use_fast_kernels


def close(a, b, **tol):
    np.testing.assert_allclose(np.array(a), np.array(b), **tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_swiglu_has_autodiffs_value_and_gradients_and_keeps_less(dtype, monkeypatch):
    """The SwiGLU off the fast path (GPUs, bfloat16): mlx-lm's forward, the gradients of autodiff
    (float32 exactly up to rounding; bfloat16 within its mantissa, the backward runs in float32),
    and a compiled LLaMA step whose peak memory is lower than autodiff's by up to 2 x intermediate
    values per token and layer (sigmoid(gate) and silu(gate) are no longer kept for the backward)."""
    dt = getattr(mx, dtype)
    a, b, w = (mx.random.normal((8, 37, 70), key=mx.random.key(i)).astype(dt) * s for i, s in ((1, 4), (2, 1), (3, 1)))
    assert mx.array_equal(kernels.lean_swiglu(a, b), nn.silu(a) * b)
    lean = mx.compile(mx.grad(lambda a, b: (kernels.lean_swiglu(a, b) * w).astype(mx.float32).sum(), argnums=(0, 1)))
    ref = mx.grad(lambda a, b: ((nn.silu(a) * b) * w).astype(mx.float32).sum(), argnums=(0, 1))
    tol = 1e-5 if dtype == "float32" else 3e-2
    for x, y in zip(lean(a, b), ref(a, b)):
        assert x.dtype == dt
        close(x.astype(mx.float32), y.astype(mx.float32), rtol=tol, atol=tol)

    def peak(lean: str, layers=6, d=1024, tokens=128):
        from mlxcore.config import ModelConfig
        from mlxcore.models.model import from_config, hf_config

        monkeypatch.setenv("MLXFLOW_LEAN", lean)
        monkeypatch.setenv("MLXFLOW_KERNELS", "off")  # the lean SwiGLU is the path off the fast kernels
        cfg = ModelConfig(preset="custom", hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=4,
                          intermediate_size=d, dtype=dtype)
        model = from_config(hf_config(cfg, 256))
        use_fast_kernels(model)
        x = mx.random.randint(0, 256, (8, tokens + 1), key=mx.random.key(0))
        vg = nn.value_and_grad(model, lambda m, x: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean())
        step = mx.compile(lambda x: vg(model, x))
        mx.eval(step(x))
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(x))
        return mx.get_peak_memory() - before

    if mx.default_device() != mx.cpu:
        # MLX-CUDA holds a CUDA graph's inputs until the graph has run, and a step this small is one
        # graph: on a GPU the saving shows at scale (bench/activation_memory.py: 15.5 vs 19.2 GB at 200mb)
        return
    saved = peak("off") - peak("on")
    # up to 2 [tokens, d] arrays fewer per layer (measured here at 1,024 tokens: 0.52 in bfloat16, 0.92 in float32;
    # 1.8 on the 200mb preset in bfloat16, bench/activation_memory.py)
    assert saved >= 0.4 * 6 * 2 * 8 * 128 * 1024 * dt.size, saved


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lean_swiglu_backward_is_two_kernels(dtype, tmp_path):
    """The lean backward (the vjp the step calls) is one fused kernel per gradient, reading only gate,
    up and the cotangent: no float32 sigmoid or float32 copies written between them (sharing those
    made the lean step 10% slower than autodiff's on an H100), and its gradients are autodiff's."""
    dt = getattr(mx, dtype)
    gate, up, w = (mx.random.normal((16, 96), key=mx.random.key(i)).astype(dt) for i in range(3))
    mx.eval(gate, up, w)
    dot = tmp_path / "backward.dot"
    mx.export_to_dot(str(dot), *kernels._lean_swiglu_grads(gate, up, w))  # the vjp, as the step calls it
    labels = re.findall(r'label ="([^"]*)"', dot.read_text())
    assert len(labels) == 2 and all(label.startswith("Compiled") for label in labels), labels
    assert sum("Tanh" in label for label in labels) == 1, labels  # d_x's own sigmoid
    # and the gradients are still autodiff's (the same check as above, at this shape)
    ref = mx.grad(lambda a, b: ((nn.silu(a) * b) * w).astype(mx.float32).sum(), argnums=(0, 1))(gate, up)
    tol = 1e-5 if dt == mx.float32 else 3e-2
    for x, y in zip(kernels._lean_swiglu_grads(gate, up, w), ref):
        close(x.astype(mx.float32), y.astype(mx.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("trained", [False, True], ids=["lean_linear", "lean_linear_trained"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_linear_has_autodiffs_value_and_gradients(dtype, trained):
    """`x @ w.T` with the weight gradient computed as `g.T @ x`, in the weight's layout: the same
    value as autodiff, and both gradients equal to autodiff's up to the GEMMs' summation order,
    compiled, for a 3-D batch; with the weight frozen (LoRA's base), the input gradient alone.
    `lean_linear_trained` (the weight gradient first) gives `lean_linear`'s gradients bit for bit."""
    dt = getattr(mx, dtype)
    fn = kernels.lean_linear_trained if trained else kernels.lean_linear
    x, w, c = (mx.random.normal(s, key=mx.random.key(i)).astype(dt) for i, s in enumerate([(4, 33, 48), (80, 48), (4, 33, 80)]))
    assert mx.array_equal(fn(x, w), x @ w.T)
    lean = mx.compile(mx.grad(lambda x, w: (fn(x, w) * c).astype(mx.float32).sum(), argnums=(0, 1)))
    ref = mx.grad(lambda x, w: ((x @ w.T) * c).astype(mx.float32).sum(), argnums=(0, 1))
    tol = 1e-5 if dtype == "float32" else 2e-2
    got, want = lean(x, w), ref(x, w)
    for g, r in zip(got, want):
        assert g.dtype == dt and g.shape == r.shape
        close(g.astype(mx.float32), r.astype(mx.float32), rtol=tol, atol=tol * 10)
    only_x = mx.grad(lambda x: (fn(x, w) * c).astype(mx.float32).sum())(x)
    close(only_x.astype(mx.float32), want[0].astype(mx.float32), rtol=tol, atol=tol * 10)
    free = mx.grad(lambda x, w: (kernels.lean_linear(x, w) * c).astype(mx.float32).sum(), argnums=(0, 1))(x, w)
    assert all(mx.array_equal(g, f) for g, f in zip(got, free))


@pytest.mark.parametrize("trained", [False, True], ids=["lean_projections", "lean_projections_trained"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_projections_have_autodiffs_values_and_gradients(dtype, trained):
    """Three projections of one input (q / k / v, GQA-sized): autodiff's values, and gradients
    equal to autodiff's up to summation order (the input's is built with `addmm`), compiled; with
    one weight frozen, the others' gradients alone; `kernels.projections` on one weight is plain.
    `lean_projections_trained` gives `lean_projections`' gradients bit for bit."""
    dt = getattr(mx, dtype)
    fn = kernels.lean_projections_trained if trained else kernels.lean_projections
    shapes = [(2, 40, 48), (48, 48), (16, 48), (16, 48), (2, 40, 48), (2, 40, 16), (2, 40, 16)]
    x, wq, wk, wv, cq, ck, cv = (mx.random.normal(s, key=mx.random.key(i)).astype(dt) for i, s in enumerate(shapes))

    def loss(project):
        def f(x, wq, wk, wv):
            q, k, v = project(x, wq, wk, wv)
            return sum(((a * c).astype(mx.float32).sum() for a, c in ((q, cq), (k, ck), (v, cv))), mx.array(0.0))
        return f

    plain = lambda x, *ws: tuple(x @ w.T for w in ws)  # noqa: E731
    for got, want in zip(fn(x, wq, wk, wv), plain(x, wq, wk, wv)):
        assert mx.array_equal(got, want)
    tol = 1e-5 if dtype == "float32" else 2e-2
    lean = mx.compile(mx.grad(loss(fn), argnums=(0, 1, 2, 3)))(x, wq, wk, wv)
    ref = mx.grad(loss(plain), argnums=(0, 1, 2, 3))(x, wq, wk, wv)
    for g, r in zip(lean, ref):
        assert g.dtype == dt and g.shape == r.shape
        close(g.astype(mx.float32), r.astype(mx.float32), rtol=tol, atol=tol * 10)
    frozen_k = mx.grad(loss(fn), argnums=(0, 1, 3))(x, wq, wk, wv)
    for g, r in zip(frozen_k, (ref[0], ref[1], ref[3])):
        close(g.astype(mx.float32), r.astype(mx.float32), rtol=tol, atol=tol * 10)
    assert len(kernels.projections(x, [wq])) == 1
    free = mx.grad(loss(kernels.lean_projections), argnums=(0, 1, 2, 3))(x, wq, wk, wv)
    assert all(mx.array_equal(g, f) for g, f in zip(lean, free))


def test_trained_linears_order_the_weight_gradients_before_the_input_gradient(tmp_path):
    """The `_trained` variants' input gradient depends on the weight gradients (`Depends`, the
    weight-gradient GEMMs among its inputs), so MLX-CUDA runs them before it, not beside it; the
    plain ones leave a frozen weight's gradient out of the input gradient's graph."""
    x, w, wk, c, ck = (mx.random.normal(s, key=mx.random.key(i)) for i, s in
                       enumerate([(2, 8, 16), (12, 16), (4, 16), (2, 8, 12), (2, 8, 4)]))
    mx.eval(x, w, wk, c, ck)

    def input_grad_graph(fn, weights, cotangents) -> list[str]:
        dot = tmp_path / "dx.dot"
        mx.export_to_dot(str(dot), mx.vjp(fn, [x, *weights], cotangents)[1][0])
        return re.findall(r'label ="([^"]*)"', dot.read_text())

    for plain, trained, weights, cots in ((kernels.lean_linear, kernels.lean_linear_trained, [w], [c]),
                                          (kernels.lean_projections, kernels.lean_projections_trained, [w, wk], [c, ck])):
        free, first = input_grad_graph(plain, weights, cots), input_grad_graph(trained, weights, cots)
        assert "Depends" not in free and "Depends" in first, (free, first)
        # the input gradient's own products, plus one weight gradient per weight when ordered
        assert first.count("Matmul") + first.count("AddMM") == free.count("Matmul") + free.count("AddMM") + len(weights)


def test_linear_is_lean_on_cuda_or_when_asked_and_models_take_it_without_a_bias(monkeypatch):
    """`kernels.linear` takes `lean_linear` for training-sized inputs where `MLXFLOW_LEAN_LINEAR`
    says so (auto: CUDA only, so the CPU keeps autodiff's bits), and `use_fast_kernels` gives a
    model's bias-free `nn.Linear` layers the `FastLinear` class: same outputs, biased layers
    unchanged (mlx.nn's addmm)."""
    from mlxcore.kernels import cuda, patch

    calls = []
    lean, trained = kernels.lean_linear, kernels.lean_linear_trained
    monkeypatch.setattr(kernels, "lean_linear", lambda x, w: calls.append("lean") or lean(x, w))
    monkeypatch.setattr(kernels, "lean_linear_trained", lambda x, w: calls.append("trained") or trained(x, w))
    x, w = mx.ones((4, kernels.LEAN_MIN_ELEMENTS // 4)), mx.ones((3, kernels.LEAN_MIN_ELEMENTS // 4))

    def used(setting, on_cuda=False, x=x):
        calls.clear()
        monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", setting)
        monkeypatch.setattr(cuda, "available", lambda: on_cuda)
        assert mx.array_equal(kernels.linear(x, w), x @ w.T)
        return bool(calls)

    assert not used("auto") and used("auto", on_cuda=True) and used("on")
    assert not used("off", on_cuda=True) and not used("on", x=x[:1])  # decoding's few tokens: the plain product
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "on")
    plain, biased = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
    model = nn.Sequential(plain, biased)
    inp = mx.random.normal((kernels.LEAN_MIN_ELEMENTS // 16 + 1, 16), key=mx.random.key(0))  # a training batch
    before = [plain(inp), biased(inp)]
    use_fast_kernels(model)
    assert type(plain) is patch.FastLinear and type(biased) is patch.FastLinear
    calls.clear()
    after = [plain(inp), biased(inp)]
    assert calls == ["trained"]  # the bias-free layer only, its weight trained: its gradient first
    for a, b in zip(after, before):
        close(a, b, rtol=1e-6, atol=1e-6)
    plain.freeze()  # LoRA's base: its gradient is never wanted, so nothing may wait on it
    calls.clear()
    close(plain(inp), before[0], rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("MLXFLOW_WGRAD_FIRST", "off")
    plain.unfreeze()
    plain(inp)
    assert calls == ["lean", "lean"]
    patch.restore_all()
    assert type(plain) is nn.Linear


def test_swiglu_off_the_fast_path_is_lean_unless_switched_off(monkeypatch):
    ab = mx.ones((4, kernels.LEAN_MIN_ELEMENTS // 4), dtype=mx.bfloat16)
    calls = []
    monkeypatch.setattr(kernels, "lean_swiglu", lambda g, x: calls.append(1) or kernels.reference_swiglu(g, x))

    def lean(setting, device=mx.Device(mx.cpu), b=ab):
        calls.clear()
        if setting is None:
            monkeypatch.delenv("MLXFLOW_LEAN", raising=False)
        else:
            monkeypatch.setenv("MLXFLOW_LEAN", setting)
        monkeypatch.setattr(kernels.mx, "default_device", lambda: device)
        kernels.swiglu(ab, b)
        return bool(calls)

    assert lean(None) and lean("auto") and lean("on")  # the CPU: lean
    assert lean(None, mx.Device(mx.gpu)) and lean("auto", mx.Device(mx.gpu))  # a GPU too (faster and leaner on an H100)
    assert not lean("off") and not lean("OFF", mx.Device(mx.gpu)) and not lean("0")
    assert not lean("on", b=ab[:1])     # broadcasting: plain ops (the lean backward assumes one shape)
    small = ab[:, :8]  # decoding's few tokens: nothing worth saving, the plain fused forward
    calls.clear()
    kernels.swiglu(small, small)
    assert not calls
