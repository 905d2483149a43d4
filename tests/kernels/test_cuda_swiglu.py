"""`mlxcore.kernels.cuda_swiglu` without a GPU: its kernel sources compile for Hopper, and the
host side (the custom VJP, the dispatch from `kernels.swiglu`) computes silu(gate) * x and its
gradients when the kernels are replaced by their arithmetic in MLX ops. On a GPU the kernels
are checked against float64 by the GPU subset (tests/mlxcore/test_gpu_subset.py)."""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import cuda_swiglu
from tests.kernels.nvcc import CUDA_TYPES, captured, compile_kernel, needs_nvcc


def standin_launch(arrays, forward):
    """What the kernels compute, in MLX ops (float32, one rounding per result)."""
    g, x = (a.astype(mx.float32) for a in arrays[:2])
    s = mx.sigmoid(g)
    if forward:
        return [(g * s * x).astype(arrays[0].dtype)]
    c = arrays[2].astype(mx.float32)
    return [(c * x * (s * (1 + g * (1 - s)))).astype(arrays[0].dtype), (c * (g * s)).astype(arrays[0].dtype)]


@pytest.fixture
def standin(monkeypatch):
    launches = []
    monkeypatch.setattr(cuda_swiglu, "_launch", lambda arrays, forward: launches.append(forward) or standin_launch(arrays, forward))
    return launches


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_host_side_is_silu_times_x_in_value_and_gradients(standin, dtype):
    dt = getattr(mx, dtype)
    gate, x, c = (mx.random.normal((3, 7, 40), key=mx.random.key(i)).astype(dt) for i in range(3))
    loss = lambda f: lambda g, x: (f(g, x) * c).astype(mx.float32).sum()  # noqa: E731
    ours = mx.compile(mx.value_and_grad(loss(cuda_swiglu.swiglu), argnums=(0, 1)))(gate, x)
    ref = mx.value_and_grad(loss(lambda g, x: g * mx.sigmoid(g) * x), argnums=(0, 1))(
        gate.astype(mx.float32), x.astype(mx.float32))
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert abs(ours[0].item() - ref[0].item()) <= tol * max(1.0, abs(ref[0].item())) * 10
    for g, r in zip(ours[1], ref[1]):
        assert g.dtype == dt
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(r), rtol=tol, atol=tol)
    assert standin == [True, False]  # one kernel each way


def test_kernels_swiglu_takes_it_for_training_batches_on_cuda_only(standin, monkeypatch):
    monkeypatch.setattr(cuda_swiglu.cuda, "available", lambda: True)
    big = mx.ones((4, kernels.LEAN_MIN_ELEMENTS // 4), dtype=mx.bfloat16)  # not the CPU kernel's float32
    kernels.swiglu(big, big)
    assert standin == [True]
    kernels.swiglu(big[:1], big[:1])  # decoding-sized
    kernels.swiglu(big, big.astype(mx.float16))  # mixed dtypes: plain ops
    kernels.swiglu(big, big[:, :1])  # broadcasting
    for off in ({"MLXFLOW_CUDA_LAYERS": "rope"}, {"MLXFLOW_LEAN": "off"}):
        for k, v in off.items():
            monkeypatch.setenv(k, v)
        kernels.swiglu(big, big)
        for k in off:
            monkeypatch.delenv(k)
    assert standin == [True]
    monkeypatch.setattr(cuda_swiglu.cuda, "available", lambda: False)
    kernels.swiglu(big, big)
    assert standin == [True]


@needs_nvcc
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bfloat16", "float32"])
def test_the_kernel_sources_compile(tmp_path, monkeypatch, dtype):
    """For sm_90, with no stack frame (`tests/kernels/nvcc.py`)."""
    for forward in (True, False):
        kernel = captured(monkeypatch, lambda: cuda_swiglu._kernel.__wrapped__(dtype, forward))
        compile_kernel(tmp_path, kernel, {"meta": "int64_t"} | {n: CUDA_TYPES[dtype] for n in kernel["inputs"][1:] + kernel["outputs"]})
