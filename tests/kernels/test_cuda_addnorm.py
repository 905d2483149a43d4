"""`mlxcore.kernels.cuda_addnorm` and the Residual layers without a GPU: the kernel sources compile
for Hopper, and with the kernels replaced by their arithmetic in MLX ops the host side (custom
VJP, the weight's per-warp partial gradients, dispatch) and the patched decoder layers of llama,
qwen2, qwen3 and qwen3_moe give mlx-lm's loss and gradients, with no residual add left between
layers. On a GPU the kernels are checked against float64 by the GPU subset."""

from __future__ import annotations

from collections import Counter

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import cuda_addnorm, patch
from mlxcore.models.model import from_config
from mlxcore.models.remat import checkpoint_layers
from tests.kernels.nvcc import CUDA_TYPES, captured, compile_kernel, needs_nvcc
from tests.kernels.test_patch import ARCHS, LAYERS, _config, _same_loss_and_gradients_once_patched, _tokens


def standin_launch(arrays, eps, forward):
    """What the kernels compute, in MLX ops (float32; the sum rounded to the inputs' dtype, each
    result rounded once), the weight's gradient split by warp as the kernel writes it."""
    dt = arrays[0].dtype
    if forward:
        a, b, w = arrays
        s = (a + b).astype(mx.float32)
        r = mx.rsqrt(mx.mean(s * s, axis=-1, keepdims=True) + eps)
        return [s.astype(dt), (w.astype(mx.float32) * (s * r)).astype(dt)]
    s, w, ds, dy = (x.astype(mx.float32) for x in arrays)
    d = s.shape[-1]
    r = mx.rsqrt(mx.mean(s * s, axis=-1, keepdims=True) + eps)
    g = dy * w
    k = r ** 3 * mx.sum(g * s, axis=-1, keepdims=True) / d
    rows = s.size // d
    warps = cuda_addnorm.warps_for(rows, forward=False)
    per_block = min(cuda_addnorm.BLOCK // 32, warps)
    per_row = (dy * s * r).reshape(rows, d)
    pad = -rows % warps
    per_row = mx.concatenate([per_row, mx.zeros((pad, d))]) if pad else per_row
    per_warp = per_row.reshape(-1, warps, d).sum(axis=0)  # row i is warp i % warps's
    return [(ds + (r * g - k * s)).astype(dt), per_warp.reshape(-1, per_block, d).sum(axis=1)]  # a row a block


@pytest.fixture
def standin(monkeypatch):
    """The kernels' arithmetic in MLX ops, taken wherever `kernels.add_rms_norm_on` would on CUDA;
    records each launch (True: forward)."""
    launches = []
    monkeypatch.setattr(cuda_addnorm, "_launch", lambda arrays, eps, forward: launches.append(forward) or standin_launch(arrays, eps, forward))
    monkeypatch.setattr(cuda_addnorm, "_column_sum", lambda part, dtype: part.sum(axis=0).astype(dtype))
    monkeypatch.setattr(cuda_addnorm, "on", lambda: True)
    return launches


def _unfused(a, b, w, eps):
    s = a + b
    return s, mx.fast.rms_norm(s, w, eps)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_host_side_is_the_sum_and_its_norm_in_value_and_gradients(standin, monkeypatch, dtype):
    monkeypatch.setattr(cuda_addnorm, "MAX_WARPS", 4)  # 21 rows: warps hold 6 or 5 rows each
    assert cuda_addnorm.warps_for(21, forward=False) == 4
    dt = getattr(mx, dtype)
    a, b, cs, cy = (mx.random.normal((3, 7, 64), key=mx.random.key(i)).astype(dt) for i in range(4))
    w = (1 + 0.1 * mx.random.normal((64,), key=mx.random.key(9))).astype(dt)

    def loss(f):
        def value(a, b, w):
            s, y = f(a, b, w, 1e-5)
            return (s * cs).astype(mx.float32).sum() + (y * cy).astype(mx.float32).sum()
        return value

    ours = mx.compile(mx.value_and_grad(loss(cuda_addnorm.add_rms_norm), argnums=(0, 1, 2)))(a, b, w)
    ref = mx.value_and_grad(loss(_unfused), argnums=(0, 1, 2))(*(x.astype(mx.float32) for x in (a, b, w)))
    tol = 2e-5 if dtype == "float32" else 3e-2
    assert ours[0].item() == pytest.approx(ref[0].item(), rel=tol, abs=tol)
    for g, r in zip(ours[1], ref[1]):
        assert g.dtype == dt
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(r), rtol=tol, atol=tol * 4)
    assert standin == [True, False]  # one kernel each way


