"""Checkpoints in the Hugging Face layout load with mlx_lm.load and give the same logits."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlxcore.models import checkpoint
from mlxcore.config import ModelConfig
from mlxcore.data import tokenizer as tokenizers
from mlxcore.models.model import from_config, hf_config

from tests.conftest import micro_model


@pytest.fixture
def saved(tmp_path, small_data):
    tok = tokenizers.load(small_data["tok"])
    config = hf_config(micro_model(), len(tok), tokenizers.special_ids(tok))
    model = from_config(config, seed=3)
    step = checkpoint.save(tmp_path / "step", model, config, {"step": 0}, tokenizer_dir=small_data["tok"])
    path = checkpoint.finalize(step, tmp_path / "ckpt", {})
    return model, config, path


def test_checkpoint_has_the_hf_layout(saved):
    _, config, path = saved
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "manifest.json"} <= names
    on_disk = json.loads((path / "config.json").read_text())
    assert on_disk["model_type"] == "llama" and on_disk["architectures"] == ["LlamaForCausalLM"]
    assert on_disk["tie_word_embeddings"] is True and on_disk["rope_theta"] == 1e6
    assert on_disk["num_key_value_heads"] == 2 and on_disk["eos_token_id"] == 2


def test_mlx_lm_load_gives_identical_logits_and_generates(saved):
    model, _, path = saved
    loaded, tok = mlx_lm.load(str(path))
    x = mx.array([[1, 5, 9, 200, 17, 3, 42]])
    np.testing.assert_array_equal(np.array(loaded(x)), np.array(model(x)))
    text = mlx_lm.generate(loaded, tok, tok.apply_chat_template([{"role": "user", "content": "Copy: abc"}], add_generation_prompt=True), max_tokens=5)
    assert isinstance(text, str)


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="model.vocab_size=6400 does not match the tokenizer's 512 tokens"):
        hf_config(ModelConfig(preset="tiny", vocab_size=6400), 512)


def test_bfloat16_params():
    config = hf_config(micro_model().model_copy(update={"dtype": "bfloat16"}), 512)
    model = from_config(config)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_transformers_loads_the_checkpoint_with_the_same_logits_and_greedy_reply(saved):
    """The real consumer of the Hugging Face layout: `AutoModelForCausalLM` / `AutoTokenizer` on the
    checkpoint dir load every tensor (nothing missing or unexpected), give our logits, and greedy
    decoding picks the tokens ours does."""
    torch = pytest.importorskip("torch")
    import transformers

    model, _, path = saved
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM" and {k: v for k, v in info.items() if v} == {}
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Copy: abc"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    want = np.array(model(mx.array([prompt])))
    with torch.no_grad():
        got = hf(torch.tensor([prompt])).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id or 0)[0, len(prompt):].tolist()
    ours = list(prompt)
    for _ in range(8):  # greedy, the whole sequence each step: no cache to differ
        ours.append(int(mx.argmax(model(mx.array([ours]))[0, -1]).item()))
    assert ours[len(prompt):] == theirs


def test_a_transformers_5_config_s_rope_parameters_are_read(saved, tmp_path):
    """transformers 5 writes `rope_theta` (and any scaling) inside a nested `rope_parameters` block;
    mlx-lm's llama reads only the top-level keys, so such a model trained (and exported) with the
    default theta 10000: far from its own logits. Loaded here, it gives the logits of the same
    weights with the top-level key; a scaling type in the block reaches the GGUF export's refusal."""
    from mlx.utils import tree_flatten

    from mlxcore.export.gguf import _hparams
    from mlxcore.models import model as models

    model, config, path = saved
    nested = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    (path / "config.json").write_text(json.dumps(nested))
    x = mx.array([[1, 5, 9, 200, 17, 3, 42] * 4])
    loaded, got = models.load(path)
    assert got["rope_theta"] == config["rope_theta"] == 1e6 and "rope_scaling" not in got
    np.testing.assert_array_equal(np.array(loaded(x)), np.array(model(x)))
    default_theta = from_config({**config, "rope_theta": 10000.0}, seed=3)
    default_theta.load_weights(tree_flatten(model.parameters()))
    assert np.abs(np.array(default_theta(x)) - np.array(model(x))).max() > 1e-3  # what was loaded before

    nested["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(nested))
    _, got = models.load(path)
    assert got["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling .* is not supported by the GGUF export"):
        _hparams(got, "llama", {"model.embed_tokens.weight": np.zeros((4, 4))})
