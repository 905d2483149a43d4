"""Quantized MLX exports: `mlx_lm.load` opens them and they answer like the model they came from."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from mlxcore.config import QuantizeConfig
from mlxcore.data.tokenizer import train_bpe
from mlxcore.export.mlx_quant import export_mlx_quantized
from mlxcore.io import read_manifest, temp_files
from mlxcore.models import checkpoint

from tests.conftest import adapter_checkpoint, hf_model_dir

PROMPT = [5, 17, 42, 99, 3, 250, 7]
STEPS = 16


def greedy(model, ids=PROMPT, steps=STEPS) -> list[int]:
    ids, out = list(ids), []
    for _ in range(steps):
        token = int(mx.argmax(model(mx.array([ids]))[0, -1]))
        out.append(token)
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mlxq")
    train_bpe(["the quick brown fox answers 12 * 7 = 84"] * 40, 300, 1, root / "tok")
    base = hf_model_dir(root / "base", root / "tok", "qwen3", vocab_size=512)
    return {"root": root, "tok": root / "tok", "base": base,
            "lora": adapter_checkpoint(root / "lora", base, root / "tok"),
            "qlora": adapter_checkpoint(root / "qlora", base, root / "tok", QuantizeConfig(bits=4, group_size=32)),
            "q8": root / "q8", "info8": export_mlx_quantized(base, root / "q8", bits=8, group_size=64)}


def _quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def test_8bit_export_loads_with_mlx_lm_and_answers_like_the_float_model(dirs):
    info, out = dirs["info8"], dirs["q8"]
    assert info["path"] == str(out) and info["bits"] == 8 and info["source"] == "full"
    model, tokenizer, config = mlx_lm.load(str(out), return_config=True)
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    quantized = _quantized_modules(model)
    # every projection of both layers, the embedding and the untied head
    assert len(quantized) == info["quantized_layers"] == 2 * 7 + 2 and not info["kept_float"]
    assert {(m.bits, m.group_size) for m in quantized.values()} == {(8, 64)}
    assert tokenizer.encode("the quick brown fox")  # tokenizer files came along
    assert 8 < info["bits_per_weight"] < 9.5
    ref, _ = mlx_lm.load(str(dirs["base"]))
    want, got = greedy(ref), greedy(model)
    assert sum(a == b for a, b in zip(want, got)) >= 0.75 * STEPS, (want, got)
    assert read_manifest(out, "checkpoint")["config"]["quantization"]["bits"] == 8
    assert not temp_files(dirs["root"])


def test_group_size_is_honoured(dirs):
    out = dirs["root"] / "q4-g32"
    info = export_mlx_quantized(dirs["base"], out, bits=4, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    model, _ = mlx_lm.load(str(out))
    q = model.model.layers[0].mlp.down_proj  # input width 128: 4 groups of 32
    assert (q.bits, q.group_size) == (4, 32) and q.scales.shape == (64, 128 // 32)
    assert info["bytes"] < 0.7 * dirs["info8"]["bytes"]
    assert {(m.bits, m.group_size) for m in _quantized_modules(model).values()} == {(4, 32)}


@pytest.mark.parametrize("bits, group_size, words", [
    (7, 64, "bits=7"), (16, 64, "bits=16"), (True, 64, "bits=True"), (4, 48, "group_size=48"), (8, 0, "group_size=0"),
])
def test_bad_bits_or_group_size_are_refused_before_anything_is_written(dirs, bits, group_size, words):
    out = dirs["root"] / "bad"
    with pytest.raises(ValueError, match=words):
        export_mlx_quantized(dirs["base"], out, bits=bits, group_size=group_size)
    assert not out.exists()


def test_missing_model_and_existing_output(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        export_mlx_quantized(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_mlx_quantized(dirs["base"], dirs["q8"], bits=8)
    again = export_mlx_quantized(dirs["base"], tmp_path / "q8", bits=8)  # same weights -> same bytes
    assert (tmp_path / "q8/model.safetensors").read_bytes() == (dirs["q8"] / "model.safetensors").read_bytes()
    export_mlx_quantized(dirs["base"], tmp_path / "q8", bits=4, overwrite=True)
    assert json.loads((tmp_path / "q8/config.json").read_text())["quantization"]["bits"] == 4
    assert again["bits"] == 8 and not temp_files(tmp_path)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_dirs_are_fused_first(dirs, kind):
    out = dirs["root"] / f"{kind}-q8"
    info = export_mlx_quantized(dirs[kind], out, bits=8, group_size=64)
    assert info["source"] == "adapters"
    assert (out / "tokenizer.json").is_file() and not (out / "adapters.safetensors").exists()
    model, _ = mlx_lm.load(str(out))
    trained, _ = checkpoint.load(dirs[kind])  # base (+ its QLoRA quantization) + adapters, as trained
    want, got = greedy(trained), greedy(model)
    assert sum(a == b for a, b in zip(want, got)) >= 0.75 * STEPS, (want, got)
    # the adapters are in the weights: the export differs from the base's
    ours, plain = mx.load(str(out / "model.safetensors")), mx.load(str(dirs["q8"] / "model.safetensors"))
    assert not mx.array_equal(ours["model.layers.1.self_attn.q_proj.weight"],
                              plain["model.layers.1.self_attn.q_proj.weight"])


def test_an_already_quantized_model_is_dequantized_before_requantizing(dirs):
    q4 = dirs["root"] / "q4"
    export_mlx_quantized(dirs["base"], q4, bits=4, group_size=64)
    out = dirs["root"] / "q4-to-q8"
    info = export_mlx_quantized(q4, out, bits=8, group_size=128)
    assert info["source"] == "quantized"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 128, "bits": 8, "mode": "affine"}  # no stale per-layer keys
    model, _ = mlx_lm.load(str(out))
    quantized = _quantized_modules(model)
    assert {(m.bits, m.group_size) for m in quantized.values()} == {(8, 128)}
    # width-64 inputs cannot take groups of 128: those stay float, dequantized from the 4-bit source
    assert "model.layers.0.self_attn.q_proj" in info["kept_float"] and "model.layers.0.mlp.down_proj" in quantized
    src, _ = mlx_lm.load(str(q4))
    want, got = greedy(src), greedy(model)
    assert sum(a == b for a, b in zip(want, got)) >= 0.75 * STEPS, (want, got)


def test_exporting_again_into_the_same_out_replaces_the_mlx_export_as_it_does_the_gguf(dirs, tmp_path):
    """`mlxflow export` twice into one --out (after re-fusing a new adapter into the same model dir)
    replaced the GGUF and then died on the MLX dir with a FileExistsError, leaving the old model's
    quantized export beside the new GGUF."""
    import shutil

    from mlxcore.export.run import export_all

    model = tmp_path / "model"
    shutil.copytree(dirs["base"], model)
    export_all(model, tmp_path / "out", ["mlx-8bit"], gate=None, log=lambda m: None)
    [path] = (tmp_path / "out").glob("*-mlx-8bit")
    before = (path / "model.safetensors").read_bytes()
    shutil.rmtree(model)
    checkpoint.fuse(dirs["lora"], model)  # other weights, the same dir
    export_all(model, tmp_path / "out", ["mlx-8bit"], gate=None, log=lambda m: None)
    export_mlx_quantized(model, tmp_path / "fresh", bits=8)
    now = (path / "model.safetensors").read_bytes()
    assert now == (tmp_path / "fresh" / "model.safetensors").read_bytes() != before
    assert not temp_files(tmp_path / "out")


def test_a_base_model_s_generation_config_reaches_the_tokenizer_stage_adapters_and_the_fused_model(dirs, tmp_path):
    """A Hub model's generation_config.json (sampling defaults, end-of-turn ids that transformers'
    `generate` reads) was dropped by the tokenizer stage, so fine-tuned and fused dirs lacked it
    and HF decoded them greedily with no stop list of the base's."""
    import shutil

    from mlxcore.config import TokenizerConfig
    from mlxcore.data.tokenizer import load_or_train

    base = tmp_path / "base"
    shutil.copytree(dirs["base"], base)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [2, 0]}
    (base / "generation_config.json").write_text(json.dumps(gen))
    load_or_train(TokenizerConfig(path=str(base)), None, tmp_path / "tok")  # the finetune flow's tokenizer stage
    lora = adapter_checkpoint(tmp_path / "lora", base, tmp_path / "tok")
    fused = checkpoint.fuse(lora, tmp_path / "fused")
    for d in (tmp_path / "tok", lora, fused):
        assert json.loads((d / "generation_config.json").read_text()) == gen, d