def test_an_unused_output_gets_a_zero_cotangent(standin):
    """Only the norm used (or only the sum): the other output's cotangent is zero, not missing."""
    a, b = (mx.random.normal((5, 32), key=mx.random.key(i)) for i in range(2))
    w = mx.ones((32,))
    for pick in (0, 1):
        ours = mx.grad(lambda a: cuda_addnorm.add_rms_norm(a, b, w, 1e-6)[pick].sum())(a)
        ref = mx.grad(lambda a: _unfused(a, b, w, 1e-6)[pick].sum())(a)
        np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-5, atol=1e-6)


def test_a_launch_runs_whole_blocks_a_row_a_warp_forward_and_at_most_max_warps_backward():
    """The grid is whole blocks (the backward's partial rows are one a block), one warp a row in the
    forward, and in the backward at most MAX_WARPS, a multiple of a block."""
    per_block = cuda_addnorm.BLOCK // 32
    for forward in (True, False):
        assert [cuda_addnorm.warps_for(r, forward) for r in (1, per_block, per_block + 1)] == [per_block, per_block, 2 * per_block]
    assert cuda_addnorm.warps_for(10 ** 6, forward=False) == cuda_addnorm.MAX_WARPS
    assert cuda_addnorm.warps_for(10 ** 6, forward=True) == 10 ** 6
    assert cuda_addnorm.MAX_WARPS % per_block == 0


def test_supports_and_dispatch(standin, monkeypatch):
    big = mx.ones((4, kernels.LEAN_MIN_ELEMENTS // 4 // 256, 256), dtype=mx.bfloat16)
    w = mx.ones((256,), dtype=mx.bfloat16)
    assert cuda_addnorm.supports(big, big, w)
    assert not cuda_addnorm.supports(big, big.astype(mx.float16), w)  # mixed dtypes
    assert not cuda_addnorm.supports(big[..., :252], big[..., :252], w[:252])  # not whole 16-byte pieces
    wide = mx.ones((2, 32 * 8 * (cuda_addnorm.MAX_PIECES + 1)), dtype=mx.bfloat16)
    assert not cuda_addnorm.supports(wide, wide, wide[0])  # over MAX_PIECES a lane
    kernels.add_rms_norm(big, big, w, 1e-5)
    assert standin == [True]
    kernels.add_rms_norm(big[:1, :1], big[:1, :1], w, 1e-5)  # decoding-sized: MLX's ops
    kernels.add_rms_norm(big, big.astype(mx.float16), w, 1e-5)
    assert standin == [True]
    monkeypatch.undo()  # the real `on`: off the GPU (or with MLXFLOW_CUDA_LAYERS=rope) no kernel
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "rope")
    monkeypatch.setattr(cuda_addnorm.cuda, "available", lambda: True)
    assert not cuda_addnorm.on() and not kernels.add_rms_norm_on(big, w)
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "addnorm")
    assert cuda_addnorm.on()


# ------------------------------------------------------------------ the Residual layers
@pytest.fixture
def residual(standin, monkeypatch):
    """Every input training-sized; counts `kernels.rms_norm` calls (norms computed on their own)."""
    patch.restore_all()
    monkeypatch.setattr(kernels, "LEAN_MIN_ELEMENTS", 1)
    norms = Counter()
    plain = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: norms.update(["rms_norm"]) or plain(x, w, eps))
    yield standin, norms
    patch.restore_all()


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_layers_fuse_every_add_with_mlx_lm_results(residual, arch):
    """Each layer's two adds run with the norm after them (the last with the model's final norm):
    2 forward launches a layer, one norm computed alone (the first layer's, of the embeddings),
    and mlx-lm's loss and gradients."""
    launches, norms = residual
    model = from_config(_config(arch), seed=6)
    classes = {name: type(m) for name, m in model.named_modules()}
    _same_loss_and_gradients_once_patched(model, _tokens(7), _tokens(8))
    assert launches.count(True) == 2 * LAYERS and launches.count(False) == 2 * LAYERS
    per_head = 2 * LAYERS if arch.startswith("qwen3") else 0  # qwen3's attention normalises q and k
    assert norms["rms_norm"] == 1 + per_head  # (the unpatched pass runs mlx.nn's own norms)
    assert all(type(layer).__name__.startswith("Residual") for layer in model.layers)
    patch.restore_all()
    assert {name: type(m) for name, m in model.named_modules()} == classes


