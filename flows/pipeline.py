"""The whole DAG: data -> tokenizer -> pretokenize -> pretrain -> sft -> eval -> sample."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import PipelineConfig
from tasks.data import prepare_data, pretokenize, tokenizer
from tasks.evaluate import evaluate, sample
from tasks.train import pretrain, sft


@flow(name="pipeline")
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    run = str(config.run_dir)
    raw = prepare_data(config.data, run)
    tok = tokenizer(config.tokenizer, raw["path"], run)
    text = pretokenize(raw["path"], tok["path"], "pretrain", run)
    chats = pretokenize(raw["path"], tok["path"], "sft", run)
    base = pretrain(text["path"], tok["path"], config.model, config.pretrain, run)
    chat = sft(chats["path"], tok["path"], base["checkpoint"], config.sft, run)
    evals = {
        "pretrain": evaluate(base["checkpoint"], text["path"], config.pretrain.batch_size, config.pretrain.seq_len, run),
        "sft": evaluate(chat["checkpoint"], chats["path"], config.sft.batch_size, config.sft.seq_len, run),
    }
    samples = sample(chat["checkpoint"], raw["path"], config.sample, run)
    return {"checkpoint": chat["checkpoint"], "train": {"pretrain": base, "sft": chat}, "eval": evals, "samples": samples}
