"""`mlxcore.kernels.cuda_attention`: mlx-lm's attention on CUDA through our cuDNN graph.

Without a GPU: which calls it takes (the shape rules, and the routing from a patched model, with
the extension replaced by MLX's attention), and how its build explains missing headers. With
`-m gpu` on an NVIDIA GPU: the extension itself, values and all three gradients against float64,
and a compiled model's loss and gradients with it on and off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import _build, cuda, cuda_attention, patch

RNG = np.random.default_rng(0)


def _qkv(B=2, T=16, H=4, Hkv=2, D=64, S=None, dtype=mx.bfloat16):
    """q / k / v as mlx-lm's attention gets them: [B, H, T, D] views of row-major [B, T, H, D]."""
    S = T if S is None else S
    mk = lambda t, h: mx.array(RNG.standard_normal((B, t, h, D))).astype(dtype).transpose(0, 2, 1, 3)  # noqa: E731
    return mk(T, H), mk(S, Hkv), mk(S, Hkv)


@pytest.mark.parametrize("case, ok", [
    (dict(), True),
    (dict(dtype=mx.float16), True),
    (dict(H=8, Hkv=8, D=128), True),
    (dict(dtype=mx.float32), False),       # cuDNN's flash attention: 16-bit inputs only
    (dict(D=136), False),                  # head dimension over 128
    (dict(D=20), False),                   # not a multiple of 8
    (dict(H=6, Hkv=4), False),             # heads not a multiple of the kv heads
    (dict(S=24), False),                   # causal with more keys than queries: bottom-right differs
])
def test_the_calls_it_takes(case, ok):
    q, k, v = _qkv(**case)
    assert cuda_attention.supported(q, k, v, causal=True) is ok


def test_without_a_causal_mask_any_number_of_keys_is_fine():
    q, k, v = _qkv(S=24)
    assert cuda_attention.supported(q, k, v, causal=False)


def test_off_cuda_it_never_applies():
    assert not cuda.available()
    assert not cuda_attention.applies(*_qkv(), causal=True)


class _Standin:
    """The extension's `attention` with MLX's own (the same function), recording its calls."""

    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, scale, causal):
        self.calls.append((tuple(q.shape), tuple(k.shape), scale, causal))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)


def _llama(dtype):
    from mlx_lm.models import llama
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                           tie_word_embeddings=False)
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(dtype)
    return model


def _loss_and_grads(model, tokens, compiled=False):
    """The model's mean next-token cross-entropy on `tokens` and its gradients, evaluated; compiled:
    through `mx.compile`, as a training step runs them (the loss closes over the model, whose
    parameters `nn.value_and_grad` passes in)."""
    def loss():
        return nn.losses.cross_entropy(model(tokens[:, :-1]).astype(mx.float32), tokens[:, 1:]).mean()

    step = nn.value_and_grad(model, loss)
    out = (mx.compile(step) if compiled else step)()
    mx.eval(out)
    return out


def _assert_close(got, want, tol, grad_tol=None):
    """Two (loss, gradients) results agree: the loss within `tol`, the gradients within `grad_tol`
    (default 5 x tol), absolute and relative."""
    from mlx.utils import tree_flatten

    grad_tol = 5 * tol if grad_tol is None else grad_tol
    assert abs(got[0].item() - want[0].item()) <= tol
    for (name, a), (_, b) in zip(tree_flatten(got[1]), tree_flatten(want[1]), strict=True):
        np.testing.assert_allclose(_np(a), _np(b), atol=grad_tol, rtol=grad_tol, err_msg=name)


@pytest.mark.parametrize("dtype, taken", [(mx.bfloat16, True), (mx.float32, False)])
def test_a_patched_model_sends_its_training_attention_there(monkeypatch, dtype, taken):
    """Each layer's cache-free causal attention goes to the extension (bfloat16), and the loss and
    gradients are MLX's; float32 keeps MLX's attention."""
    standin = _Standin()
    monkeypatch.setattr(cuda_attention, "_ext", lambda: standin)
    monkeypatch.setattr(kernels, "available", lambda: False)  # the CPU kernels would come first
    tokens = mx.array(RNG.integers(0, 97, (2, 12)))
    patch.restore_all()  # mlx-lm's own attention for the reference (a test before may have left it patched)
    model = _llama(dtype)
    want = _loss_and_grads(model, tokens)
    assert standin.calls == []
    patch.use_fast_kernels(model)
    try:
        got = _loss_and_grads(model, tokens)
        mx.eval(model(tokens[:, :1]))  # one token, no cache: mlx-lm passes no mask
        assert len(standin.calls) == (4 if taken else 0)
        compiled = _loss_and_grads(model, tokens, compiled=True)  # as a training step runs it
    finally:
        patch.restore_all()
    if taken:
        assert standin.calls[0] == ((2, 4, 11, 16), (2, 2, 11, 16), 16 ** -0.5, True)
        assert standin.calls[3] == ((2, 4, 1, 16), (2, 2, 1, 16), 16 ** -0.5, False)
        assert len(standin.calls) == 6  # the compiled step traced the two layers' calls once
    tol = 2e-2 if dtype == mx.bfloat16 else 1e-5
    _assert_close(got, want, tol)
    _assert_close(compiled, want, tol)


