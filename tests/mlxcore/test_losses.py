"""Chunked and sparse cross-entropy give the plain path's loss and gradients; so does remat."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.models import remat
from mlxcore.train.losses import Loss
from mlxcore.models.model import from_config, hf_config

from tests.conftest import micro_model

V = 512


def _model(seed=0, layers=2, tie=True):
    cfg = micro_model().model_copy(update={"num_layers": layers, "tie_embeddings": tie})
    return from_config(hf_config(cfg, V), seed=seed)


def _batch(seed=0, B=4, T=48, density=0.3):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, T)).astype(np.int32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    m = (rng.random((B, T)) < density).astype(np.float32)
    m[0, :] = 1.0  # one full row, like packed pretraining
    return x, y, m


def _value_and_grads(model, loss, batch):
    fn = nn.value_and_grad(model, loss)
    (total, n), grads = fn(model, *map(mx.array, loss.prepare(batch)))
    mx.eval(total, n, grads)
    return total.item(), n.item(), dict(tree_flatten(grads))


# float32 sums in a different order: relative agreement to 1e-5, gradients to 1e-5 absolute
# (their scale here is ~1e-1 .. 1e1, the sum of ~100 token gradients).
RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("loss", [Loss(chunk=40), Loss(sparse=True, pad_multiple=16),
                                  Loss(sparse=True, chunk=24, pad_multiple=8)], ids=["chunked", "sparse", "sparse+chunked"])
def test_loss_variants_match_the_dense_loss_and_gradients(loss, tie):
    batch = _batch()
    ref = _value_and_grads(_model(tie=tie), Loss(), batch)
    got = _value_and_grads(_model(tie=tie), loss, batch)
    assert got[1] == ref[1] == batch[2].sum()
    assert got[0] == pytest.approx(ref[0], rel=RTOL)
    assert set(got[2]) == set(ref[2])
    for k in ref[2]:
        np.testing.assert_allclose(np.array(got[2][k]), np.array(ref[2][k]), rtol=1e-4, atol=ATOL, err_msg=k)


def test_sparse_prepare_pads_label_positions_to_a_multiple_with_zero_weight():
    x, y, m = _batch(density=0.1)
    inputs, positions, targets, weights = Loss(sparse=True, pad_multiple=32).prepare((x, y, m))
    k = int(m.sum())
    assert len(positions) % 32 == 0 and len(positions) >= k
    assert weights.sum() == k and (weights[k:] == 0).all()
    np.testing.assert_array_equal(targets[:k], y.reshape(-1)[m.reshape(-1) > 0])


def test_chunked_loss_never_builds_the_full_logits():
    """Peak memory of a chunked step stays well under the size of the [B, T, V] float32 logits."""
    big_v = 16384
    cfg = micro_model()
    model = from_config(hf_config(cfg, big_v))
    rng = np.random.default_rng(0)
    B, T = 32, 256  # 8k tokens: 512 MB of float32 logits; short rows keep attention small
    batch = (rng.integers(0, big_v, (B, T)), rng.integers(0, big_v, (B, T)), np.ones((B, T), np.float32))
    logits_bytes = B * T * big_v * 4

    def peak(loss):
        fn = nn.value_and_grad(model, loss)
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(model, *map(mx.array, loss.prepare(batch))))
        return mx.get_peak_memory() - base

    dense, chunked = peak(Loss()), peak(Loss(chunk=128))
    assert dense > 2 * logits_bytes  # logits + their softmax for backward
    # measured: 2.2 GB vs 0.26 GB on the CPU, 2.1 GB vs 0.37 GB on an H200 (it runs further ahead)
    assert chunked < 0.25 * dense and chunked < logits_bytes, (dense, chunked)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(every):
    batch = _batch(density=1.0)
    ref = _value_and_grads(_model(layers=4), Loss(), batch)
    model = _model(layers=4)
    assert remat.checkpoint_layers(model, every) == -(-4 // every)
    got = _value_and_grads(model, Loss(), batch)
    assert got[0] == pytest.approx(ref[0], rel=RTOL)
    for k in ref[2]:
        np.testing.assert_allclose(np.array(got[2][k]), np.array(ref[2][k]), rtol=1e-4, atol=ATOL, err_msg=k)
    remat.remove(model)
    assert all(not hasattr(type(layer), "_remat_base") for layer in model.layers)
    assert _value_and_grads(model, Loss(), batch)[0] == pytest.approx(ref[0], rel=RTOL)


def test_grad_checkpointing_lowers_activation_memory():
    cfg = micro_model().model_copy(update={"num_layers": 8, "hidden_size": 256, "intermediate_size": 512})
    rng = np.random.default_rng(0)
    B, T = 8, 256
    batch = tuple(map(mx.array, (rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), np.ones((B, T), np.float32))))

    def peak(every):
        model = from_config(hf_config(cfg, V))
        remat.checkpoint_layers(model, every)
        fn = nn.value_and_grad(model, Loss(chunk=512))
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(model, *batch))
        return mx.get_peak_memory() - base

    plain, per_layer = peak(0), peak(1)
    assert per_layer < 0.6 * plain, (plain, per_layer)
