"""Fine-tune a local Hugging Face / mlx-lm model: data -> its tokenizer -> pretokenize -> sft -> eval -> sample."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import FinetuneConfig, TokenizerConfig
from tasks.data import prepare_data, pretokenize, tokenizer
from tasks.evaluate import evaluate, sample
from tasks.train import sft


@flow(name="finetune")
def finetune(config: FinetuneConfig) -> dict:
    run = str(config.run_dir)
    raw = prepare_data(config.data, run)
    tok = tokenizer(TokenizerConfig(path=config.base_model), raw["path"], run)
    chats = pretokenize(raw["path"], tok["path"], "sft", run)
    tuned = sft(chats["path"], tok["path"], config.base_model, config.sft, run)
    before = evaluate(config.base_model, chats["path"], config.sft.batch_size, config.sft.seq_len, run)
    after = evaluate(tuned["checkpoint"], chats["path"], config.sft.batch_size, config.sft.seq_len, run)
    samples = sample(tuned["checkpoint"], raw["path"], config.sample, run)
    return {"checkpoint": tuned["checkpoint"], "train": {"sft": tuned}, "eval": {"base": before, "sft": after},
            "samples": samples}