def test_kernels_attention_takes_it_except_for_packed_rows(monkeypatch):
    standin = _Standin()
    monkeypatch.setattr(cuda_attention, "_ext", lambda: standin)
    q, k, v = _qkv()
    out = kernels.attention(q, k, v, 0.125)
    assert standin.calls == [((2, 4, 16, 64), (2, 2, 16, 64), 0.125, True)]
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(kernels.reference_attention(
        q, k, v, 0.125).astype(mx.float32)), atol=1e-6)
    kernels.attention(q, k, v, 0.125, segments=mx.zeros((2, 16), mx.int32))  # block-diagonal: not cuDNN's mask
    assert len(standin.calls) == 1


def test_decoding_with_a_cache_keeps_mlx_lm_attention(monkeypatch):
    standin = _Standin()
    monkeypatch.setattr(cuda_attention, "_ext", lambda: standin)
    monkeypatch.setattr(kernels, "available", lambda: False)
    from mlx_lm.models.cache import make_prompt_cache
    model = _llama(mx.bfloat16)
    patch.use_fast_kernels(model)
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
        mx.eval(model(mx.array([[4]]), cache=cache))
    finally:
        patch.restore_all()
    assert standin.calls == []


def test_it_runs_only_where_the_layer_switch_names_it(monkeypatch):
    """On by default on CUDA (`auto`), as with `all` or a list naming `attention`; off with `off` or a
    list without it."""
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda_attention.EXTENSION, "load", lambda: object())
    for layers, on in (("auto", True), ("rope,swiglu", False), ("off", False), ("all", True), ("rope,attention", True)):
        monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", layers)
        assert (cuda_attention._ext() is not None) is on, layers
        assert cuda_attention.status() == ("cuDNN attention, top-left causal mask" if on else "MLX's attention")


def test_missing_headers_are_named_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_attention, "_nvidia_dirs", lambda sub: [])
    monkeypatch.setattr(cuda_attention, "_frontend_dirs", lambda: [])
    monkeypatch.setenv("CUDNN_FRONTEND_INCLUDE", str(tmp_path))
    with pytest.raises(_build.KernelsUnavailable, match="pip install nvidia-cudnn-frontend.*CUDNN_FRONTEND_INCLUDE"):
        cuda_attention._find("frontend")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cudnn_frontend.h").write_text("")
    assert cuda_attention._find("frontend") == tmp_path / "include"


