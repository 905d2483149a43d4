"""Held-out loss and perplexity of a checkpoint on a pretokenized split."""

from __future__ import annotations

import math
from pathlib import Path

from mlxcore.data.loader import open_batches
from mlxcore.io import read_manifest
from mlxcore.train.losses import Loss
from mlxcore.models.checkpoint import load
from mlxcore.train.step import mean_loss


def loss_ppl(checkpoint: str | Path, data_dir: str | Path, split: str = "val", batch_size: int = 16,
             seq_len: int = 256, max_batches: int | None = None, on_progress=None) -> dict:
    """Token-weighted mean loss over the split (first `max_batches` batches, in file order)."""
    model, config = load(checkpoint)
    data = read_manifest(data_dir, "tokens")
    # Hugging Face models often pad their embedding past the tokenizer's size (Qwen: 151936 > 151669)
    if data["vocab_size"] > config["vocab_size"]:
        raise ValueError(f"{checkpoint} has {config['vocab_size']} tokens, {data_dir} was tokenized with {data['vocab_size']}")
    pad = config.get("pad_token_id") or 0
    batches = open_batches(data_dir, split, batch_size, seq_len, shuffle=False, pad_id=pad, shrink=True)
    taken = batches.take(max_batches or batches.batches_per_epoch)
    # chunk the logits when a batch's would pass 256 MB (large vocabularies)
    big = batch_size * seq_len * config["vocab_size"] > (1 << 26)
    loss = mean_loss(model, taken, Loss(chunk=max(64, (1 << 24) // config["vocab_size"]) if big else 0),
                     on_progress=on_progress)
    tokens = int(sum(m.sum() for _, _, m in taken))
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": tokens, "batches": len(taken),
            "uniform_loss": math.log(config["vocab_size"]), "task": data["task"], "split": split}
