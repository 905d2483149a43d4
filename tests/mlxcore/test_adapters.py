"""Fine-tuning modes: LoRA / DoRA / QLoRA train, resume and fuse; any local HF model dir; no remote code."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest

from mlxcore.models import adapters, checkpoint
from mlxcore.train import loop as train
from mlxcore.config import LoRAConfig, QuantizeConfig
from mlxcore.models.checkpoint import load
from mlxcore.models.model import from_config
from mlxcore.train.loop import TrainJob

from tests.conftest import hf_model_dir, kill_after_first_checkpoint, micro_model, quick_train

X = mx.array([[1, 5, 9, 200, 17, 3, 42, 7]])

# micro model: hidden 64, 4 heads of 16, 2 kv heads (kv width 32), SwiGLU 128, 2 layers.
# LoRA adds rank * (in + out) per adapted linear: q 64+64, k 64+32, v 64+32, o 64+64,
# gate 64+128, up 64+128, down 128+64 -> 1024 * rank per layer. DoRA adds a magnitude per output:
# 64 + 32 + 32 + 64 + 128 + 128 + 64 = 512 per layer.
LORA_PER_LAYER_PER_RANK, DORA_EXTRA_PER_LAYER = 1024, 512


def _save_model(path, config, tok_dir, seed=0):
    return checkpoint.save_model_dir(path, from_config(config, seed=seed), config, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def base(small_data, tmp_path_factory):
    """A briefly pretrained llama checkpoint to fine-tune."""
    out = tmp_path_factory.mktemp("base")
    job = TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                   model=micro_model(), train=quick_train(steps=30, eval_every=0, save_every=0))
    return train.run(job)["checkpoint"]


def _sft(small_data, out, init_from, **overrides):
    base_cfg = dict(steps=30, lr=2e-3, eval_every=0, save_every=0, eval_batches=2)
    return TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                    init_from=str(init_from), train=quick_train(**{**base_cfg, **overrides}))


def _logits(model):
    return np.array(model(X).astype(mx.float32))


@pytest.mark.parametrize("kind, quantize, expected", [
    pytest.param("lora", None, 2 * 4 * LORA_PER_LAYER_PER_RANK, marks=pytest.mark.gpu),
    ("dora", None, 2 * (4 * LORA_PER_LAYER_PER_RANK + DORA_EXTRA_PER_LAYER)),
    pytest.param("lora", QuantizeConfig(bits=4, group_size=32), 2 * 4 * LORA_PER_LAYER_PER_RANK,
                 marks=pytest.mark.gpu(first=True)),
    pytest.param("lora", QuantizeConfig(bits=8, group_size=64), 2 * 4 * LORA_PER_LAYER_PER_RANK,
                 marks=pytest.mark.gpu(first=True)),
], ids=["lora", "dora", "qlora4", "qlora8"])
def test_adapters_train_with_the_expected_trainable_parameters(small_data, base, tmp_path, kind, quantize, expected):
    job = _sft(small_data, tmp_path / "run", base, fine_tune_type=kind, quantize=quantize,
               lora=LoRAConfig(rank=4, alpha=8), eval_every=30)
    result = train.run(job)
    assert result["trainable_params"] == expected
    assert result["params"] > 10 * expected
    assert result["val_loss"] < result["initial_val_loss"] - 0.1, result
    final = tmp_path / "run/model"
    names = {p.name for p in final.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the base is not copied
    acfg = json.loads((final / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == kind and acfg["lora_parameters"]["scale"] == 2.0
    assert acfg["base_model"] == str(base) and len(acfg["base_digest"]) == 64
    assert sum(v.size for v in mx.load(str(final / "adapters.safetensors")).values()) == expected
    model, _ = load(final)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert bool(quantized) == (quantize is not None)
    if quantize:
        assert {m.bits for m in quantized} == {quantize.bits}


@pytest.mark.parametrize("kind, quantize", [("lora", None), ("dora", None), ("lora", QuantizeConfig(bits=4, group_size=32))],
                         ids=["lora", "dora", "qlora4"])
def test_fuse_gives_the_logits_of_base_plus_adapters(small_data, base, tmp_path, kind, quantize):
    train.run(_sft(small_data, tmp_path / "run", base, steps=10, fine_tune_type=kind, quantize=quantize))
    adapted, _ = load(tmp_path / "run/model")
    fused_dir = checkpoint.fuse(tmp_path / "run/model", tmp_path / "fused")
    fused, config = load(fused_dir)
    assert "quantization" not in config
    assert not any(isinstance(m, (nn.QuantizedLinear, adapters.LoRALinear)) for _, m in fused.named_modules())
    # float32: merging W + scale * B^T A^T changes only the summation order
    np.testing.assert_allclose(_logits(fused), _logits(adapted), atol=2e-4, rtol=1e-4)
    assert not np.allclose(_logits(fused), _logits(load(base)[0]), atol=1e-3)  # the adapters did something
    model, tok = mlx_lm.load(str(fused_dir))  # a plain checkpoint for mlx-lm
    np.testing.assert_allclose(_logits(model), _logits(fused), atol=1e-5)


def test_mlx_lm_loads_our_adapters_on_the_base(small_data, base, tmp_path):
    train.run(_sft(small_data, tmp_path / "run", base, steps=10, fine_tune_type="lora"))
    ours, _ = load(tmp_path / "run/model")
    theirs, _ = mlx_lm.load(str(base), adapter_path=str(tmp_path / "run/model"))
    np.testing.assert_allclose(_logits(theirs), _logits(ours), atol=1e-5)


@pytest.mark.slow
def test_adapter_training_resumes_after_sigkill_bit_identical(small_data, base, tmp_path):
    overrides = dict(steps=60, save_every=10, fine_tune_type="lora", quantize=QuantizeConfig(bits=4, group_size=32))
    straight = train.run(_sft(small_data, tmp_path / "straight", base, **overrides))
    job = _sft(small_data, tmp_path / "killed", base, **overrides)
    assert 0 < kill_after_first_checkpoint(job, tmp_path) < 60
    resumed = train.run(job)
    assert resumed["resumed_from"] and "step-" in resumed["resumed_from"]
    a, b = tmp_path / "straight/model", tmp_path / "killed/model"
    if mx.default_device() == mx.cpu:
        assert (a / "adapters.safetensors").read_bytes() == (b / "adapters.safetensors").read_bytes()
        assert resumed["train_loss"] == straight["train_loss"]


def _hf_dir(tmp_path, small_data, model_type):
    return hf_model_dir(tmp_path / model_type, small_data["tok"], model_type)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fine_tunes_a_local_hugging_face_qwen_dir(small_data, tmp_path, model_type, kind):
    src = _hf_dir(tmp_path, small_data, model_type)
    result = train.run(_sft(small_data, tmp_path / "run", src, steps=30, fine_tune_type=kind, eval_every=30))
    assert result["val_loss"] < result["initial_val_loss"] - 0.1
    model, config = load(tmp_path / "run/model")
    assert config["model_type"] == model_type
    if kind == "full":
        assert json.loads((tmp_path / "run/model/config.json").read_text())["model_type"] == model_type
        mlx_lm.load(str(tmp_path / "run/model"))


def test_a_model_dir_asking_to_run_its_own_code_is_refused(small_data, tmp_path):
    src = _hf_dir(tmp_path, small_data, "qwen2")
    marker = tmp_path / "code-ran"
    (src / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_file": "evil_model.py",
                                                 "auto_map": {"AutoModelForCausalLM": "evil_model.Model"}}))
    with pytest.raises(ValueError, match="custom module"):
        load(src)
    with pytest.raises(ValueError, match="custom module"):
        train.run(_sft(small_data, tmp_path / "run", src))
    assert not marker.exists()


def test_full_fine_tuning_a_quantized_model_is_a_clear_error(small_data, base, tmp_path):
    model, config = load(base)
    adapters.quantize_base(model, QuantizeConfig(bits=4, group_size=32))
    config = {**config, "quantization": {"group_size": 32, "bits": 4}}
    checkpoint.save_model_dir(tmp_path / "q4", model, config, tokenizer_dir=small_data["tok"])
    with pytest.raises(ValueError, match="quantized: full fine-tuning cannot train it"):
        train.run(_sft(small_data, tmp_path / "run", tmp_path / "q4"))
    result = train.run(_sft(small_data, tmp_path / "run-lora", tmp_path / "q4", steps=5, fine_tune_type="lora"))
    assert result["step"] == 5  # a pre-quantized base (mlx-community style) takes adapters as it is


def test_lora_needs_a_base_and_bad_keys_are_named(small_data, base, tmp_path):
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "a"),
                   model=micro_model(), train=quick_train(fine_tune_type="lora"))
    with pytest.raises(ValueError, match="set init_from"):
        train.run(job)
    with pytest.raises(ValueError, match="'qproj' matches no linear layer"):
        train.run(_sft(small_data, tmp_path / "b", base, fine_tune_type="lora", lora=LoRAConfig(target_modules=["qproj"])))


def test_short_keys_and_layer_count_choose_what_is_adapted(small_data, base, tmp_path):
    result = train.run(_sft(small_data, tmp_path / "run", base, steps=2, fine_tune_type="lora",
                            lora=LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"], num_layers=1)))
    assert result["trainable_params"] == 2 * ((64 + 64) + (64 + 32))  # one layer, q and v


def test_cpu_quantized_layers_match_mlx_quantized_matmul_in_value_and_gradient():
    """The dequantize + BLAS path QLoRA uses on the CPU computes what mx.quantized_matmul does."""
    lin, emb = nn.Linear(128, 96, bias=True), nn.Embedding(80, 128)
    ours = [nn.QuantizedLinear.from_linear(lin, 32, 4), nn.QuantizedEmbedding.from_embedding(emb, 32, 4)]
    ref = [nn.QuantizedLinear.from_linear(lin, 32, 4), nn.QuantizedEmbedding.from_embedding(emb, 32, 4)]
    for m in ours:
        adapters.use_cpu_quantized_matmuls(m)
    assert type(ours[0]).__name__ == "_CPUQuantizedLinear" and type(ours[1]).__name__ == "_CPUQuantizedEmbedding"
    x = mx.random.normal((6, 128))
    pairs = [(lambda x: ours[0](x), lambda x: ref[0](x)), (lambda x: ours[1].as_linear(x), lambda x: ref[1].as_linear(x))]
    for f, g in pairs:
        np.testing.assert_allclose(np.array(f(x)), np.array(g(x)), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.array(mx.grad(lambda x: (f(x) ** 2).sum())(x)),
                                   np.array(mx.grad(lambda x: (g(x) ** 2).sum())(x)), atol=1e-3, rtol=1e-4)


def test_adapter_branch_runs_in_the_input_dtype_and_float32_is_unchanged():
    lin = nn.Linear(64, 32)
    plain = adapters.LoRALinear.from_base(lin, r=4, scale=2.0)
    plain.lora_b = mx.random.normal(plain.lora_b.shape)
    auto = adapters.LoRALinear.from_base(lin, r=4, scale=2.0)
    auto.lora_a, auto.lora_b = plain.lora_a, plain.lora_b
    adapters._autocast_adapters(auto)
    assert type(auto) is adapters._AutocastLoRALinear
    x = mx.random.normal((3, 64))
    np.testing.assert_array_equal(np.array(auto(x)), np.array(plain(x)))
    xb = x.astype(mx.bfloat16)
    auto.linear = nn.Linear(64, 32)
    auto.linear.update({"weight": lin.weight.astype(mx.bfloat16), "bias": lin.bias.astype(mx.bfloat16)})
    assert auto(xb).dtype == mx.bfloat16
    assert auto.lora_a.dtype == mx.float32  # the trained weights stay float32


@pytest.mark.parametrize("wrong", ["every product", "the backward's", "one row's"])
def test_a_quantized_kernel_that_is_wrong_on_the_device_leaves_that_layer_dense(monkeypatch, caplog, wrong):
    """adapters.check_quantized_kernels: on the CPU (forced here) every kernel is right, so nothing
    changes; with a kernel made wrong for the tied output head's shape (what MLX-CUDA 0.32.4 did
    for 8 bits / group 64 on an H100), that layer alone becomes a dense frozen copy of its
    CPU-dequantized weight, the log names it, and the model computes the dequantized product."""
    from mlx.utils import tree_flatten
    from mlxcore.models.model import hf_config

    model = from_config(hf_config(micro_model(), 96), seed=0)
    model.freeze()
    adapters.quantize_base(model, QuantizeConfig(bits=8, group_size=64))
    emb = model.model.embed_tokens
    dense = mx.dequantize(emb.weight, emb.scales, emb.biases, 64, 8, stream=mx.cpu)
    assert adapters.check_quantized_kernels(model, on_cpu=True) == {}
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)

    real = mx.quantized_matmul

    def wrong_for_the_head(x, w, *args, transpose=True, **kw):
        y = real(x, w, *args, transpose=transpose, **kw)
        hit = {"every product": True, "the backward's": not transpose, "one row's": x.shape[0] == 1}[wrong]
        return y + 1.0 if w.shape[0] == 96 and hit else y  # the [96, 64] head only

    monkeypatch.setattr(mx, "quantized_matmul", wrong_for_the_head)
    with caplog.at_level("WARNING", logger="mlxcore.models.adapters"):
        bad = adapters.check_quantized_kernels(model, on_cpu=True)
    monkeypatch.undo()
    assert list(bad) == ["model.embed_tokens"] and bad["model.embed_tokens"] > adapters.CHECK_RTOL
    head = model.model.embed_tokens
    assert type(head) is nn.Embedding and np.array_equal(np.array(head.weight), np.array(dense))
    assert "model.embed_tokens" in caplog.text and "8-bit group 64" in caplog.text
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)  # its kernel was right
    assert not dict(tree_flatten(model.trainable_parameters()))  # still frozen
    h = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(head.as_linear(h)), np.array(h @ dense.T), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MLXFLOW_QUANT_CHECK", "off")
    assert adapters.check_quantized_kernels(model, on_cpu=True) == {}