def test_the_gpu_check_says_why_it_cannot_run_without_cuda():
    """bench/cudnn_attention_check.py (run on the lent GPU) stops with the reason, non-zero, here."""
    if cuda.available():
        pytest.skip("MLX's CUDA backend is here")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "bench" / "cudnn_attention_check.py"), "--skip-speed"],
                       capture_output=True, text=True, timeout=300, cwd=root,
                       env={**os.environ, "MLXFLOW_CUDA_LAYERS": "all"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no CUDA backend" in r.stdout and "smoke" not in r.stdout


def test_without_mlx_cuda_the_build_is_refused_before_compiling():
    """MLX's CPU wheel ships the CUDA headers but not the backend: the build stops there."""
    if cuda.available():
        pytest.skip("MLX's CUDA backend is here")
    with pytest.raises(_build.KernelsUnavailable, match="no CUDA backend"):
        cuda_attention._configure()


# ---------------------------------------------------------------------------- on an NVIDIA GPU

def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _reference(q, k, v, scale, causal, w):
    """float64 attention, and the gradients of sum(out * w) by hand."""
    qn, kn, vn = _np(q), _np(k), _np(v)
    rep = qn.shape[1] // kn.shape[1]
    kr, vr = np.repeat(kn, rep, 1), np.repeat(vn, rep, 1)
    s = qn @ kr.transpose(0, 1, 3, 2) * scale
    if causal:
        T = s.shape[-1]
        s = np.where(np.arange(T)[None] <= np.arange(T)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vr
    dp = w @ vr.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = ds @ kr
    fold = lambda x: x.reshape(x.shape[0], -1, rep, *x.shape[2:]).sum(2)  # noqa: E731
    return out, dq, fold(ds.transpose(0, 1, 3, 2) @ qn), fold(p.transpose(0, 1, 3, 2) @ w)


def _needs_extension(monkeypatch):
    if not cuda.available():
        pytest.skip("needs MLX's CUDA backend")
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "all")
    if cuda_attention._ext() is None:
        pytest.fail(f"the cuDNN attention extension did not build: {cuda_attention.EXTENSION.error()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, causal, B, T, H, Hkv, D", [
    ("bfloat16", True, 2, 200, 8, 2, 64), ("float16", True, 1, 130, 4, 4, 128), ("bfloat16", False, 2, 96, 6, 3, 32)],
    ids=["bf16-causal-gqa", "fp16-causal-d128", "bf16-full"])
def test_it_matches_float64_in_value_and_all_three_gradients(dtype, causal, B, T, H, Hkv, D, monkeypatch):
    _needs_extension(monkeypatch)
    q, k, v = _qkv(B, T, H, Hkv, D, dtype=getattr(mx, dtype))
    w = RNG.standard_normal((B, H, T, D))
    scale = D ** -0.5
    f = mx.compile(mx.value_and_grad(
        lambda q, k, v: (cuda_attention.attention(q, k, v, scale, causal).astype(mx.float32) * mx.array(w, mx.float32)).sum(),
        argnums=(0, 1, 2)))
    (_, grads) = f(q, k, v)
    out = cuda_attention.attention(q, k, v, scale, causal)
    want = _reference(q, k, v, scale, causal, w)
    np.testing.assert_allclose(_np(out), want[0], atol=2e-2, rtol=2e-2)
    for name, got, ref in zip("qkv", grads, want[1:]):
        assert got.dtype == q.dtype and got.shape == (q if name == "q" else k).shape
        np.testing.assert_allclose(_np(got), ref, atol=5e-2 * max(1.0, np.abs(ref).max() / 4), rtol=5e-2, err_msg=f"d{name}")


@pytest.mark.gpu
def test_a_compiled_model_trains_the_same_with_it_on_and_off(monkeypatch):
    _needs_extension(monkeypatch)
    tokens = mx.array(RNG.integers(0, 97, (4, 65)))
    results = []
    for layers in ("all", ",".join(x for x in cuda.LAYERS if x != "attention")):  # ours, then MLX's attention
        monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", layers)
        assert cuda_attention.status().startswith("cuDNN") == (layers == "all")
        model = _llama(mx.bfloat16)
        patch.use_fast_kernels(model)
        try:
            results.append(_loss_and_grads(model, tokens, compiled=True))
        finally:
            patch.restore_all()
    _assert_close(*results, 2e-2, grad_tol=5e-2)


def test_the_build_is_keyed_on_the_cudnn_and_frontend_versions(monkeypatch, tmp_path):
    """Headers upgraded in place keep their paths: a new cuDNN or frontend version must rebuild."""
    dirs = {kind: tmp_path / kind for kind in cuda_attention.HEADERS}
    for kind, d in dirs.items():
        d.mkdir()
        for h in cuda_attention.HEADERS[kind]:
            (d / h).write_text("")
    (dirs["cudnn"] / "cudnn_version.h").write_text("#define CUDNN_MINOR 19\n")
    (dirs["frontend"] / "cudnn_frontend_version.h").write_text("#define CUDNN_FRONTEND_MINOR_VERSION 16\n")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_attention, "_find", lambda kind: dirs[kind])
    monkeypatch.setattr(cuda_attention, "_library", lambda name: tmp_path / "lib" / f"{name}.so.9")
    first = cuda_attention._configure()
    assert f"-I{dirs['frontend']}" in first["common"] and "-l:libcudnn.so.9" in first["link"]
    # line tables, not stripped: the trace's crash report gives offsets that addr2line can name
    assert "-g1" in first["kflags"] and "-Wl,-s" not in first["link"]
    (dirs["cudnn"] / "cudnn_version.h").write_text("#define CUDNN_MINOR 28\n")
    assert cuda_attention._configure()["key"] != first["key"]
    (dirs["cudnn"] / "cudnn_version.h").write_text("#define CUDNN_MINOR 19\n")
    assert cuda_attention._configure()["key"] == first["key"]
