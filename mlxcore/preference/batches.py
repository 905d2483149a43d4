"""Batches of preference examples, addressed by a resumable cursor like every other batch source.

An example is a prompt and its R responses (pairs: chosen, rejected). Each response becomes one
row `prompt + response`, right-padded to the batch's longest row rounded up to `pad_multiple`
(at most seq_len); the loss mask covers the reply's targets only (not the template's tail after
its end-of-turn token, which a reward model reads). A batch is a dict:
  inputs, targets  int32 [B*R, W]   (rows of example i: i*R .. i*R+R-1)
  mask             float32 [B*R, W] (1 on response targets)
  full, last       int32 [B*R, W+1], [B*R]: the unshifted rows and each one's last real token
                   (what a reward model scores)
  ref              float32 [B*R]    the reference model's log-prob sums, when given
  target           float32 [B]      KTO label (1 desirable) / scored rows' reward / 0
The epoch order, resume and data-parallel slicing are `loader._Batches`'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxcore.data.loader import _Batches
from mlxcore.preference.data import Examples


class PreferenceBatches(_Batches):
    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1, pad_id: int = 0, pad_multiple: int = 32,
                 reference: np.ndarray | None = None, shrink: bool = False):
        self.data = Examples(data_dir, split)
        self.seq_len, self.pad_id, self.pad_multiple = seq_len, pad_id, pad_multiple
        self.num_items = len(self.data)
        if reference is not None and len(reference) != self.num_items * self.data.r:
            raise ValueError(f"{data_dir} ({split}): {len(reference)} reference log-probs for "
                             f"{self.num_items * self.data.r} responses; the reference was computed on other data")
        self.reference = reference
        super().__init__(batch_size, seed, shuffle, rank, world, shrink)

    def _collate(self, items) -> dict:
        return self.collate(items)

    def collate(self, items) -> dict:
        r, d = self.data.r, self.data
        rows = [(d.prompt_ids(i), *d.response_ids(i, j)) for i in items for j in range(r)]
        longest = max(len(p) + len(s) for p, s, _ in rows) - 1
        width = max(1, min(self.seq_len, -(-longest // self.pad_multiple) * self.pad_multiple))
        ids = np.full((len(rows), width + 1), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width + 1), dtype=np.float32)
        last = np.zeros(len(rows), dtype=np.int32)
        for k, (p, s, trained) in enumerate(rows):
            seq = np.concatenate([p, s])[: width + 1]
            ids[k, : len(seq)] = seq
            mask[k, len(p): min(len(p) + trained, len(seq))] = 1.0  # the reply, not the template's tail
            last[k] = len(seq) - 1
        idx = np.asarray(items, dtype=np.int64)
        batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask[:, 1:], "full": ids, "last": last,
                 "target": d.target[idx].astype(np.float32)}
        if self.reference is not None:
            batch["ref"] = self.reference[(idx[:, None] * r + np.arange(r)).reshape(-1)].astype(np.float32)
        return batch

    def in_order(self, batch_size: int):
        """Every example once, in file order, in batches (the last one may be smaller)."""
        for start in range(0, self.num_items, batch_size):
            yield self.collate(list(range(start, min(start + batch_size, self.num_items))))
