"""Pretokenize raw JSONL into memmap-able binary shards plus a manifest.

Layout of the output dir, per split (`train`, `val`):
  <split>/<n>.tokens.bin   token ids, uint16 (vocab <= 65535) or uint32, documents back to back
  <split>/<n>.index.bin    int64 offsets of document starts, plus the end (num_docs + 1 values)
  <split>/<n>.mask.bin     SFT only: uint8, 1 where the token is one the model must learn to
                           produce (assistant replies through their end-of-turn token)
A document never spans shards. Pretraining documents end with the separator token.

SFT masks come from the tokenizer's own chat template: the text is rendered once per assistant
turn and split where the rendered prompt (`add_generation_prompt=True`) ends, so any
prefix-stable template works, not only ChatML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxcore.data import tokenizer as tokenizers
from mlxcore.data.records import DataError, read_rows
from mlxcore.io import atomic_dir, read_manifest, write_manifest

SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB of uint16 per shard
BATCH_ROWS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def chat_segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trainable) pieces."""
    segments, done = [], ""
    eos = tok.eos_token or ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template is not prefix-stable; cannot locate assistant tokens")
        answer = full[len(prompt) :]
        cut = answer.rfind(eos) + len(eos) if eos and eos in answer else len(answer)
        segments += [(prompt[len(done) :], False), (answer[:cut], True), (answer[cut:], False)]
        done = full
    rest = tok.apply_chat_template(messages, tokenize=False)[len(done) :]
    segments.append((rest, False))
    return [(text, train) for text, train in segments if text]


class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype, with_mask: bool):
        self.dir, self.dtype, self.with_mask = directory, dtype, with_mask
        self.dir.mkdir(parents=True)
        self.shards: list[dict] = []
        self._open()

    def _open(self) -> None:
        n = len(self.shards)
        stem = self.dir / f"{n:05d}"
        self.tokens = open(f"{stem}.tokens.bin", "wb")
        self.mask = open(f"{stem}.mask.bin", "wb") if self.with_mask else None
        self.offsets, self.count, self.trainable = [0], 0, 0
        self.shards.append({"name": f"{n:05d}"})

    def _close(self) -> None:
        self.tokens.close()
        if self.mask:
            self.mask.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.dir / f"{self.shards[-1]['name']}.index.bin")
        self.shards[-1].update(num_tokens=self.count, num_docs=len(self.offsets) - 1, num_trainable=self.trainable)

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        if self.count and self.count + len(ids) > SHARD_TOKENS:
            self._close()
            self._open()
        self.tokens.write(ids.astype(self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(mask.astype(np.uint8).tobytes())
            self.trainable += int(mask.sum())
        else:
            self.trainable += len(ids)
        self.count += len(ids)
        self.offsets.append(self.count)

    def finish(self) -> dict:
        self._close()
        total = lambda k: sum(s[k] for s in self.shards)  # noqa: E731
        return {"shards": self.shards, **{k: total(k) for k in ("num_tokens", "num_docs", "num_trainable")}}


def _batches(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def _write_split(tok, path: Path, kind: str, writer: _ShardWriter, separator: int) -> None:
    for batch in _batches(read_rows(path, kind), BATCH_ROWS):
        if kind == "pretrain":
            for ids in _encode(tok, batch):
                writer.add(np.asarray(ids + [separator]))
            continue
        segs = [chat_segments(tok, msgs) for msgs in batch]
        flat = _encode(tok, [text for s in segs for text, _ in s])
        pos = 0
        for s in segs:
            pieces = flat[pos : pos + len(s)]
            pos += len(s)
            ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
            mask = np.concatenate([np.full(len(p), train, dtype=np.uint8) for p, (_, train) in zip(pieces, s)])
            writer.add(ids, mask)


def pretokenize(raw_dir: str | Path, tokenizer_dir: str | Path, kind: str, out_dir: str | Path) -> dict:
    """Tokenize raw_dir/<kind>/{train,val}.jsonl into shards under out_dir."""
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"kind must be 'pretrain' or 'sft', not {kind!r}")
    raw_dir = Path(raw_dir)
    raw = read_manifest(raw_dir, "raw-dataset")
    tok_manifest = read_manifest(tokenizer_dir, "tokenizer")
    tok = tokenizers.load(tokenizer_dir)
    vocab = len(tok)
    separator = tokenizers.special_ids(tok)["separator"]
    splits = {}
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            path = raw_dir / kind / f"{split}.jsonl"
            if not path.is_file():
                raise DataError(f"{path}: missing (the raw dataset has no {kind} {split} split)")
            writer = _ShardWriter(tmp / split, token_dtype(vocab), with_mask=kind == "sft")
            _write_split(tok, path, kind, writer, separator)
            splits[split] = writer.finish()
        config = {"kind": kind, "raw": raw["digest"], "tokenizer": tok_manifest["digest"]}
        return write_manifest(
            tmp,
            "tokens",
            config,
            task=kind,
            vocab_size=vocab,
            dtype=token_dtype(vocab).name,
            separator_id=separator,
            splits=splits,
        )
