"""GGUF export: llama.cpp (llama-cpp-python) tokenizes like our tokenizer and computes the MLX logits."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.config import ModelConfig
from mlxcore.data.tokenizer import load as load_tokenizer
from mlxcore.data.tokenizer import special_ids, train_bpe
from mlxcore.export.gguf import export_gguf
from mlxcore.models import adapters, checkpoint
from mlxcore.models.model import from_config, hf_config

from tests.conftest import tiny_hf_config

gguf = pytest.importorskip("gguf")

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What's 12+345? Answer:\n(quickly!)"},
            {"role": "assistant", "content": "357. It's   easy -- isn't it?"}]
TEXTS = [
    "The year 2024 had 366 days; pi ~ 3.14159, 1,000,000 and 0x1F.",
    "Hello!!! (what?) 'quoted' \"double\" -- dash... I'M sure you'LL see; it's DON'T.",
    "line one\n\nline two\r\n\tindented   three  spaces \n\n\n  trailing   ",
    "café naïve Ünïcödé — 日本語のテキスト, emoji 🎉🚀 and ñ, ß, Ω≈ç√.",
    "x = (a + b) * 42; // comment\nif (x >= 10) { return [1, 2, 3]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>plain <|im_end|>text",
]
CORPUS = [
    "First Citizen: Before we proceed any further, hear me speak. You are all resolved rather to die than "
    "to famish? Resolved. resolved. First, you know Caius Marcius is chief enemy to the people.",
    "user\nWhat is 17 * 23? Show the steps.\nassistant\n17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391.",
    "def add(a, b):\n    return a + b  # adds two numbers\n\nprint(add(2, 3))\n",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be...",
]


def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")

    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe([c for c in CORPUS for _ in range(30)], 400, 2, out)
    return out


@pytest.fixture(scope="module")
def models(tok_dir, tmp_path_factory):
    """Tiny float32 checkpoints: llama tied / untied, qwen2 (q/k/v biases, tied), qwen3 (q/k norms,
    untied, 8 more embedding rows than tokens: the vocabulary is padded)."""
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer(tok_dir)
    dirs = {}
    for name, tied in (("llama", True), ("llama_untied", False)):
        cfg = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, tie_embeddings=tied)
        config = hf_config(cfg, len(tok), special_ids(tok))
        dirs[name] = checkpoint.save_model_dir(root / name, from_config(config, seed=1), config, tokenizer_dir=tok_dir)
    for name, extra in (("qwen2", 0), ("qwen3", 8)):
        config = tiny_hf_config(name, len(tok) + extra)
        dirs[name] = checkpoint.save_model_dir(root / name, from_config(config, seed=2), config, tokenizer_dir=tok_dir)
    # a mixture of experts (qwen3_moe: llama.cpp's qwen3moe), 4 experts, top-2, in both layers
    cfg = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    config = hf_config(cfg, len(tok), special_ids(tok))
    dirs["qwen3_moe"] = checkpoint.save_model_dir(root / "qwen3_moe", from_config(config, seed=3), config,
                                                  tokenizer_dir=tok_dir)
    return dirs


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """export(model name, qtype) -> result dict, each file written once per module."""
    root, done = tmp_path_factory.mktemp("gguf"), {}

    def export(name, qtype="f16"):
        if (name, qtype) not in done:
            done[name, qtype] = export_gguf(models[name], root / f"{name}-{qtype}.gguf", qtype)
        return done[name, qtype]

    return export


def _texts(tok):
    return [tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True), *TEXTS]


def _parity(gguf_path, tok):
    """(texts tokenized identically by llama.cpp and transformers, all texts, llama.cpp detokenizer round trips)."""
    llm = _llama(gguf_path, vocab_only=True)
    same = round_trips = 0
    texts = _texts(tok)
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False)
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        same += ours == theirs
        round_trips += llm.detokenize(ours, special=True).decode() == text == tok.decode(ours)
    llm.close()
    return same, len(texts), round_trips


def test_llama_cpp_tokenizes_like_our_bpe(exported, tok_dir):
    result = exported("llama")
    assert result["pre"] == "qwen2"
    assert _parity(result["path"], load_tokenizer(tok_dir)) == (len(TEXTS) + 1,) * 3


def test_llama_cpp_tokenizes_like_the_minimind_tokenizer(test_data, tmp_path):
    src = test_data / "minimind_tokenizer"
    tok = load_tokenizer(src)
    config = tiny_hf_config("qwen2", len(tok))
    model_dir = checkpoint.save_model_dir(tmp_path / "m", from_config(config), config, tokenizer_dir=src)
    result = export_gguf(model_dir, tmp_path / "m.gguf")
    assert result["pre"] == "gpt-2"
    assert _parity(result["path"], tok) == (len(TEXTS) + 1,) * 3
    fields = gguf.GGUFReader(result["path"]).fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[2] == gguf.TokenType.CONTROL and types[25] == gguf.TokenType.USER_DEFINED  # <|im_end|>, <think>
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")


def test_llama_cpp_tokenizes_like_a_llama3_style_bpe(tmp_path):
    """Llama-3's split (digits by threes) and ignore_merges: llama.cpp's `llama-bpe`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlxcore.data.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS
    from mlxcore.export.vocab import LLAMA3_PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([c for c in CORPUS for _ in range(30)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    config = tiny_hf_config("qwen2", len(tok))
    model_dir = checkpoint.save_model_dir(tmp_path / "m", from_config(config), config, tokenizer_dir=tmp_path / "tok")
    result = export_gguf(model_dir, tmp_path / "m.gguf")
    assert result["pre"] == "llama-bpe"
    assert _parity(result["path"], load_tokenizer(tmp_path / "tok")) == (len(TEXTS) + 1,) * 3


def test_a_wrong_pre_tokenizer_name_makes_the_ids_differ(models, tok_dir, tmp_path):
    """The parity check can fail: the same vocabulary pre-tokenized as GPT-2 gives other ids."""
    result = export_gguf(models["llama"], tmp_path / "wrong.gguf", _pre_override="gpt-2")
    same, total, _ = _parity(result["path"], load_tokenizer(tok_dir))
    assert same < total


def _mlx_logits(model_dir, ids):
    model, _ = checkpoint.load(model_dir)
    model = adapters.fuse_model(model)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _gguf_logits(path, ids):
    llm = _llama(path, n_ctx=128, n_batch=128, logits_all=True, n_threads=2)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    llm.close()
    return scores


def _prompt_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(_texts(tok)[0] + TEXTS[0], add_special_tokens=False)
    assert len(ids) > 40
    return ids[:64]


# Measured max |diff| 2e-3..4e-3 with logits of std 0.57..1.0. Not 1e-5: llama.cpp rounds activations to
# f16 for f16 matmuls and keeps its KV cache in f16.
F16_ATOL = 1e-2


@pytest.mark.parametrize("name", ["llama", "llama_untied", "qwen2", "qwen3", "qwen3_moe"])
def test_f16_logits_match_mlx(exported, models, tok_dir, name):
    ids = _prompt_ids(tok_dir)
    result = exported(name)
    assert result["tied"] == (name in ("llama", "qwen2", "qwen3_moe"))
    ours, theirs = _mlx_logits(models[name], ids), _gguf_logits(result["path"], ids)
    assert theirs.shape == ours.shape
    diff = np.abs(ours - theirs).max()
    assert diff < F16_ATOL, (name, diff)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert np.std(ours) > 0.5  # the tolerance is < 2% of the logits' spread: it means something


def test_llama_without_the_rope_permutation_is_wrong(exported, models, tok_dir, tmp_path, monkeypatch):
    """The q/k permutation is what makes llama match: without it only position 0 (no rotation) agrees."""
    from mlxcore.export import gguf as export_mod

    monkeypatch.setattr(export_mod, "rope_interleave", lambda w, n: w)
    ids = _prompt_ids(tok_dir)
    path = export_gguf(models["llama"], tmp_path / "unpermuted.gguf")["path"]
    ours, theirs = _mlx_logits(models["llama"], ids), _gguf_logits(path, ids)
    assert np.abs(ours[0] - theirs[0]).max() < F16_ATOL
    assert np.abs(ours[1:] - theirs[1:]).max() > 10 * F16_ATOL


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe"])
def test_quantized_exports_stay_close(exported, models, tok_dir, name):
    ids = _prompt_ids(tok_dir)
    ours = _mlx_logits(models[name], ids)
    f16 = exported(name)
    q8 = exported(name, "q8_0")
    q4 = exported(name, "q4_0")
    assert q4["bytes"] < q8["bytes"] < f16["bytes"]
    assert q8["f16_fallback"] == [] and q8["n_params"] == f16["n_params"]
    theirs = _gguf_logits(q8["path"], ids)
    per_token = np.abs(ours - theirs).max(-1)
    if name == "qwen3_moe":  # q8_0 attention can tip a near-tie of the router to another expert at a few tokens
        assert np.quantile(per_token, 0.9) < 0.15 and (per_token < 0.15).mean() >= 0.9
    else:
        assert per_token.max() < 0.15  # measured 0.04..0.08
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    theirs4 = _gguf_logits(q4["path"], ids)
    assert np.isfinite(theirs4).all() and np.abs(ours - theirs4).mean() < 0.3  # measured 0.09..0.18


def _adapter_dir(base, out, kind="lora", quantize=None):
    """An mlx-lm adapter dir on `base` with random (nonzero) LoRA / DoRA weights."""
    acfg = {"fine_tune_type": kind, "num_layers": 2, "quantize": quantize,
            "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]}}
    model, _ = checkpoint.load(base)
    adapters.apply(model, acfg)
    mx.random.seed(3)
    weights = {k: v + 0.1 * mx.random.normal(v.shape) for k, v in adapters.trainable_weights(model).items()}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({**acfg, "base_model": str(base)}))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(base) / f).is_file():
            shutil.copy(Path(base) / f, out / f)
    return out


@pytest.mark.parametrize("kind, quantize", [("lora", None), ("dora", None), ("lora", {"bits": 4, "group_size": 32})],
                         ids=["lora", "dora", "qlora4"])
def test_adapter_dirs_export_their_fused_weights(models, tok_dir, tmp_path, kind, quantize):
    ids = _prompt_ids(tok_dir)
    adapter = _adapter_dir(models["llama"], tmp_path / "adapter", kind, quantize)
    result = export_gguf(adapter, tmp_path / "fused.gguf")
    fused = _mlx_logits(adapter, ids)  # checkpoint.load + fuse_model
    theirs = _gguf_logits(result["path"], ids)
    assert np.abs(fused - theirs).max() < F16_ATOL
    assert np.abs(_mlx_logits(models["llama"], ids) - theirs).max() > 20 * F16_ATOL  # the adapters count


def test_an_unsupported_pre_tokenizer_is_named(models, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(models["llama"], model_dir)
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"pre-tokenizer Sequence\[Digits.*no llama.cpp equivalent"):
        export_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_failed_export_leaves_no_temp_and_keeps_the_old_file(models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    seen = []

    def boom(done, total):
        seen.append((done, total))
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        export_gguf(models["qwen2"], out, "q8_0", on_progress=boom)
    assert seen == [(0, seen[0][1]), (1, seen[0][1]), (2, seen[0][1]), (3, seen[0][1])] and seen[0][1] > 10
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    progress = []
    result = export_gguf(models["qwen2"], out, "q8_0", on_progress=lambda d, t: progress.append(d))
    assert progress == list(range(seen[0][1] + 1)) and result["bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_metadata_for_llama_cpp(exported):
    fields = gguf.GGUFReader(exported("qwen3")["path"]).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "qwen3" and value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert value["qwen3.attention.key_length"] == value["qwen3.attention.value_length"] == 16
    assert (value["qwen3.block_count"], value["qwen3.attention.head_count"], value["qwen3.attention.head_count_kv"]) == (2, 4, 2)
    assert value["qwen3.rope.freq_base"] == 1e6 and value["qwen3.context_length"] == 1024
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == value["qwen3.vocab_size"] and tokens[-1].startswith("[PAD")
    assert types[-1] == gguf.TokenType.UNUSED and types[:3] == [gguf.TokenType.CONTROL] * 3
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "<|im_start|>" in value["tokenizer.chat_template"]


def test_moe_metadata_and_tensors_for_llama_cpp(exported):
    """qwen3_moe is llama.cpp's qwen3moe: expert counts, the experts stacked, the router kept in f32."""
    reader = gguf.GGUFReader(exported("qwen3_moe", "q8_0")["path"])
    value = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "qwen3moe"
    assert (value["qwen3moe.expert_count"], value["qwen3moe.expert_used_count"],
            value["qwen3moe.expert_feed_forward_length"]) == (4, 2, 64)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 64, 4]  # ne: n_embd, n_ff_exp, n_expert
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [64, 64, 4]
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
