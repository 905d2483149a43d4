"""Mixtures of experts (qwen3_moe): checkpoints that transformers and mlx-lm read with the same logits,
the routers' load-balancing loss and statistics in training, LoRA on the experts, config errors."""

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.config import ConfigError, LoRAConfig, ModelConfig, load_config
from mlxcore.models import adapters, checkpoint, moe
from mlxcore.models.model import from_config, hf_config, num_params
from mlxcore.train import loop as train
from mlxcore.train.losses import Loss
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train

E, K = 4, 2
X = mx.array([[1, 5, 9, 200, 17, 3, 42, 7, 11, 300, 64, 2]])


def micro_moe(**overrides) -> ModelConfig:
    """micro_model's attention with 4 experts of 32 (top-2) in both layers."""
    return ModelConfig(**(micro_model().model_dump() | dict(num_experts=E, num_experts_per_tok=K,
                                                            moe_intermediate_size=32) | overrides))


def _job(small_data, out, kind="pretrain", model=None, **overrides):
    return TrainJob(data_dir=str(small_data[kind]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                    model=model or micro_moe(), train=quick_train(**overrides))


class Recorder:
    def __init__(self):
        self.events = []

    def on_event(self, event, info):
        self.events.append((event, info))


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """A tiny MoE pretrained for 40 steps, and its events."""
    rec = Recorder()
    result = train.run(_job(small_data, tmp_path_factory.mktemp("moe") / "run", steps=40, save_every=20), rec)
    return result, rec.events


def _batch(small_data, rows=4, seq=32):
    from mlxcore.data.loader import open_batches

    batches = open_batches(small_data["pretrain"], "val", rows, seq, shuffle=False)
    inputs, targets, mask = batches.take(1)[0]
    mask = np.array(mask, dtype=np.float32)
    mask[1, seq // 2:] = 0  # a row whose second half does not count
    return mx.array(inputs), mx.array(targets), mx.array(mask)


# ------------------------------------------------------------------ checkpoints: transformers and mlx-lm


def test_checkpoint_is_hf_layout_and_transformers_gives_the_same_logits(pretrained):
    import torch
    import transformers

    path = pretrained[0]["checkpoint"]
    path_ = Path(path)
    config = json.loads((path_ / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (E, K, 32)
    keys = set(mx.load(str(path_ / "model.safetensors")))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys and not any("switch_mlp" in k for k in keys)

    ours, _ = checkpoint.load(path)
    want = np.array(ours(X))
    restacked = moe.from_hf_layout(mx.load(str(path_ / "model.safetensors")))
    assert restacked.keys() == dict(tree_flatten(ours.parameters())).keys()
    for k, v in tree_flatten(ours.parameters()):
        assert mx.array_equal(restacked[k], v), k
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    with torch.no_grad():
        got = hf(torch.tensor(np.array(X))).logits.numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"transformers parity: max|dlogit|/max|logit| = {rel:.2e}")
    assert rel <= 1e-3

    loaded, _ = mlx_lm.load(path)
    np.testing.assert_array_equal(np.array(loaded(X)), want)
    assert num_params(loaded) == micro_moe().num_params(config["vocab_size"])


def test_resume_restacks_the_experts_bit_for_bit(small_data, pretrained, tmp_path):
    """A checkpoint written mid-run (HF layout) resumes into the same weights as the uninterrupted run."""
    result, _ = pretrained
    run = Path(result["checkpoint"]).parent
    mid = checkpoint.step_dir(run / "checkpoints", 20)  # kept: keep_last=2 of steps 20, 40
    assert any(".experts.0." in k for k in mx.load(str(mid / "model.safetensors")))
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, out / "checkpoints" / mid.name)
    resumed = train.run(_job(small_data, out, steps=40, save_every=20), None)
    assert resumed["resumed_from"]
    if mx.default_device() == mx.cpu:
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert (run / "model" / name).read_bytes() == (out / "model" / name).read_bytes(), name
        assert resumed["val_loss"] == result["val_loss"]


# ------------------------------------------------------------------ the routers' loss and statistics


def _numpy_stats(logits: list[np.ndarray], weights: np.ndarray, k: int) -> dict:
    """transformers' load_balancing_loss_func (all layers' tokens together), in numpy."""
    p = np.concatenate([np.exp(l - l.max(-1, keepdims=True)) / np.exp(l - l.max(-1, keepdims=True)).sum(-1, keepdims=True)
                        for l in (x.reshape(-1, x.shape[-1]).astype(np.float64) for x in logits)])
    w = np.concatenate([weights.reshape(-1)] * len(logits))[:, None] > 0
    top = np.argsort(-p, axis=-1)[:, :k]
    chosen = np.zeros_like(p)
    np.put_along_axis(chosen, top, 1.0, axis=-1)
    f = (chosen * w).sum(0) / w.sum()
    P = (p * w).sum(0) / w.sum()
    entropy = (-(p * np.log(p)).sum(-1, keepdims=True) * w).sum() / w.sum()
    return {"router_aux_loss": p.shape[-1] * (f * P).sum(), "usage": f / f.sum(), "router_entropy": entropy}


def test_aux_loss_matches_numpy_and_transformers(small_data, pretrained):
    import torch
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model, _ = checkpoint.load(pretrained[0]["checkpoint"])
    inputs, targets, mask = _batch(small_data)
    assert moe.attach(model) == 2
    with moe.recording() as record:
        model(inputs)
    assert [r[0].shape for r in record] == [(4, 32, E)] * 2 and [r[1] for r in record] == [K, K]
    stats = moe.router_stats(record, mask)
    want = _numpy_stats([np.array(r[0]) for r in record], np.array(mask), K)
    assert stats["router_aux_loss"].item() == pytest.approx(want["router_aux_loss"], rel=1e-5)
    assert stats["router_entropy"].item() == pytest.approx(want["router_entropy"], rel=1e-5)
    usage = np.array([stats[f"expert_usage_{e}"].item() for e in range(E)])
    np.testing.assert_allclose(usage, want["usage"], atol=1e-6)
    assert stats["expert_usage_max"].item() == pytest.approx(usage.max())
    assert stats["expert_usage_cv"].item() == pytest.approx(usage.std() / usage.mean(), rel=1e-5)

    # transformers computes its own router logits from the same checkpoint (trailing padding: the
    # counted positions see the same context)
    hf = transformers.AutoModelForCausalLM.from_pretrained(pretrained[0]["checkpoint"], dtype=torch.float32)
    m = np.array(mask).copy()
    m[1] = 1.0
    m[1, 16:] = 0.0
    with torch.no_grad():
        out = hf(torch.tensor(np.array(inputs)), output_router_logits=True)
    theirs = load_balancing_loss_func(out.router_logits, E, K, torch.tensor(m)).item()
    assert moe.router_stats(record, mx.array(m))["router_aux_loss"].item() == pytest.approx(theirs, rel=1e-4)


def test_coef_zero_is_plain_cross_entropy_and_the_router_gets_the_aux_gradient(small_data):
    model = from_config(hf_config(micro_moe(), 512), seed=1)
    arrays = _batch(small_data)
    ce = Loss()

    def grads(objective):
        value, g = nn.value_and_grad(model, objective)(model, *arrays)
        mx.eval(value, g)
        return value, dict(tree_flatten(g))

    (ce_sum, n), g_ce = grads(ce)
    (sum0, n0, aux0), g0 = grads(moe.router_loss(ce, 0.0))
    (sum1, n1, aux1), g1 = grads(moe.router_loss(ce, 0.5))
    assert sum0.item() == ce_sum.item() and n0.item() == n.item()
    aux = aux1["router_aux_loss"].item() / n.item()  # reported as a sum: x tokens
    assert aux >= K - 1e-4  # its minimum, K, is a perfectly uniform router
    assert sum1.item() == pytest.approx(ce_sum.item() + 0.5 * n.item() * aux, rel=1e-6)
    router = "model.layers.0.mlp.gate.weight"
    np.testing.assert_array_equal(np.array(g0[router]), np.array(g_ce[router]))
    assert np.abs(np.array(g_ce[router])).max() > 0  # CE alone reaches the router (through the top-k weights)
    assert np.abs(np.array(g1[router]) - np.array(g_ce[router])).max() > 1e-6  # and so does the aux loss
    # the last layer's experts feed no router: their gradient is the cross-entropy's alone
    expert = "model.layers.1.mlp.switch_mlp.up_proj.weight"
    np.testing.assert_allclose(np.array(g1[expert]), np.array(g_ce[expert]), rtol=1e-5, atol=1e-7)


def test_training_lowers_held_out_loss_and_reports_expert_usage(small_data, pretrained, tmp_path):
    result, events = pretrained
    print(f"moe pretrain: val loss {result['initial_val_loss']:.3f} -> {result['val_loss']:.3f}")
    assert result["val_loss"] < 0.6 * result["initial_val_loss"]
    control = train.run(_job(small_data, tmp_path / "control", steps=10, lr=0.0, eval_every=0, save_every=0), None)
    print(f"moe control (lr 0): {control['initial_val_loss']:.3f} -> {control['val_loss']:.3f}")
    assert control["val_loss"] == pytest.approx(control["initial_val_loss"], rel=1e-6)

    logs = [i for e, i in events if e == "train"]
    assert len(logs) == 8
    for info in logs:
        usage = [info[f"expert_usage_{e}"] for e in range(E)]
        assert sum(usage) == pytest.approx(1.0, abs=1e-5) and min(usage) >= 0
        # window means: the mean of each step's max is at least the max of the mean usages
        assert info["expert_usage_max"] >= max(usage) - 1e-6 and info["expert_usage_min"] <= min(usage) + 1e-6
        assert info["expert_usage_cv"] >= 0
        assert 0 < info["router_entropy"] <= math.log(E) + 1e-6
        assert info["router_aux_loss"] >= K - 1e-4
    state = json.loads((Path(result["checkpoint"]) / "trainer_state.json").read_text())
    assert any("expert_usage_0" in h for h in state["history"])  # kept with the checkpoint's history


def test_grad_checkpointing_is_refused_clearly(small_data, tmp_path):
    with pytest.raises(ValueError, match="train.grad_checkpoint"):
        train.run(_job(small_data, tmp_path / "r", steps=2, grad_checkpoint=1, eval_every=0), None)


# ------------------------------------------------------------------ LoRA on the experts


def test_lora_on_experts_trains_fuses_and_loads_in_mlx_lm(small_data, pretrained, tmp_path):
    base = pretrained[0]["checkpoint"]
    lora = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "mlp.gate_proj", "up_proj", "down_proj"])
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "run"),
                   init_from=base, train=quick_train(steps=20, lr=2e-3, fine_tune_type="lora", lora=lora,
                                                      eval_every=0, save_every=0))
    result = train.run(job)
    assert result["val_loss"] < result["initial_val_loss"] - 0.1, result
    acfg = json.loads((tmp_path / "run/model/adapter_config.json").read_text())
    assert set(acfg["lora_parameters"]["keys"]) == {"self_attn.q_proj", "self_attn.v_proj", "mlp.switch_mlp.gate_proj",
                                                    "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"}
    saved = mx.load(str(tmp_path / "run/model/adapters.safetensors"))
    b = saved["model.layers.1.mlp.switch_mlp.down_proj.lora_b"]
    assert b.shape[0] == E and np.abs(np.array(b)).max() > 0  # every expert's adapter, trained (B starts at 0)
    # 2 layers x (q, v: 4 x (64+64), 4 x (64+32); experts: 4 x 4 x (64+32) x 3)
    assert result["trainable_params"] == 2 * (4 * 128 + 4 * 96 + 3 * E * 4 * 96)

    adapted, _ = checkpoint.load(tmp_path / "run/model")
    fused_dir = checkpoint.fuse(tmp_path / "run/model", tmp_path / "fused")
    fused, _ = checkpoint.load(fused_dir)
    a, f = np.array(adapted(X)), np.array(fused(X))
    assert np.abs(f - a).max() <= 1e-5 * np.abs(a).max()
    assert not np.allclose(a, np.array(checkpoint.load(base)[0](X)), atol=1e-3)  # the adapters did something
    assert any(k.endswith("mlp.experts.0.gate_proj.weight") for k in mx.load(str(fused_dir / "model.safetensors")))
    theirs, _ = mlx_lm.load(str(base), adapter_path=str(tmp_path / "run/model"))
    np.testing.assert_allclose(np.array(theirs(X)), a, atol=1e-5)


