"""Batches from pretokenized shards, addressed by a resumable cursor.

A batch is a pure function of (dataset, seed, cursor): `next(cursor)` returns the batch and the
cursor after it, so saving the cursor in a checkpoint is all resume needs, and every rank of a
data-parallel run can compute its own slice. Each epoch visits the items in a fresh permutation
drawn from (seed, epoch); the last partial batch of an epoch is dropped.

- `PackedBatches` (pretraining): non-overlapping windows of seq_len + 1 tokens from the token
  stream of each shard; inputs are the first seq_len, targets the last seq_len.
- `SFTBatches`: one conversation per row, truncated to seq_len + 1 tokens, right-padded to the
  batch's longest row rounded up to a multiple of `pad_multiple` (few distinct shapes for the
  compiled step); the loss mask is the target-side assistant mask, 0 on padding.

Bucketing (SFT, `bucket="length"` or `"labels"`): the epoch's permutation is cut into windows of
`bucket_window` global batches, each window is sorted by row length (or by label count, which
is what the sparse loss's cost follows), and the resulting batches are shuffled again. Rows of
a batch then have similar lengths, so little compute goes to padding. The set of rows an
epoch visits is exactly the unbucketed one: the same rows, each once, only grouped differently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxcore.data import mixture
from mlxcore.io import read_manifest



class _Shards:
    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir, "tokens")
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.dir}: no split {split!r}")
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        self.tokens, self.masks, self.index = [], [], []
        for shard in info["shards"]:
            stem = self.dir / shard.get("dir", split) / shard["name"]  # a mixture's shards lie in its sources' dirs
            self.tokens.append(np.memmap(f"{stem}.tokens.bin", dtype=dtype, mode="r"))
            self.index.append(np.fromfile(f"{stem}.index.bin", dtype=np.int64))
            mask = Path(f"{stem}.mask.bin")
            self.masks.append(np.memmap(mask, dtype=np.uint8, mode="r") if mask.exists() else None)


def documents(data_dir: str | Path, split: str):
    """Yield (tokens, loss mask or None) of every document of a split, in file order."""
    data = _Shards(data_dir, split)
    for tokens, index, mask in zip(data.tokens, data.index, data.masks):
        for lo, hi in zip(index[:-1], index[1:]):
            yield tokens[lo:hi], None if mask is None else mask[lo:hi]


class _Batches:
    """Shared cursor logic: items are integers 0..len-1, visited per-epoch in a permutation."""

    bucket_keys: np.ndarray | None = None  # per-item sort key when bucketing
    bucket_window: int = 32

    def __init__(self, batch_size: int, seed: int, shuffle: bool, rank: int, world: int, shrink: bool = False):
        if shrink and 0 < self.num_items < batch_size * world:  # a small held-out split: smaller batches
            batch_size = max(1, self.num_items // world)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self._perm_epoch, self._perm = None, None
        if self.num_items < batch_size * world:
            raise ValueError(
                f"{self.num_items} items cannot fill one batch of {batch_size} x {world} rank(s); "
                "use more data, a smaller batch_size or a shorter seq_len"
            )

    num_items: int = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.world)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = self.num_items
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.bucket_keys is not None:
                perm = self._bucketed(perm, rng)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def _bucketed(self, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        per_step = self.batch_size * self.world
        used = perm[: self.batches_per_epoch * per_step]  # the rows an unbucketed epoch visits
        window = self.bucket_window * per_step
        parts = [w[np.argsort(self.bucket_keys[w], kind="stable")] for w in np.split(used, range(window, len(used), window))]
        groups = np.concatenate(parts).reshape(-1, per_step)
        if self.shuffle:
            groups = groups[rng.permutation(len(groups))]
        return groups.reshape(-1)

    def next(self, cursor: dict | None = None) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict]:
        """The batch at `cursor` (default: the start) and the cursor that follows it."""
        epoch, index = (cursor or {}).get("epoch", 0), (cursor or {}).get("index", 0)
        if index >= self.batches_per_epoch:
            epoch, index = epoch + 1, 0
        per_step = self.batch_size * self.world
        start = index * per_step + self.rank * self.batch_size
        items = self._order(epoch)[start : start + self.batch_size]
        return self._collate(items), {"epoch": epoch, "index": index + 1}

    def take(self, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The first `n` batches in file order (for evaluation), fewer if the data is short."""
        cursor, out = {"epoch": 0, "index": 0}, []
        for _ in range(min(n, self.batches_per_epoch)):
            batch, cursor = self.next(cursor)
            out.append(batch)
        return out


