"""Fine-tune a local Hugging Face / mlx-lm model: data -> its tokenizer -> pretokenize -> sft -> eval -> sample."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import FinetuneConfig, TokenizerConfig, with_overrides
from tasks.data import prepare_data, pretokenize, sources, tokenizer
from tasks.evaluate import evaluate, sample
from tasks.report import reported
from tasks.train import model_card, sft
from flows.export import ship


@flow(name="finetune")
@reported
def finetune(config: FinetuneConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["sft.lr=1e-4", "sft.lora.rank=16"]."""
    config = with_overrides(config, overrides)
    run, data = str(config.run_dir), config.data
    raw = prepare_data(data.synthetic, run) if data.sft is None else None
    chat_in, chat_fmt = sources(data, "sft", run, raw)
    tok = tokenizer(TokenizerConfig(path=config.base_model), None, chat_in, {}, chat_fmt, run)
    chats = pretokenize(chat_in, tok["path"], "sft", chat_fmt, config.pretokenize_limit("sft"), data.workers, run)
    tuned = sft(chats["path"], tok["path"], config.base_model, config.sft, run)
    before = evaluate(config.base_model, chats["path"], config.sft.batch_size, config.sft.seq_len, run)
    after = evaluate(tuned["checkpoint"], chats["path"], config.sft.batch_size, config.sft.seq_len, run)
    samples = sample(tuned["checkpoint"], chats["path"], config.sample, run)
    model_card(tuned["checkpoint"], {"eval": {"base": before, "sft": after},
                                     "sample exact match": samples["exact_match"]}, run)
    shipped = None
    if config.export is not None:  # adapters are fused into the exports
        shipped = ship(config.export, tuned["checkpoint"], run, config.name)
        shipped.pop("targets")
    return {"checkpoint": tuned["checkpoint"], "train": {"sft": tuned}, "eval": {"base": before, "sft": after},
            "samples": samples, "export": shipped, "data": {"sft": chats}}
