"""`mlxflow speed` and `mlxflow stats`: what they measure and report, OOM as a status, QLoRA memory."""

import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.perf import stats
from mlxcore.config import ModelConfig
from mlxcore.models.model import from_config, hf_config
from mlxcore.perf.speed import SpeedConfig, measure, run_point, sweep
from mlxcore.train import optimizers
from mlxcore.train.step import Stepper
from tests.conftest import micro_model

MICRO = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _cfg(**kw):
    return SpeedConfig(**{"preset": "custom", "model": MICRO, "vocab_size": 512, "batch_size": 2, "seq_len": 32,
                          "steps": 2, "warmup": 1, **kw})


def test_flops_per_token_follows_the_stated_formula():
    config = hf_config(ModelConfig(preset="tiny"), 6400)  # hidden 256, 4 layers, 4 heads x 64, 2 kv, SwiGLU 704
    h, L, d, i, V, T = 256, 4, 64, 704, 6400, 256
    n = L * (h * d * (2 * 4 + 2 * 2) + 3 * h * i) + V * h
    f = stats.flops_per_token(config, T)
    assert f["matmul_params"] == n
    assert f["forward"] == 2 * n + 4 * L * T * 4 * d
    assert f["train"] == 3 * f["forward"]
    assert stats.flops_per_token(config, T, adapters=True)["train"] == 2 * f["forward"]


def test_mfu_against_a_given_peak():
    config = hf_config(ModelConfig(preset="tiny"), 6400)
    peak = {"flops": 1e12, "source": "given", "device": "x"}
    info = stats.report(config, 256, tok_per_s=1000.0, peak=peak)
    assert info["mfu"] == pytest.approx(1000.0 * info["flops_per_token_train"] / 1e12)


def test_measured_peak_is_a_positive_rate():
    # how fast is the machine's business (and its load's): only that a finite rate comes back
    assert 0 < stats.measured_matmul_flops(n=256, seconds=0.05) < math.inf


def test_speed_reports_time_throughput_memory_mfu_and_decode():
    r = measure(_cfg(decode_tokens=8, prefill=64, profile_timing=True))
    assert r["status"] == "ok" and r["step_ms"] > 0
    assert r["tok_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
    assert r["peak_mib"] >= r["active_mib"] > 0
    # MFU is achieved / peak FLOP/s: both measured here, so only the arithmetic is certain
    assert r["mfu"] > 0 and r["mfu"] == pytest.approx(r["tok_per_s"] * r["flops_per_token"] / (r["peak_tflops"] * 1e12))
    assert r["decode_tok_per_s"] > 0 and r["prefill_tok_per_s"] > 0
    assert {"ms_fwd_bwd", "ms_clip", "ms_optimizer"} <= set(r)


@pytest.mark.slow
def test_speed_with_sft_like_masks_and_memory_knobs():
    for kw in (dict(mask_density=0.25, sparse_loss=True), dict(loss_chunk=16, grad_checkpoint=1),
               dict(fine_tune_type="lora", quantize_bits=4, group_size=32), dict(optimizer="adafactor")):
        r = measure(_cfg(**kw))
        assert r["status"] == "ok" and r["loss"] > 0, kw


@pytest.mark.slow
def test_qlora_4bit_needs_a_fraction_of_full_fine_tuning_memory():
    shape = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1536)
    base = dict(model=shape, batch_size=1, seq_len=64, steps=1, warmup=1)
    # each in a fresh process, as `mlxflow speed` measures: memory of earlier graphs does not count
    full = run_point(_cfg(**base))
    qlora = run_point(_cfg(**base, fine_tune_type="lora", quantize_bits=4))
    # full: weights + grads + AdamW moments (16 bytes/param); QLoRA: 4-bit base + small adapters
    # resident, plus (on the CPU) a layer's weights dequantized for a moment
    assert qlora["active_mib"] < 0.1 * full["active_mib"], (qlora["active_mib"], full["active_mib"])
    assert qlora["peak_mib"] < 0.3 * full["peak_mib"], (qlora["peak_mib"], full["peak_mib"])
    assert qlora["trainable_params"] < 0.05 * full["trainable_params"]


@pytest.mark.slow
def test_sweep_reports_out_of_memory_as_a_status_and_keeps_going():
    rows = sweep(_cfg(steps=1, warmup=0), [1, 4096], max_memory_gb=1.5)
    assert [r["status"] for r in rows] == ["ok", "OOM"]
    assert rows[0]["tok_per_s"] > 0 and "limit 1.5 GB" in rows[1]["detail"]


def test_a_failing_point_is_an_error_not_a_crash():
    r = run_point(_cfg(model_dir="/nonexistent/model"))
    assert r["status"] == "error" and "nonexistent" in r["detail"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_speed_and_stats_cli(tmp_path):
    out = _cli("speed", "--preset", "custom", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in MICRO.items()), []),
               "--vocab-size", "512", "--batch-size", "1,2", "--seq-len", "32", "--steps", "1", "--warmup", "1",
               "--json", str(tmp_path / "rows.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    assert "tok/s" in out.stdout and "peak MiB" in out.stdout
    out = _cli("stats", "--preset", "tiny", "--seq-len", "256", "--tok-per-s", "1000", "--peak-tflops", "1")
    assert out.returncode == 0, out.stderr
    assert "FLOPs/token train" in out.stdout and "MFU" in out.stdout
    bad = _cli("fuse", "--adapter", str(tmp_path), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not an adapter dir" in bad.stderr


@pytest.mark.parametrize("fused", ["on", "off"])
def test_update_cost_trains_like_plain_steps_and_keeps_the_flat_buffers(fused):
    """`Stepper.update_cost` interleaves whole steps with forward + backward alone: the whole steps
    train exactly as plain steps do (the forward + backward runs leave no trace), and the fused
    path's flat buffers are never rebuilt in between."""
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 512, (2, 16)), rng.integers(0, 512, (2, 16)), np.ones((2, 16), np.float32))
               for _ in range(3)]

    drops = []

    def run(measured: bool):
        model = from_config(hf_config(micro_model(), 512), seed=0)
        opt = optimizers.AdamWFloat32State(1e-2, weight_decay=0.1)
        stepper = Stepper(model, opt, grad_clip=0.5, fused=fused)
        check, kept = stepper.resident.check, stepper.resident.buffers

        def counted():  # a check that drops kept buffers is counted
            had = bool(kept)
            check()
            drops.append(had and not kept)

        stepper.resident.check = counted
        for b in batches[:2]:
            mx.eval(stepper.state, stepper([b]))
        if measured:
            cost = stepper.update_cost(batches[2], 3)
            assert cost["clip_optimizer"] == pytest.approx(cost["whole"] - cost["fwd_bwd"])
            assert cost["whole"] > 0 and cost["fwd_bwd"] > 0
        else:
            for _ in range(3):
                mx.eval(stepper.state, stepper([batches[2]]))
        return {k: np.array(v) for k, v in tree_flatten([model.parameters(), opt.state])}

    measured = run(True)
    assert not any(drops) and (bool(drops) == (fused == "on"))  # "on" keeps flat buffers on the CPU
    plain = run(False)
    assert measured.keys() == plain.keys()
    for k in plain:
        np.testing.assert_array_equal(measured[k], plain[k], err_msg=k)
