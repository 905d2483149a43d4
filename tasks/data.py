"""Data stages: synthetic raw data, tokenizer, pretokenized shards."""

from __future__ import annotations

from pathlib import Path

from mlxcore.config import DataConfig, TokenizerConfig
from mlxcore.data import pretokenize as pretok
from mlxcore.data import synthetic, tokenizer as tokenizers
from mlxcore.io import dir_digest, read_manifest
from tasks.caching import Stage

DATA = Stage("data")


def _tokenizer_source(params: dict) -> str | None:
    """A tokenizer copied from a local dir is keyed by that dir's content, not by its path."""
    path = params["config"].path
    if path and Path(path).is_dir():
        return dir_digest(path, tokenizers.TOKENIZER_FILES)
    return path  # missing: the task itself fails with the reason


TOKENIZER = Stage("tokenizer", inputs=("raw_dir",), extra=_tokenizer_source)
PRETOKENIZE = Stage("pretokenize", inputs=("raw_dir", "tokenizer_dir"))


def _output(out) -> dict:
    manifest = read_manifest(out)
    return {"path": str(out), "digest": manifest["digest"]}


@DATA.task()
def prepare_data(data: DataConfig, run_dir: str) -> dict:
    """Generate the raw dataset (synthetic tasks as pretraining text and SFT conversations)."""
    out = DATA.dir(locals())
    if not DATA.done(out):
        synthetic.write_dataset(data.synthetic, out)
    return _output(out)


@TOKENIZER.task()
def tokenizer(config: TokenizerConfig, raw_dir: str, run_dir: str) -> dict:
    """Copy a local HF tokenizer, or train a byte-level BPE on the raw training text."""
    out = TOKENIZER.dir(locals())
    if not TOKENIZER.done(out):
        tokenizers.load_or_train(config, raw_dir, out)
    return _output(out) | {"vocab_size": read_manifest(out)["vocab_size"]}


@PRETOKENIZE.task(task_run_name="pretokenize-{kind}")
def pretokenize(raw_dir: str, tokenizer_dir: str, kind: str, run_dir: str) -> dict:
    """Tokenize the `kind` (pretrain | sft) splits into memmap shards (+ SFT loss masks)."""
    out = PRETOKENIZE.dir(locals())
    if not PRETOKENIZE.done(out):
        pretok.pretokenize(raw_dir, tokenizer_dir, kind, out)
    splits = read_manifest(out)["splits"]
    return _output(out) | {"tokens": {k: v["num_tokens"] for k, v in splits.items()}}