def test_a_norm_called_on_another_array_computes_its_own(residual):
    """The handed-over norm is taken only by a call on the very array the layer returned: a loop
    that changes the stream between layers gets the norm of what it passes."""
    launches, norms = residual
    model = from_config(_config("llama"), seed=7)
    patch.use_fast_kernels(model)
    h = model.model.embed_tokens(_tokens(9))
    out = model.layers[0](h)
    nxt = model.layers[1].input_layernorm
    changed = out * 2
    np.testing.assert_allclose(np.array(nxt(changed)), np.array(mx.fast.rms_norm(changed, nxt.weight, nxt.eps)),
                               rtol=1e-5, atol=1e-5)
    assert norms["rms_norm"] == 2  # layer 0's input norm, and this one
    # and the stale hand-over is gone: the same output is now normalised afresh
    np.testing.assert_allclose(np.array(nxt(out)), np.array(mx.fast.rms_norm(out, nxt.weight, nxt.eps)), rtol=1e-5, atol=1e-5)
    assert norms["rms_norm"] == 3


def test_decoding_with_a_cache_runs_mlx_lm_s_layer(residual):
    from mlx_lm.models.cache import make_prompt_cache

    launches, _ = residual
    model = from_config(_config("qwen3"), seed=8)
    x = _tokens(10, (1, 6))
    reference = model(x, cache=make_prompt_cache(model))
    patch.use_fast_kernels(model)
    out = model(x, cache=make_prompt_cache(model))
    assert launches == []
    np.testing.assert_allclose(np.array(out), np.array(reference), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_over_residual_layers_keeps_the_gradients(residual):
    """Segments of two layers, which rebind each layer's weights just before its call: a norm takes
    the hand-over only if its weight is the one the layer before used (else the gradient of the
    segment's input weight would be lost), and the checkpoint's output is another array, so the
    loss and every gradient are unchanged."""
    launches, _ = residual
    model = from_config({**_config("llama"), "num_hidden_layers": 4}, seed=9)
    x, y = _tokens(11), _tokens(12)

    def loss(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    reference = nn.value_and_grad(model, loss)(model, x, y)
    patch.use_fast_kernels(model)
    checkpoint_layers(model.model, 2)
    value, grads = nn.value_and_grad(model, loss)(model, x, y)
    assert value.item() == pytest.approx(reference[0].item(), rel=1e-5)
    from mlx.utils import tree_flatten

    ref = dict(tree_flatten(reference[1]))
    for k, g in tree_flatten(grads):
        np.testing.assert_allclose(np.array(g), np.array(ref[k]), rtol=1e-3, atol=1e-5, err_msg=k)
    assert launches.count(True) == 2 * (2 * 4)  # the forward's, and the backward's recomputation


@needs_nvcc
@pytest.mark.parametrize("dtype,d", [(mx.bfloat16, 768), (mx.float32, 768), (mx.bfloat16, 2048)],
                         ids=["bfloat16-768", "float32-768", "bfloat16-2048"])
def test_the_kernel_sources_compile(tmp_path, monkeypatch, dtype, d):
    """For sm_90, with no stack frame (`tests/kernels/nvcc.py`), up to MAX_PIECES a lane."""
    for forward in (True, False):
        kernel = captured(monkeypatch, lambda: cuda_addnorm._kernel.__wrapped__(dtype, cuda_addnorm.pieces(dtype, d), forward))
        types = {"meta": "int64_t", "eps_in": "float", "d_w_part": "float"}
        compile_kernel(tmp_path, kernel, types | {n: CUDA_TYPES[dtype] for n in kernel["inputs"] + kernel["outputs"] if n not in types})
    kernel = captured(monkeypatch, cuda_addnorm._column_sum_kernel.__wrapped__)
    compile_kernel(tmp_path, kernel, {"meta": "int64_t", "part": "float", "out": CUDA_TYPES[dtype]})
