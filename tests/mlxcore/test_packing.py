"""SFT packing: best-fit decreasing packs, and a packed row trains exactly as the row alone.

Model-level checks on tiny mlx-lm llama / qwen3 models in float32, through the fused CPU kernel
(segment ids) and through the mask path (block-diagonal causal mask in
mx.fast.scaled_dot_product_attention, what Metal / CUDA / MLXFLOW_KERNELS=off run): per-row
losses equal the unpacked ones to 1e-5, gradients too, no row sees another, RoPE positions
restart per row; and the loader's packs (every row once, exact resume).
"""

from __future__ import annotations

import json
import shutil

import mlxcore  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore import kernels
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.data.loader import documents
from mlxcore.data.packing import PackedSFTBatches, best_fit_decreasing, collate_packs, open_packed
from mlxcore.kernels import patch
from mlxcore.models import remat, segments
from mlxcore.models.model import from_config, hf_config
from mlxcore.train import loop as train
from mlxcore.train.losses import Loss
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train, tiny_hf_config

VOCAB = 200
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _model(arch: str, seed: int = 0, **extra) -> nn.Module:
    config = hf_config(micro_model(), VOCAB) if arch == "llama" else tiny_hf_config(arch, VOCAB)
    model = from_config({**config, "torch_dtype": "float32", **extra}, seed=seed)
    mx.eval(model.parameters())
    use_fast_kernels(model)  # as a training step does: the packed and the unpacked rows run the same layers
    return model


def _rows(lengths, seed=0):
    """Random SFT rows: (tokens, loss mask), the mask 1 on a random tail."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        t = rng.integers(0, VOCAB, n).astype(np.int32)
        m = np.zeros(n, np.uint8)
        m[int(rng.integers(1, n)) if n > 1 else 0 :] = 1
        rows.append((t, m))
    return rows


ROWS = _rows([41, 12, 30, 7, 2, 19])  # 105 positions in a pack of 112: 7 of padding


def _pack(rows=ROWS, seq_len=112):
    return collate_packs([rows], seq_len, pad_id=0)


@pytest.fixture(params=["fused", "mask"])
def path(request, monkeypatch):
    """`fused`: the C++ kernel with segment ids (skips where it cannot be built); `mask`: plain MLX ops."""
    if request.param == "fused":
        if not kernels.available():
            pytest.skip(f"fused CPU kernels unavailable here: {kernels.status()}")
        calls = []
        real = kernels._ext

        class Spy:
            def __getattr__(self, name):
                fn = getattr(real(), name)
                if name != "attention":
                    return fn
                return lambda *a, **k: calls.append(len(a) > 5 and a[5] is not None) or fn(*a, **k)

        monkeypatch.setattr(kernels, "_ext", lambda: Spy())
        yield calls
        assert any(calls), "the fused kernel never ran with segment ids"
    else:
        monkeypatch.setattr(kernels, "_ext", lambda: None)
        yield None


def _row_ce(model, tokens, mask):
    """Per-token masked cross-entropy of one row computed alone: [n - 1]."""
    logits = model(mx.array(tokens[None, :-1]))
    return kernels.cross_entropy(logits, mx.array(tokens[None, 1:]))[0] * mx.array(mask[1:], dtype=mx.float32)


def _packed_logits(model, inputs, seg):
    patch.use_segments(model)
    with segments.packed(mx.array(seg)):
        return model(mx.array(inputs))


# -------------------------------------------------------------------- the model on a pack
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_rows_loss_equals_its_unpacked_loss(path, arch):
    model = _model(arch)
    inputs, targets, mask, seg = _pack()
    ce = kernels.cross_entropy(_packed_logits(model, inputs, seg), mx.array(targets)) * mx.array(mask)
    for r, (t, m) in enumerate(ROWS):
        mine = seg[0] == r + 1
        alone = _row_ce(model, t, m)
        np.testing.assert_allclose(np.array(ce[0])[mine], np.array(alone), **LOSS_TOL)
        if m[1:].sum():
            assert np.array(ce[0])[mine].sum() / m[1:].sum() == pytest.approx(
                alone.sum().item() / m[1:].sum(), rel=1e-5, abs=1e-5)
    # the training loss (dense and sparse) of the pack is the sum of the rows' own
    total = sum(_row_ce(model, t, m).sum().item() for t, m in ROWS)
    for loss in (Loss(), Loss(sparse=True, pad_multiple=16), Loss(chunk=40)):
        s, n = loss(model, *map(mx.array, loss.prepare((inputs, targets, mask, seg))))
        assert s.item() == pytest.approx(total, rel=1e-5) and n.item() == sum(m[1:].sum() for _, m in ROWS)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "remat"])
def test_gradients_equal_the_unpacked_rows(path, checkpointed):
    """d(pack loss)/d(weights) = sum over rows of d(row loss alone); with gradient checkpointing the
    recomputed layers run under the pack's segments too."""
    packed_model, plain_model = _model("llama", seed=1), _model("llama", seed=1)
    if checkpointed:
        remat.checkpoint_layers(packed_model, 1)
    batch = tuple(map(mx.array, Loss().prepare(_pack())))
    loss = Loss()
    _, g_packed = nn.value_and_grad(packed_model, lambda m, *a: loss(m, *a)[0])(packed_model, *batch)

    def rows_alone(m):
        return sum(_row_ce(m, t, mk).sum() for t, mk in ROWS)

    _, g_rows = nn.value_and_grad(plain_model, rows_alone)(plain_model)
    flat_p, flat_r = dict(tree_flatten(g_packed)), dict(tree_flatten(g_rows))
    assert flat_p.keys() == flat_r.keys()
    for k in flat_p:
        np.testing.assert_allclose(np.array(flat_p[k]), np.array(flat_r[k]), **GRAD_TOL, err_msg=k)


