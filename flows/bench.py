"""The `bench` and `eval` flows on their own (the same stages end pipeline, distill and rl)."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import BenchRunConfig, EvalConfig, TokenizerConfig, with_overrides
from tasks.bench import run_bench
from tasks.data import download, pretokenize, tokenizer
from tasks.evaluate import evaluate


@flow(name="bench")
def bench(config: BenchRunConfig = BenchRunConfig(), overrides: list[str] = []) -> dict:
    """Every target answers the same bench questions; the report puts them side by side.

    `overrides`: KEY=VALUE settings on top of `config`, e.g. ["examples=100", "suites=[copy,sort]"].
    """
    config = with_overrides(config, overrides)
    return run_bench([], config, str(config.run_dir), title=f"bench {config.name}")


@flow(name="eval")
def eval_flow(config: EvalConfig = EvalConfig(), overrides: list[str] = []) -> dict:
    """Held-out loss and perplexity of `checkpoint` on `data`, tokenized with the checkpoint's tokenizer."""
    config = with_overrides(config, overrides)
    config.check_checkpoint()
    run = str(config.run_dir)
    files = [download(spec, config.kind, config.max_download_mb, run)["path"] for spec in config.data]
    tok = tokenizer(TokenizerConfig(path=config.checkpoint), None, None, {}, {}, run)
    source = {"format": config.format, "system_prompt": config.system_prompt}
    limit = config.seq_len + 1 if config.kind == "sft" else None
    shards = pretokenize({"train": [], "val": files}, tok["path"], config.kind, source, limit, 0, run)
    return evaluate(config.checkpoint, shards["path"], config.batch_size, config.seq_len, run, config.max_batches)