def test_dora_on_experts_is_a_clear_error(small_data, pretrained, tmp_path):
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "run"),
                   init_from=pretrained[0]["checkpoint"], train=quick_train(steps=2, fine_tune_type="dora"))
    with pytest.raises(ValueError, match=r"train.fine_tune_type dora.*mlp.switch_mlp.gate_proj.*lora.target_modules"):
        train.run(job)
    model, _ = checkpoint.load(pretrained[0]["checkpoint"])  # attention only: DoRA applies
    cfg = quick_train(fine_tune_type="dora", lora=LoRAConfig(target_modules=["q_proj", "o_proj"]))
    assert adapters.prepare(model, cfg)["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.o_proj"]


# ------------------------------------------------------------------ presets and config errors


def test_moe_presets_and_their_sizes():
    tiny, moe_tiny = ModelConfig(preset="tiny"), ModelConfig(preset="tiny-moe")
    assert (moe_tiny.hidden_size, moe_tiny.num_layers, moe_tiny.num_heads, moe_tiny.num_kv_heads) == (256, 4, 4, 2)
    assert (moe_tiny.num_experts, moe_tiny.resolved_experts_per_tok) == (8, 2)
    assert abs(moe_tiny.num_active_params(6400) - tiny.num_params(6400)) < 0.01 * tiny.num_params(6400)
    big = ModelConfig(preset="200mb-moe")
    assert 90e6 < big.num_params(6400) < 110e6 and big.num_active_params(6400) < 0.5 * big.num_params(6400)
    config = hf_config(moe_tiny, 6400)
    assert num_params(from_config(config)) == moe_tiny.num_params(6400)
    cfg = load_config(None, ["model.preset=tiny-moe", "model.num_experts=4", "model.router_aux_loss_coef=0"])
    assert (cfg.model.num_experts, cfg.model.moe_intermediate_size, cfg.model.router_aux_loss_coef) == (4, 352, 0)
    assert hf_config(cfg.model, 512)["router_aux_loss_coef"] == 0


@pytest.mark.parametrize("overrides, match", [
    (["model.preset=tiny-moe", "model.num_experts_per_tok=9"],
     r"model.num_experts_per_tok=9: model: .*num_experts_per_tok=9 exceeds num_experts=8"),
    (["model.preset=tiny-moe", "model.num_experts=0"], r"model.num_experts=0: model: .*num_experts=0 with preset 'tiny-moe'"),
    (["model.moe_intermediate_size=64"], r"model.moe_intermediate_size=64: model: .*needs num_experts >= 1"),
    (["model.num_experts=-1"], r"model.num_experts=-1: model.num_experts: .*greater than or equal to 0"),
    (["model.preset=tiny-moe", "model.num_experts_per_tok=0"], r"model.num_experts_per_tok=0: model.num_experts_per_tok"),
])
def test_bad_moe_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