def test_changing_one_row_leaves_the_others_untouched(path):
    model = _model("qwen3")
    inputs, _, _, seg = _pack()
    other = inputs.copy()
    a_rows = seg[0] == 1
    other[0, a_rows] = (other[0, a_rows] + 17) % VOCAB  # a different row A, same length
    before, after = np.array(_packed_logits(model, inputs, seg)), np.array(_packed_logits(model, other, seg))
    assert np.array_equal(before[0, ~a_rows], after[0, ~a_rows])
    assert not np.allclose(before[0, a_rows], after[0, a_rows])


def test_positions_restart_at_zero_in_every_row():
    seg = mx.array([[1, 1, 1, 2, 2, 3, 0, 0], [7, 7, 7, 7, 7, 7, 7, 7]])
    assert segments.positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    model = _model("llama")
    patch.use_segments(model)
    rope = model.model.layers[0].self_attn.rope
    x = mx.random.normal((1, 4, 8, 16), key=mx.random.key(2))
    with segments.packed(seg[:1]):
        packed = rope(x)
    for lo, hi in ((0, 3), (3, 5), (5, 6), (6, 8)):  # each run rotated as positions 0, 1, ... alone
        assert np.array_equal(np.array(packed[:, :, lo:hi]), np.array(rope(x[:, :, lo:hi])))
    assert np.array_equal(np.array(rope(x)), np.array(type(rope)._packed_base.__call__(rope, x)))  # no context


def test_packing_refuses_what_it_cannot_keep_exact():
    from mlx_lm.models.cache import make_prompt_cache

    model = _model("llama")
    patch.use_segments(model)
    inputs, *_, seg = _pack()
    with segments.packed(mx.array(seg)), pytest.raises(ValueError, match="KV cache"):
        model(mx.array(inputs), cache=make_prompt_cache(model))
    dynamic = _model("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="depend on the sequence length"):
        segments.enable(dynamic)
    with pytest.raises(ValueError, match="no attention rope"):
        segments.enable(nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------------------------------- the packs
def test_best_fit_decreasing_is_deterministic_and_tight():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1, 0], 8) == [[0, 2], [1, 3, 5], [4]]
    sizes = np.random.default_rng(0).integers(0, 100, 500)
    bins = best_fit_decreasing(sizes, 128)
    assert bins == best_fit_decreasing(sizes, 128)
    assert sorted(i for b in bins for i in b) == [i for i in range(500) if sizes[i] > 0]
    assert max(sizes[b].sum() for b in bins) <= 128
    assert len(bins) <= int(np.ceil(sizes.sum() / 128 * 1.05)) + 1  # within a few % of the bound
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([3, 9], 8)


def _unpack(batch):
    """The (tokens, loss mask) rows of a packed batch, rebuilt from inputs + last target."""
    inputs, targets, mask, seg = batch
    rows = []
    for p in range(len(inputs)):
        for r in np.unique(seg[p][seg[p] > 0]):
            at = np.flatnonzero(seg[p] == r)
            assert np.array_equal(inputs[p, at[1:]], targets[p, at[:-1]])  # each row's own next tokens
            tokens = np.concatenate([inputs[p, at], targets[p, at[-1:]]])
            rows.append((tuple(tokens), tuple(mask[p, at])))
        assert (mask[p][seg[p] == 0] == 0).all() and (inputs[p][seg[p] == 0] == 0).all()
    return rows


