"""The PyTorch reference in bench/ computes what mlxcore computes, so the benchmark is fair.

Same weights give the same logits; one training step from the same weights on the same batch
gives the same new weights (mlxcore's compiled `make_step` vs `torch_llama.make_train_step`);
and `bench/train_vs_torch.py` runs end to end and reports a positive ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import mlxcore  # noqa: E402,F401  (fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxcore.config import ModelConfig  # noqa: E402
from mlxcore.models.model import from_config, hf_config  # noqa: E402
from mlxcore.train.step import make_step  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package

import torch_llama  # noqa: E402

VOCAB = 512


def micro_config() -> dict:
    cfg = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return hf_config(cfg, VOCAB)


def batch(B: int = 2, T: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.float32)
    mask[1, T // 2:] = 0  # some padding, so the masked mean is exercised too
    return rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T)), mask


def twins():
    config = micro_config()
    mlx_model = from_config(config, seed=0)
    torch_model = torch_llama.Llama(config)
    torch_llama.load_from_mlx(torch_model, mlx_model)
    return mlx_model, torch_model


def test_same_parameter_names_and_shapes():
    mlx_model, torch_model = twins()
    mlx_shapes = {k: tuple(v.shape) for k, v in tree_flatten(mlx_model.parameters())}
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.named_parameters()}
    assert mlx_shapes == torch_shapes


def test_same_logits():
    mlx_model, torch_model = twins()
    x, _, _ = batch()
    ours = np.array(mlx_model(mx.array(x)))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_one_training_step_gives_the_same_weights(grad_clip):
    mlx_model, torch_model = twins()
    x, y, m = batch()
    lr = 1e-2  # large enough that a wrong update (e.g. torch's bias correction) shows clearly

    step, state = make_step(mlx_model, optim.AdamW(lr, betas=[0.9, 0.95], weight_decay=0.01),
                            grad_clip=grad_clip, compile=True)
    loss_sum, n, norm = step([(x, y, m)])
    mx.eval(state, loss_sum, n, norm)

    torch_step = torch_llama.make_train_step(torch_model, torch_llama.make_optimizer(torch_model, lr), grad_clip)
    loss, torch_norm = torch_step(*(torch.from_numpy(a) for a in (x, y, m)))

    assert loss.item() == pytest.approx(loss_sum.item() / n.item(), rel=1e-5)
    assert torch_norm.item() == pytest.approx(norm.item(), rel=1e-4)
    theirs = dict(torch_model.named_parameters())
    for name, p in tree_flatten(mlx_model.parameters()):
        np.testing.assert_allclose(theirs[name].detach().numpy(), np.array(p), atol=1e-4, rtol=0, err_msg=name)


def test_benchmark_script_reports_a_positive_ratio(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCH / "train_vs_torch.py"), "--preset", "custom", "--hidden", "64", "--layers", "2",
           "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", str(VOCAB), "--batch", "2",
           "--seq", "32", "--steps", "2", "--warmup", "1", "--compile", "off", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ratio"] > 0
    assert f"{result['ratio']:.2f}x" in proc.stdout
    assert {r["framework"] for r in result["rows"]} == {"mlx", "pytorch eager"}
