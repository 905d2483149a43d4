"""Optimizers and parameter dtypes: each one trains; AdamW state dtype; per-phase profiling."""

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.train import loop as train, optimizers
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train


def _run(small_data, out, model=None, **overrides):
    job = TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                   model=model or micro_model(), train=quick_train(**{"steps": 30, "eval_every": 30, "save_every": 0, **overrides}))
    return train.run(job)


@pytest.mark.parametrize("name, lr", [("adamw", 3e-3), ("adafactor", 3e-3), ("lion", 1e-3), ("muon", 3e-3)])
def test_each_optimizer_reduces_the_held_out_loss(small_data, tmp_path, name, lr):
    result = _run(small_data, tmp_path / name, optimizer=name, lr=lr)
    assert result["val_loss"] < 0.8 * result["initial_val_loss"], result


def test_optimizer_state_resumes_for_every_optimizer(small_data, tmp_path):
    for name in ("adafactor", "lion", "muon"):
        _run(small_data, tmp_path / name, optimizer=name, steps=10, save_every=5)
        state = mx.load(str(tmp_path / name / "model/optimizer.safetensors"))
        assert state, name
        opt = optimizers.build(quick_train(optimizer=name, steps=10))
        from mlx.utils import tree_unflatten
        opt.state = tree_unflatten(list(state.items()))  # the saved layout loads back


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    assert optimizers.is_muon_param("model.layers.0.self_attn.q_proj.weight", mx.zeros((4, 4)))
    assert not optimizers.is_muon_param("model.embed_tokens.weight", mx.zeros((4, 4)))
    assert not optimizers.is_muon_param("lm_head.weight", mx.zeros((4, 4)))
    assert not optimizers.is_muon_param("model.layers.0.input_layernorm.weight", mx.zeros((4,)))


def test_adamw_state_dtype_for_bfloat16_parameters(small_data, tmp_path):
    bf16 = micro_model().model_copy(update={"dtype": "bfloat16"})
    for state_dtype, expected in (("float32", mx.float32), ("param", mx.bfloat16)):
        result = _run(small_data, tmp_path / state_dtype, model=bf16, optimizer_state_dtype=state_dtype, steps=20)
        assert result["val_loss"] < 0.8 * result["initial_val_loss"]
        state = mx.load(str(tmp_path / state_dtype / "model/optimizer.safetensors"))
        weights = mx.load(str(tmp_path / state_dtype / "model/model.safetensors"))
        assert {v.dtype for k, v in state.items() if k.endswith((".m", ".v"))} == {expected}
        assert {v.dtype for v in weights.values()} == {mx.bfloat16}


@pytest.mark.gpu
def test_float32_state_adamw_equals_mlx_adamw_on_float32_params():
    params = {"w": mx.random.normal((8, 8))}
    grads = {"w": mx.random.normal((8, 8))}
    a = optimizers.AdamWFloat32State(1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    b = optim.AdamW(1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    pa, pb = params, params
    for _ in range(3):
        pa, pb = a.apply_gradients(grads, pa), b.apply_gradients(grads, pb)
    np.testing.assert_array_equal(np.array(pa["w"]), np.array(pb["w"]))


def test_float16_parameters_train(small_data, tmp_path):
    fp16 = micro_model().model_copy(update={"dtype": "float16"})
    result = _run(small_data, tmp_path / "fp16", model=fp16, steps=20)
    assert result["val_loss"] < 0.8 * result["initial_val_loss"]


@pytest.mark.gpu
def test_profile_timing_reports_phases_and_trains_the_same(small_data, tmp_path):
    plain = _run(small_data, tmp_path / "plain", steps=10, log_every=5)
    profiled = _run(small_data, tmp_path / "prof", steps=10, log_every=5, profile_timing=True)
    state = json.loads((tmp_path / "prof/model/trainer_state.json").read_text())
    logs = [h for h in state["history"] if h["event"] == "train"]
    assert [h["step"] for h in logs] == [5, 10]
    prev_step, prev_elapsed = 0, 0.0
    for h in logs:
        phases = ("ms_data", "ms_fwd_bwd", "ms_clip", "ms_optimizer")
        assert set(phases) <= set(h) and all(h[k] > 0 for k in phases)
        # the phases are timed one after another inside each step: per step, they add up to no
        # more than the step's own wall time (no order between them: that depends on the machine)
        window_ms = 1e3 * (h["elapsed_s"] - prev_elapsed)
        assert sum(h[k] for k in phases) * (h["step"] - prev_step) <= window_ms * (1 + 1e-9)
        prev_step, prev_elapsed = h["step"], h["elapsed_s"]
    plain_logs = json.loads((tmp_path / "plain/model/trainer_state.json").read_text())["history"]
    assert not any("ms_fwd_bwd" in h for h in plain_logs)
    # same arithmetic, evaluated in pieces: same weights up to float32 rounding
    a = mx.load(str(tmp_path / "plain/model/model.safetensors"))
    b = mx.load(str(tmp_path / "prof/model/model.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=2e-5, err_msg=k)
    assert profiled["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)


def test_lr_schedule_has_a_floor():
    lr = optimizers.lr_schedule(quick_train(steps=50, lr=1e-3, warmup_steps=5, min_lr_ratio=0.2))
    values = [lr(mx.array(s)).item() for s in range(0, 60)]
    assert max(values) == pytest.approx(1e-3) and min(values[5:]) == pytest.approx(2e-4)


def test_memory_knobs_train_to_the_same_weights(small_data, tmp_path):
    """grad_checkpoint, chunked and sparse loss inside the real (compiled) trainer on SFT data."""
    def sft(out, **kw):
        job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                       model=micro_model(), train=quick_train(steps=5, eval_every=0, save_every=0, **kw))
        train.run(job)
        return dict(tree_flatten(mx.load(str(out / "model/model.safetensors"))))

    ref = sft(tmp_path / "ref")
    for name, kw in {"remat": dict(grad_checkpoint=1), "chunked": dict(loss_chunk=100),
                     "sparse": dict(sparse_loss=True, pad_multiple=16)}.items():
        got = sft(tmp_path / name, **kw)
        for k in ref:
            np.testing.assert_allclose(np.array(got[k]), np.array(ref[k]), atol=5e-5, err_msg=f"{name}: {k}")