def test_an_epoch_packs_every_row_once(small_data):
    b = PackedSFTBatches(small_data["sft"], "train", 4, 64, seed=3, pad_id=0)
    cursor, got = {"epoch": 0, "index": 0}, []
    for _ in range(b.batches_per_epoch):
        batch, cursor = b.next(cursor)
        assert [a.shape for a in batch] == [(4, 64)] * 4
        got += _unpack(batch)
    used = {int(r) for p in b._order(0)[: b.batches_per_epoch * 4] for r in b.pack_rows(int(p))}
    docs = [(tuple(t[:65].astype(np.int64)), tuple(m[1:65].astype(np.float32))) for t, m in documents(small_data["sft"], "train")]
    assert sorted(got) == sorted(docs[i] for i in used)
    assert b.num_rows == len(docs) and b.fill > 0.85
    assert b.next({"epoch": 1, "index": 2})[0][0].tolist() == b.next({"epoch": 1, "index": 2})[0][0].tolist()
    assert b.next({"epoch": 1, "index": 0})[0][0].tolist() != b.next({"epoch": 0, "index": 0})[0][0].tolist()


def test_ranks_split_each_global_batch_and_pretraining_data_is_refused(small_data):
    one = PackedSFTBatches(small_data["sft"], "train", 4, 64, seed=1)
    r0 = PackedSFTBatches(small_data["sft"], "train", 2, 64, seed=1, rank=0, world=2)
    r1 = PackedSFTBatches(small_data["sft"], "train", 2, 64, seed=1, rank=1, world=2)
    cur = {"epoch": 0, "index": 3}
    assert np.array_equal(one.next(cur)[0][0], np.concatenate([r0.next(cur)[0][0], r1.next(cur)[0][0]]))
    with pytest.raises(ValueError, match="already packed"):
        open_packed(small_data["pretrain"], "train", 4, 64)


# ------------------------------------------------------------------------- training
def test_packed_sft_learns_and_resumes_exactly(small_data, tmp_path):
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "run"),
                   model=micro_model(), train=quick_train(steps=10, save_every=5, eval_every=5, batch_size=4, pack=True))
    first = train.run(job, None)
    assert first["val_loss"] < first["initial_val_loss"]
    final = (tmp_path / "run/model/model.safetensors").read_bytes()
    state = json.loads((tmp_path / "run/checkpoints/step-00000005/trainer_state.json").read_text())
    per_epoch = PackedSFTBatches(small_data["sft"], "train", 4, 64).batches_per_epoch
    assert state["cursor"]["epoch"] * per_epoch + state["cursor"]["index"] == 5  # the cursor counts packs
    # a crash after the step-5 checkpoint: the final model and the later checkpoint never got written
    shutil.rmtree(tmp_path / "run/model")
    shutil.rmtree(tmp_path / "run/checkpoints/step-00000010")
    again = train.run(job, None)
    assert again["resumed_from"].endswith("step-00000005")
    assert (tmp_path / "run/model/model.safetensors").read_bytes() == final
    assert again["val_loss"] == first["val_loss"]


def test_pack_is_off_by_default_and_refused_for_pretraining(small_data, tmp_path):
    assert quick_train().pack is False
    job = TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path),
                   model=micro_model(), train=quick_train(pack=True))
    with pytest.raises(ValueError, match="pack applies to SFT data"):
        train.run(job, None)


def test_pack_auto_packs_what_it_can_and_falls_back_to_rows(small_data, tmp_path, capfd):
    from mlxcore.config import ModelConfig
    from mlxcore.io import read_manifest

    sft = read_manifest(small_data["sft"], "tokens")
    assert train._can_pack(_model("llama"), sft)
    retention = from_config(hf_config(ModelConfig(preset="custom", arch="retention", hidden_size=64, num_layers=1, num_heads=2,
                                                  num_kv_heads=2, intermediate_size=128, retention_chunk=32), VOCAB))
    for model, data, why in [(retention, sft, "mlxcore.models.retention is not one of them"),
                             (_model("llama"), {**sft, "mixture": {}}, "a weighted mixture"),
                             (_model("llama"), read_manifest(small_data["pretrain"], "tokens"), "already packed")]:
        assert not train._can_pack(model, data)
        assert why in capfd.readouterr().err
    # a run with auto: the packed run's batches and weights, and its state records what auto chose
    for pack in ("auto", True):
        job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / str(pack)),
                       model=micro_model(), train=quick_train(steps=3, batch_size=4, pack=pack))
        train.run(job, None)
    assert (tmp_path / "auto/model/model.safetensors").read_bytes() == (tmp_path / "True/model/model.safetensors").read_bytes()
    assert "pack: auto -> packs" in capfd.readouterr().err
    state = json.loads((tmp_path / "auto/model/trainer_state.json").read_text())
    assert state["train_config"]["pack"] is True
    # on the pretraining data auto trains rows where pack: true is refused
    job = TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "pre"),
                   model=micro_model(), train=quick_train(steps=2, pack="auto"))
    assert train.run(job, None)["step"] == 2
