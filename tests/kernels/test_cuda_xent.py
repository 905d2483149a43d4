"""`mlxcore.kernels.cuda_xent` without a GPU: its kernel sources compile for Hopper, and with the
kernels replaced by their arithmetic in MLX ops the host side (custom VJP, the saved logsumexp,
ignored targets, dispatch from `kernels.cross_entropy`) gives `reference_cross_entropy`'s losses
and gradients. On a GPU the kernels are checked against float64 by the GPU subset."""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import cuda_xent
from tests.kernels.nvcc import CUDA_TYPES, captured, compile_kernel, needs_nvcc


def standin_launch(arrays, forward):
    """What the kernels compute, in MLX ops (float32; the gradient rounded once to the logits' dtype)."""
    logits, targets = arrays[0], arrays[1]
    x = logits.astype(mx.float32)
    v = x.shape[-1]
    valid = (targets >= 0) & (targets < v)
    if forward:
        lse = mx.logsumexp(x, axis=-1)
        picked = mx.take_along_axis(x, mx.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
        return [mx.where(valid, lse - picked, 0.0), lse]
    g, lse = mx.where(valid, arrays[2], 0.0), arrays[3]
    onehot = mx.arange(v)[None, :] == targets[:, None]
    return [((mx.exp(x - lse[:, None]) - onehot) * g[:, None]).astype(logits.dtype)]


@pytest.fixture
def standin(monkeypatch):
    launches = []
    monkeypatch.setattr(cuda_xent, "_launch", lambda arrays, forward: launches.append(forward) or standin_launch(arrays, forward))
    monkeypatch.setattr(cuda_xent, "on", lambda: True)
    monkeypatch.setattr(kernels, "LEAN_MIN_ELEMENTS", 1)
    return launches


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_host_side_is_the_reference_loss_and_gradient(standin, dtype):
    dt = getattr(mx, dtype)
    logits = (3 * mx.random.normal((2, 9, 50), key=mx.random.key(0))).astype(dt)
    targets = mx.random.randint(0, 50, (2, 9), key=mx.random.key(1))
    targets = targets.at[0, 3].add(-targets[0, 3] - 1).at[1, 2].add(50 - targets[1, 2])  # -1 and V: ignored
    weights = mx.random.uniform(shape=(2, 9), key=mx.random.key(2))

    def loss(f):
        return lambda z: (f(z, targets) * weights).sum()

    ours = mx.compile(mx.value_and_grad(loss(kernels.cross_entropy)))(logits)
    ref = mx.value_and_grad(loss(kernels.reference_cross_entropy))(logits)
    assert standin == [True, False]
    per_token = kernels.cross_entropy(logits, targets)
    assert per_token.dtype == mx.float32 and per_token.shape == (2, 9)
    assert per_token[0, 3].item() == 0 and per_token[1, 2].item() == 0
    assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert ours[1].dtype == dt
    np.testing.assert_allclose(np.array(ours[1].astype(mx.float32)), np.array(ref[1].astype(mx.float32)), rtol=1e-2, atol=1e-6)
    assert not np.array(ours[1][0, 3].astype(mx.float32)).any()  # an ignored target: no gradient


def test_kernels_cross_entropy_takes_it_for_training_batches_on_cuda_only(standin, monkeypatch):
    logits, targets = mx.zeros((4, 8, 16), dtype=mx.bfloat16), mx.zeros((4, 8), dtype=mx.int32)
    kernels.cross_entropy(logits, targets)
    assert standin == [True]
    monkeypatch.setattr(kernels, "LEAN_MIN_ELEMENTS", 1 << 16)
    kernels.cross_entropy(logits, targets)  # decoding-sized: as before
    assert standin == [True]
    monkeypatch.undo()
    monkeypatch.setattr(cuda_xent.cuda, "available", lambda: True)
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "rope,swiglu,addnorm")
    assert not cuda_xent.on()
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "auto")
    assert cuda_xent.on()
    assert not cuda_xent.supports(logits, targets[:, :4]) and not cuda_xent.supports(logits.astype(mx.int32), targets)


@needs_nvcc
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bfloat16", "float32"])
def test_the_kernel_sources_compile(tmp_path, monkeypatch, dtype):
    """For sm_90, with no stack frame (`tests/kernels/nvcc.py`)."""
    for forward in (True, False):
        kernel = captured(monkeypatch, lambda: cuda_xent._kernel.__wrapped__(dtype, forward))
        types = {"meta": "int64_t", "targets": "int64_t", "loss": "float", "lse_out": "float", "cot": "float", "lse_in": "float"}
        compile_kernel(tmp_path, kernel, types | {n: CUDA_TYPES[dtype] for n in ("logits", "d_logits")})
