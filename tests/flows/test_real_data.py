"""Real data end to end (skipped without $MLXFLOW_TEST_DATA): GSM8K through the finetune flow
with MiniMind's tokenizer, and tinyshakespeare through the pipeline with a BPE trained on it."""

import json

import pytest

from mlxcore.config import FinetuneConfig, PipelineConfig, load_config
from mlxcore.data import tokenizer as tokenizers
from mlxcore.data.loader import documents
from mlxcore.io import read_manifest

from tests.conftest import REPO, hf_model_dir

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_gsm8k_sft_with_the_minimind_tokenizer(test_data, tmp_path):
    from flows.finetune import finetune

    gsm8k, tok_dir = test_data / "gsm8k", test_data / "minimind_tokenizer"
    base = hf_model_dir(tmp_path / "base", tok_dir, "qwen3", vocab_size=6400)
    config = load_config(None, [
        f"out_dir={tmp_path / 'runs'}", f"base_model={base}", "name=gsm8k",
        f"data.sft.train=[{gsm8k / 'train.jsonl'}]", "data.sft.val_max_rows=64", "data.sft.max_tokens=1024",
        "sft.fine_tune_type=full", "sft.steps=20", "sft.batch_size=8", "sft.seq_len=256", "sft.lr=3e-3",
        "sft.warmup_steps=2", "sft.eval_every=10", "sft.save_every=10", "sft.eval_batches=4",
        "sample.num_prompts=2", "sample.max_tokens=8",
        # shipped: f16 and q8_0 GGUF, gated in llama.cpp on 1 MB of tinyshakespeare + GSM8K's questions
        "export.formats=[f16,q8_0]", "export.gate.examples=8",
        f"export.gate.text=[{test_data / 'tinyshakespeare'},{gsm8k / 'test.jsonl'}]"], cls=FinetuneConfig)
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    sft = result["train"]["sft"]
    assert sft["step"] == 20 and sft["val_loss"] < sft["initial_val_loss"] - 1.0, sft
    gates = result["export"]["gates"]
    assert gates["f16"]["tokens"]["differing_texts"] == 0 and gates["f16"]["tokens"]["tokens"] > 300_000
    assert gates["f16"]["identical"] >= 0.95, gates["f16"]
    for q, tol in (("f16", 1.0), ("q8_0", 2.0)):
        assert gates[q]["passed"] and all(s["drop"] <= tol for s in gates[q]["suites"].values()), gates[q]

    data_dir, = (tmp_path / "runs/gsm8k").glob("pretokenize-*")
    m = read_manifest(data_dir)
    assert m["formats"] == {"train.jsonl": "gsm8k"}
    assert m["stats"]["truncated"] == m["stats"]["dropped_overlong"] == m["stats"]["dropped_no_labels"] == 0
    assert m["splits"]["val"]["num_docs"] == 64
    tok = tokenizers.load(tok_dir)
    rows = [json.loads(line) for line in open(gsm8k / "train.jsonl")]
    learned, prompts = [], []
    for split in ("train", "val"):
        for toks, mask in documents(data_dir, split):
            learned.append(tok.decode(toks[mask == 1]))
            prompts.append(tok.decode(toks[mask == 0]))
    # the loss sees every answer, all of it, and nothing else
    assert sorted(learned) == sorted(r["answer"] + "<|im_end|>" for r in rows)
    # ... and the rest is the prompt the model will be given (MiniMind's adds an empty think block), then a newline
    expected = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                        add_generation_prompt=True) + "\n" for r in rows]
    assert sorted(prompts) == sorted(expected)


def test_tinyshakespeare_pretraining_with_a_bpe_trained_on_it(test_data, tmp_path):
    from flows.pipeline import pipeline

    text = test_data / "tinyshakespeare" / "input.txt"
    config = load_config(REPO / "configs/smoke.yaml", [
        f"out_dir={tmp_path}", "name=shakespeare", f"data.pretrain.train=[{text}]", "data.pretrain.val_fraction=0.05",
        # min_frequency: the demo's default (500) merges only task words; Shakespeare's need 2
        "tokenizer.vocab_size=1024", "tokenizer.min_frequency=2", "pretrain.steps=20", "pretrain.eval_every=10", "sft.steps=2", "sft.eval_every=0",
        "sample.num_prompts=1", "sample.max_tokens=4", "bench=null", "export.gate.examples=4"], cls=PipelineConfig)
    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    pre = result["train"]["pretrain"]
    assert pre["step"] == 20 and pre["val_loss"] < pre["initial_val_loss"] - 1.0, pre
    # the default export's gate: llama.cpp reads all of Shakespeare with this BPE's ids
    tokens = result["export"]["gates"]["q8_0"]["tokens"]
    assert tokens["differing_texts"] == 0 and tokens["tokens"] > 250_000, tokens

    run = tmp_path / "shakespeare"
    tok_dir = next(run.glob("tokenizer-*"))
    tok = tokenizers.load(tok_dir)
    assert len(tok) == 1024
    assert len(tok("KING HENRY", add_special_tokens=False)["input_ids"]) <= 4  # the BPE learned Shakespeare's words
    data = next(d for d in run.glob("pretokenize-*") if read_manifest(d)["task"] == "pretrain")
    m = read_manifest(data)
    paragraphs = [p for p in text.read_text().split("\n\n") if p.strip()]
    assert m["formats"] == {"input.txt": "text"}
    assert m["splits"]["train"]["num_docs"] + m["splits"]["val"]["num_docs"] == len(paragraphs)
    docs = list(documents(data, "val"))
    assert all(toks[-1] == 0 for toks, _ in docs)  # each paragraph ends with the separator
    assert set(tok.decode(t[:-1]) for t, _ in docs) <= set(p.strip("\n") for p in paragraphs)