class PackedBatches(_Batches):
    def __init__(self, data_dir, split, batch_size, seq_len, seed=0, shuffle=True, rank=0, world=1, shrink=False):
        self.data, self.seq_len = _Shards(data_dir, split), seq_len
        counts = [max(0, (len(t) - 1) // seq_len) for t in self.data.tokens]
        self._starts = np.cumsum([0] + counts)
        self.num_items = int(self._starts[-1])
        super().__init__(batch_size, seed, shuffle, rank, world, shrink)

    def _collate(self, items):
        T = self.seq_len
        rows = np.empty((len(items), T + 1), dtype=np.int32)
        for r, item in enumerate(items):
            shard = int(np.searchsorted(self._starts, item, side="right") - 1)
            off = (item - self._starts[shard]) * T
            rows[r] = self.data.tokens[shard][off : off + T + 1]
        return rows[:, :-1], rows[:, 1:], np.ones((len(items), T), dtype=np.float32)


class SFTBatches(_Batches):
    def __init__(self, data_dir, split, batch_size, seq_len, seed=0, shuffle=True, rank=0, world=1, pad_id=0,
                 bucket="none", bucket_window=32, pad_multiple=32, shrink=False):
        self.data, self.seq_len, self.pad_id = _Shards(data_dir, split), seq_len, pad_id
        self.pad_multiple = pad_multiple
        if self.data.masks[0] is None:
            raise ValueError(f"{data_dir}: not an SFT dataset (no loss masks)")
        docs = [len(ix) - 1 for ix in self.data.index]
        self._starts = np.cumsum([0] + docs)
        self.num_items = int(self._starts[-1])
        lengths = np.concatenate([np.diff(ix) for ix in self.data.index])
        self.truncated = int((lengths > seq_len + 1).sum())
        if self.num_items and not self._label_counts().any():
            raise ValueError(
                f"{data_dir} ({split}): no row has an assistant token within its first seq_len + 1 = {seq_len + 1} "
                f"tokens (the rows are up to {int(lengths.max())} tokens and training cuts them there), so there "
                "is nothing to learn: raise seq_len, or lower the data's max_tokens to at most seq_len + 1 (rows "
                "whose kept part has no assistant token are then dropped)")
        if bucket not in ("none", "length", "labels"):
            raise ValueError(f"bucket must be none, length or labels, not {bucket!r}")
        if bucket != "none":
            self.bucket_window = bucket_window
            self.bucket_keys = np.minimum(lengths, seq_len + 1) if bucket == "length" else self._label_counts()
        super().__init__(batch_size, seed, shuffle, rank, world, shrink)

    def _label_counts(self) -> np.ndarray:
        """Trainable tokens per row, after truncation to seq_len + 1."""
        counts = []
        for ix, mask in zip(self.data.index, self.data.masks):
            csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            ends = np.minimum(ix[1:], ix[:-1] + self.seq_len + 1)
            counts.append(csum[ends] - csum[ix[:-1]])
        return np.concatenate(counts)

    def _collate(self, items):
        docs = []
        for item in items:
            shard = int(np.searchsorted(self._starts, item, side="right") - 1)
            lo, hi = self.data.index[shard][item - self._starts[shard] : item - self._starts[shard] + 2]
            docs.append((self.data.tokens[shard][lo:hi], self.data.masks[shard][lo:hi]))
        return collate_sft(docs, self.seq_len, self.pad_multiple, self.pad_id)


def collate_sft(docs, seq_len: int, pad_multiple: int, pad_id: int):
    """(inputs, targets, loss mask) of rows [(tokens, mask), ...]: each cut to seq_len + 1 tokens,
    right-padded to the longest row rounded up to a multiple of `pad_multiple` (at most seq_len)."""
    docs = [(t[: seq_len + 1], m[: seq_len + 1]) for t, m in docs]
    longest = max(len(t) for t, _ in docs) - 1
    width = min(seq_len, -(-longest // pad_multiple) * pad_multiple)
    ids = np.full((len(docs), width + 1), pad_id, dtype=np.int32)
    mask = np.zeros((len(docs), width + 1), dtype=np.float32)
    for r, (t, m) in enumerate(docs):
        ids[r, : len(t)] = t
        mask[r, : len(m)] = m
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def open_batches(data_dir, split, batch_size, seq_len, seed=0, shuffle=True, rank=0, world=1, pad_id=0,
                 bucket="none", bucket_window=32, pad_multiple=32, shrink=False):
    """PackedBatches or SFTBatches, whichever the dataset's manifest says it is.

    Bucketing and padding options apply to SFT data; packed pretraining rows are all seq_len long.
    `shrink` (evaluation): a split with fewer items than one batch gets smaller batches instead of
    an error. The train split of a mixture (mlxcore/data/mixture.py) gives `MixedBatches`.
    """
    manifest = read_manifest(data_dir, "tokens")
    if split == "train" and "mixture" in manifest:
        if bucket != "none":
            raise mixture.MixError("bucketing (bucket: length / labels) is not available on a mixture yet; set bucket: none")
        part = lambda d: open_batches(d, "train", 1, seq_len, shuffle=False, pad_id=pad_id, pad_multiple=pad_multiple)  # noqa: E731
        return mixture.open_mixture(data_dir, manifest, part, batch_size, seed, shuffle, rank, world, pad_id)
    task = manifest["task"]
    if task == "sft":
        return SFTBatches(data_dir, split, batch_size, seq_len, seed, shuffle, rank, world, pad_id,
                          bucket, bucket_window, pad_multiple, shrink)
    return PackedBatches(data_dir, split, batch_size, seq_len, seed, shuffle, rank, world, shrink)
