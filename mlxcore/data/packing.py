"""SFT packing: several conversations in one `seq_len` sequence, each trained as if it were alone.

Rows are cut to seq_len + 1 tokens (as `SFTBatches` cuts them), so a row of n + 1 tokens gives n
(input, target) positions. Packs of seq_len positions are filled by **best-fit decreasing**: the
rows in order of decreasing size (ties: file order), each into the open pack with the least room
that still holds it (ties: the older pack), else into a new pack. The packing is a pure function
of the row lengths and seq_len, computed once per split (GSM8K's 7,473 rows: ~0.1 s); every
epoch then visits the packs in a fresh permutation, and the cursor `{epoch, index}` counts packs,
so checkpoints resume exactly as with every other batch source (`loader._Batches`).

A batch is `(inputs, targets, loss mask, segment ids)`, each `[batch_size, seq_len]`: a pack's
rows back to back, each with its own next-token pairs (no target ever crosses a row boundary),
then padding (pad id, mask 0). Segment ids are 1..k for the pack's k rows and 0 on the padding;
`mlxcore.models.segments` turns them into attention within each row and RoPE positions that
restart at 0, so a row's loss and gradients equal its unpacked ones (tests: 1e-5 in float32).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from mlxcore.data.loader import _Batches, _Shards
from mlxcore.io import read_manifest


def best_fit_decreasing(sizes, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) holding at most `capacity` each, by best-fit decreasing.

    Items of size 0 are left out; an item larger than `capacity` is an error."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and sizes.max() > capacity:
        raise ValueError(f"an item of size {int(sizes.max())} does not fit a bin of {capacity}")
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for item in np.argsort(-sizes, kind="stable"):
        size = int(sizes[item])
        if size <= 0:
            break  # sorted: the rest are empty too
        k = bisect.bisect_left(open_bins, (size, -1))
        if k == len(open_bins):
            bins.append([int(item)])
            room, number = capacity - size, len(bins) - 1
        else:
            room, number = open_bins.pop(k)
            bins[number].append(int(item))
            room -= size
        if room > 0:
            bisect.insort(open_bins, (room, number))
    return bins


def collate_packs(packs, seq_len: int, pad_id: int):
    """(inputs, targets, loss mask, segment ids), each [len(packs), seq_len], of packs given as
    lists of (tokens, mask) rows (each already at most seq_len + 1 tokens, together at most
    seq_len positions)."""
    ids = np.full((len(packs), seq_len), pad_id, dtype=np.int32)
    targets = np.full((len(packs), seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(packs), seq_len), dtype=np.float32)
    segments = np.zeros((len(packs), seq_len), dtype=np.int32)
    for p, rows in enumerate(packs):
        at = 0
        for r, (tokens, m) in enumerate(rows):
            n = len(tokens) - 1
            if at + n > seq_len:
                raise ValueError(f"pack {p} holds {at + n} positions, more than seq_len={seq_len}")
            ids[p, at : at + n] = tokens[:-1]
            targets[p, at : at + n] = tokens[1:]
            mask[p, at : at + n] = m[1:]
            segments[p, at : at + n] = r + 1
            at += n
    return ids, targets, mask, segments


class PackedSFTBatches(_Batches):
    """SFT batches of `batch_size` packs (module docstring); the same cursor API as `SFTBatches`."""

    def __init__(self, data_dir, split, batch_size, seq_len, seed=0, shuffle=True, rank=0, world=1, pad_id=0,
                 shrink=False):
        self.data, self.seq_len, self.pad_id = _Shards(data_dir, split), seq_len, pad_id
        if self.data.masks[0] is None:
            raise ValueError(f"{data_dir}: not an SFT dataset (no loss masks); packing applies to SFT data")
        self._starts = np.cumsum([0] + [len(ix) - 1 for ix in self.data.index])
        lengths = np.concatenate([np.diff(ix) for ix in self.data.index])
        self.truncated = int((lengths > seq_len + 1).sum())
        self.sizes = np.minimum(lengths, seq_len + 1) - 1  # positions each row fills
        packs = best_fit_decreasing(self.sizes, seq_len)
        self._rows = np.array([r for p in packs for r in p], dtype=np.int64)
        self._offsets = np.cumsum([0] + [len(p) for p in packs])
        self.num_items = len(packs)
        self.num_rows = len(self._rows)
        self.fill = float(self.sizes.sum() / max(1, self.num_items * seq_len))  # non-pad share of all packs
        super().__init__(batch_size, seed, shuffle, rank, world, shrink)

    def pack_rows(self, pack: int) -> np.ndarray:
        """The row numbers (file order over the split's shards) in pack `pack`."""
        return self._rows[self._offsets[pack] : self._offsets[pack + 1]]

    def _row(self, item: int):
        shard = int(np.searchsorted(self._starts, item, side="right") - 1)
        local = item - self._starts[shard]
        lo, hi = self.data.index[shard][local : local + 2]
        hi = min(hi, lo + self.seq_len + 1)
        return self.data.tokens[shard][lo:hi], self.data.masks[shard][lo:hi]

    def _collate(self, items):
        return collate_packs([[self._row(int(r)) for r in self.pack_rows(int(p))] for p in items],
                             self.seq_len, self.pad_id)


def open_packed(data_dir, split, batch_size, seq_len, seed=0, shuffle=True, rank=0, world=1, pad_id=0,
                shrink=False) -> PackedSFTBatches:
    """`PackedSFTBatches` of an SFT dataset; a clear error for pretraining data (already packed)."""
    task = read_manifest(Path(data_dir), "tokens")["task"]
    if task != "sft":
        raise ValueError(f"{data_dir}: pack applies to SFT data; {task} data is already packed into "
                         "seq_len windows (set pack: false)")
    return PackedSFTBatches(data_dir, split, batch_size, seq_len, seed, shuffle, rank, world, pad_id, shrink)
