"""`mlxcore.kernels.cuda_rope` without a GPU: its kernel sources compile for Hopper, and the host
side (the table, the layout, the custom VJP, the dispatch from `kernels.rope`) computes
`mx.fast.rope` when the kernel is replaced by its arithmetic in MLX ops. On a GPU the kernel
itself is checked against float64 by the GPU subset (tests/mlxcore/test_gpu_subset.py)."""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import cuda_rope
from tests.kernels.nvcc import CUDA_TYPES, captured, compile_kernel, needs_nvcc

RNG = np.random.default_rng(0)


def standin_launch(x, tab, dims, traditional, forward):
    """What the kernel computes, in MLX ops: x [B, T, H, D] rotated by the table's angles
    (position = axis 1), the dims past `dims` passed through."""
    B, T, H, D = x.shape
    half = dims // 2
    c, s = tab[:, :half][None, :, None, :], tab[:, half:][None, :, None, :]
    xf = x.astype(mx.float32)
    x1, x2 = (xf[..., 0:dims:2], xf[..., 1:dims:2]) if traditional else (xf[..., :half], xf[..., half:dims])
    if forward:
        r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        r1, r2 = x2 * s + x1 * c, x2 * c - x1 * s
    rot = mx.stack([r1, r2], axis=-1).reshape(B, T, H, dims) if traditional else mx.concatenate([r1, r2], axis=-1)
    return mx.concatenate([rot, xf[..., dims:]], axis=-1).astype(x.dtype)


@pytest.fixture
def standin(monkeypatch):
    launches = []

    def launch(x, tab, dims, traditional, forward):
        launches.append((tuple(x.shape), forward))
        return standin_launch(x, tab, dims, traditional, forward)

    monkeypatch.setattr(cuda_rope, "_launch", launch)
    cuda_rope._rope_bthd.cache_clear()
    yield launches
    cuda_rope._rope_bthd.cache_clear()


def _projection_view(B, T, H, D, dtype=mx.float32):
    """q as mlx-lm's attention ropes it: the [B, H, T, D] view of a row-major [B, T, H*D] product."""
    flat = mx.array(RNG.standard_normal((B, T, H * D))).astype(dtype)
    return flat, flat.reshape(B, T, H, D).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("dims, traditional, offset", [(64, False, 0), (32, False, 0), (64, True, 0), (48, True, 5)],
                         ids=["full", "partial", "traditional", "traditional-partial-offset"])
def test_the_host_side_is_mx_fast_rope_in_value_and_gradient(standin, dims, traditional, offset):
    B, T, H, D = 2, 24, 3, 64
    flat, _ = _projection_view(B, T, H, D)
    cot = mx.array(RNG.standard_normal((B, H, T, D))).astype(mx.float32)
    kw = dict(traditional=traditional, base=10000.0, scale=0.5)

    def loss(rope, flat):
        q = flat.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        return (rope(q, dims, offset=offset, **kw) * cot).sum()

    ours = lambda q, d, offset, **k: cuda_rope.rope(q, d, offset=offset, **k)  # noqa: E731
    theirs = lambda q, d, offset, **k: mx.fast.rope(q, d, offset=offset, **k)  # noqa: E731
    (l1, g1), (l2, g2) = (mx.value_and_grad(lambda f: loss(r, f))(flat) for r in (ours, theirs))
    y = cuda_rope.rope(flat.reshape(B, T, H, D).transpose(0, 2, 1, 3), dims, offset=offset, **kw)
    want = mx.fast.rope(flat.reshape(B, T, H, D).transpose(0, 2, 1, 3), dims, offset=offset, **kw)
    assert y.shape == (B, H, T, D)
    np.testing.assert_allclose(np.array(y), np.array(want), atol=2e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=2e-5)
    assert abs(l1.item() - l2.item()) < 1e-3
    assert {fwd for _, fwd in standin} == {True, False} and all(s == (B, T, H, D) for s, _ in standin)


def test_the_table_holds_mlx_s_angles():
    tab = cuda_rope.table(16, 3, 8, 500000.0, 1.0)
    assert tab.shape == (16, 8) and tab.dtype == mx.float32
    inv = 500000.0 ** (-np.arange(4) / 4)
    theta = np.arange(3, 19)[:, None] * inv[None, :]
    np.testing.assert_allclose(np.array(tab), np.concatenate([np.cos(theta), np.sin(theta)], 1), atol=2e-6)
    assert cuda_rope.table(16, 3, 8, 500000.0, 1.0) is tab  # cached: built once per shape


def test_supports_needs_rows_of_16_byte_pieces():
    assert cuda_rope.supports(mx.bfloat16, 64, 64, False)  # 32 pairs: 4 threads of 8
    assert cuda_rope.supports(mx.float32, 64, 64, True)
    assert not cuda_rope.supports(mx.bfloat16, 64, 24, False)  # 12 pairs: not a multiple of 8
    assert cuda_rope.supports(mx.bfloat16, 72, 64, False)  # 8 passed-through dims: one piece
    assert not cuda_rope.supports(mx.bfloat16, 68, 64, False)  # 4 passed-through dims: half a piece
    assert not cuda_rope.supports(mx.int32, 64, 64, False)
    assert not cuda_rope.supports(mx.float32, 64, 66, False)  # more rotated dims than the head has


def test_kernels_rope_takes_it_for_training_batches_on_cuda_only(standin, monkeypatch):
    monkeypatch.setattr(cuda_rope.cuda, "available", lambda: True)
    big = _projection_view(2, 128, 4, 64)[1]  # 65,536 values: a training batch
    small = big[:, :, :8]
    kw = dict(traditional=False, base=10000.0, scale=1.0)
    mx.eval(kernels.rope(big, 64, **kw))
    assert standin == [((2, 128, 4, 64), True)]
    for call in (lambda: kernels.rope(small, 64, **kw),  # decoding-sized
                 lambda: kernels.rope(big, 64, offset=mx.array([0, 3]), **kw),  # a packed batch's offsets
                 lambda: kernels.rope(big, 64, traditional=False, base=None, scale=1.0,
                                      freqs=mx.ones((32,)))):  # custom frequencies
        mx.eval(call())
    assert len(standin) == 1
    monkeypatch.setenv("MLXFLOW_CUDA_LAYERS", "swiglu")  # the other layer only
    mx.eval(kernels.rope(big, 64, **kw))
    assert len(standin) == 1
    monkeypatch.delenv("MLXFLOW_CUDA_LAYERS")
    monkeypatch.setattr(cuda_rope.cuda, "available", lambda: False)
    mx.eval(kernels.rope(big, 64, **kw))
    assert len(standin) == 1


@needs_nvcc
@pytest.mark.parametrize("dtype, dims, traditional", [(mx.bfloat16, 64, False), (mx.float16, 32, False),
                                                     (mx.float32, 48, True)])
def test_the_kernel_sources_compile(tmp_path, monkeypatch, dtype, dims, traditional):
    """For sm_90, with no stack frame (`tests/kernels/nvcc.py`)."""
    for forward in (True, False):
        kernel = captured(monkeypatch, lambda: cuda_rope._kernel.__wrapped__(dtype, 64, dims, traditional, forward))
        compile_kernel(tmp_path, kernel, {"meta": "int64_t", "table": "float", "inp": CUDA_TYPES[dtype], "out": CUDA_TYPES[dtype]})
