"""Weighted mixtures of pretokenized sources: exact proportions and a resumable cursor per source.

A mixture is a directory (the `mix` stage) whose manifest names one pretokenized dir per source
(each tokenized on its own, so a new weight re-tokenizes nothing), with its weight and `epochs`.
Its `train` and `val` splits reference those dirs' shards, so the held-out split of a mixture is
every source's held-out rows and `documents` / evaluation read it like any other dataset.

Drawing (`MixedBatches`): the sequences of the global stream (packed windows of seq_len + 1
tokens, or SFT rows) are dealt to the sources one at a time, each to the source furthest behind
its share: sequence n goes to the source i with the largest (n + 1) * w_i / W - c_i, where c_i
counts what it has had so far (ties go to the earlier source), computed in integers from the
weights as exact decimal fractions. A source is then never a whole sequence ahead of its share (it
is dealt one only while behind) and, measured, at most about one behind (under 1 for up to 5
sources, 1.01 for 6), at every point of the stream: any window of batches holds the weights'
proportions to about one row per source. Which sequence of a source comes next is its own
cursor: a permutation of the source per pass (epoch), drawn from (seed, source index, epoch). A
checkpoint saves the count drawn per source (with its epoch, index in the pass and tokens), so a
resumed run draws exactly what the uninterrupted one would, and each rank of a data-parallel run
deals the same global batch and takes its slice.

For pretraining every sequence is seq_len tokens, so shares of sequences are shares of tokens;
for SFT they are shares of rows (conversations differ in length; the cursor counts both).

Over- and under-sampling: a source's `epochs` caps the passes over it (0.5: at most a seeded half
of it; 3: each row at most three times). A run whose steps and weights would need more passes
fails before its first step (`check_budget`), naming the source, the passes it needs and what it
may take; nothing is repeated more than stated, and no weight is changed silently. With no
`epochs`, a source is repeated as often as its weight asks (as a single dataset is).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from mlxcore import lineage
from mlxcore.io import atomic_dir, read_manifest, write_manifest

_SAME = ("task", "vocab_size", "dtype", "separator_id")


class MixError(ValueError):
    """A mixture cannot be built or drawn as configured; the message names the source."""


def quotas(weights: list[float]) -> list[int]:
    """The weights as integers in the same exact proportions (0.7, 0.3 -> 7, 3)."""
    fracs = [Fraction(repr(float(w))) for w in weights]
    if any(f < 0 for f in fracs) or sum(fracs) <= 0:
        raise MixError(f"mixture weights must be >= 0 and sum to a positive number, got {weights}")
    scale = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * scale) for f in fracs]
    g = math.gcd(*ints)
    return [q // g for q in ints]


def deal(quota: list[int], counts: list[int], n: int) -> list[int]:
    """The sources of the next `n` sequences after `counts` were drawn (see the module doc)."""
    counts, total = list(counts), sum(quota)
    drawn, out, order = sum(counts), [], range(len(quota))
    for _ in range(n):
        drawn += 1
        i = max(order, key=lambda j: (drawn * quota[j] - counts[j] * total, -j))
        counts[i] += 1
        out.append(i)
    return out


# ---------------------------------------------------------------- the mix stage


def write_mixture(parts: list[dict], out_dir: str | Path) -> dict:
    """Write the mixture dir of `parts`: [{"name", "spec", "weight", "epochs", "data_dir"}], each a
    pretokenized dir of the same kind and tokenizer. Its splits reference their shards (no copy)."""
    out = Path(out_dir)
    if not parts:
        raise MixError("a mixture needs at least one source")
    quotas([p["weight"] for p in parts])  # the weights are usable
    manifests = [read_manifest(p["data_dir"], "tokens") for p in parts]
    first = manifests[0]
    for p, m in zip(parts, manifests):
        for key in _SAME + ("tokenizer",):
            a, b = (m, first) if key != "tokenizer" else (m["config"], first["config"])
            if a.get(key) != b.get(key):
                raise MixError(f"source {p['name']}: {p['data_dir']} has {key} {a.get(key)!r}, "
                               f"{parts[0]['name']} has {b.get(key)!r}; a mixture is one kind, one tokenizer")
    total = sum(p["weight"] for p in parts)
    rels = [os.path.relpath(Path(p["data_dir"]).resolve(), out.resolve()) for p in parts]  # siblings: ../<stage>
    splits, sources, stats, formats = {}, [], {}, {}
    for split in ("train", "val"):
        shards = []
        for rel, m in zip(rels, manifests):
            shards += [{**s, "dir": f"{rel}/{split}"} for s in m["splits"][split]["shards"]]
        splits[split] = {"shards": shards, **{k: sum(s[k] for s in shards)
                                              for k in ("num_tokens", "num_docs", "num_trainable")}}
    for p, m, rel in zip(parts, manifests, rels):
        counts = lambda s: {k: m["splits"][s][k] for k in ("num_docs", "num_tokens", "num_trainable")}  # noqa: E731
        sources.append({"name": p["name"], "spec": p["spec"], "weight": p["weight"], "share": p["weight"] / total,
                        "epochs": p.get("epochs"), "dir": rel, "digest": m["digest"], "train": counts("train"),
                        "val": counts("val"), "stats": m["stats"]})
        for k, v in m["stats"].items():
            stats[k] = stats.get(k, 0) + v
        formats.update({f"{p['name']}/{name}": fmt for name, fmt in m["formats"].items()})
    config = {"kind": first["task"], "sources": [{k: s[k] for k in ("name", "spec", "weight", "epochs", "digest")}
                                                 for s in sources]}
    with atomic_dir(out) as tmp:
        return write_manifest(tmp, "tokens", config, **{k: first[k] for k in _SAME}, splits=splits, stats=stats,
                              formats=formats, mixture={"sources": sources},
                              **lineage.fields(lineage.of_inputs([p["data_dir"] for p in parts])))


# ---------------------------------------------------------------- drawing batches


class MixedBatches:
    """Training batches from a mixture's sources in their weights' proportions (see the module doc).

    `parts` are the sources' own batch streams (`PackedBatches` / `SFTBatches`), used for their
    item counts and collation only; `sources` the mixture manifest's entries, in the same order."""

    def __init__(self, parts: list, sources: list[dict], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, pad_id: int = 0):
        self.parts, self.sources = parts, sources
        self.names = [s["name"] for s in sources]
        self.quota = quotas([s["weight"] for s in sources])
        self.batch_size, self.seed, self.shuffle, self.rank, self.world, self.pad_id = \
            batch_size, seed, shuffle, rank, world, pad_id
        self.sizes = [p.num_items for p in parts]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._tokens = [_item_tokens(p) for p in parts]

    def _item(self, i: int, position: int) -> int:
        """The item of source i that is its `position`-th draw (a fresh permutation each pass)."""
        epoch, index = divmod(position, self.sizes[i])
        if self._perms.get(i, (None,))[0] != epoch:
            n = self.sizes[i]
            perm = np.random.default_rng([self.seed, i, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perms[i] = (epoch, perm)
        return int(self._perms[i][1][index])

    def _start(self, cursor: dict | None) -> tuple[list[int], list[int]]:
        if not cursor or "sources" not in cursor:  # a fresh run (fit starts from {"epoch": 0, "index": 0})
            return [0] * len(self.parts), [0] * len(self.parts)
        saved = [s["name"] for s in cursor["sources"]]
        if saved != self.names:
            raise MixError(f"the checkpoint's data cursor is for sources {saved}, this mixture has {self.names}")
        return [s["rows"] for s in cursor["sources"]], [s["tokens"] for s in cursor["sources"]]

    def next(self, cursor: dict | None = None):
        """The batch at `cursor` (default: the start) and the cursor that follows it."""
        drawn, tokens = self._start(cursor)
        per_step = self.batch_size * self.world
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        picked: list[list[int]] = [[] for _ in self.parts]
        for row, i in enumerate(deal(self.quota, drawn, per_step)):
            item = self._item(i, drawn[i])
            drawn[i] += 1
            t = self._tokens[i]
            tokens[i] += int(t if isinstance(t, int) else t[item])
            if row in mine:
                picked[i].append(item)
        batch = _merge([p._collate(np.array(items)) for p, items in zip(self.parts, picked) if items], self.pad_id)
        return batch, self.cursor(drawn, tokens)

    def cursor(self, drawn: list[int], tokens: list[int]) -> dict:
        return {"rows": sum(drawn), "sources": [
            {"name": name, "rows": d, "epoch": d // n, "index": d % n, "tokens": t}
            for name, d, n, t in zip(self.names, drawn, self.sizes, tokens)]}

    def plan(self, batches: int) -> list[dict]:
        """What `batches` global batches draw from each source: sequences (an upper bound: a source is
        never a whole sequence ahead of its share) and passes over it."""
        rows, total = batches * self.batch_size * self.world, sum(self.quota)
        return [{"name": s["name"], "spec": s.get("spec"), "rows": -(-rows * q // total), "size": n,
                 "passes": -(-rows * q // total) / n, "epochs": s.get("epochs")}
                for s, q, n in zip(self.sources, self.quota, self.sizes)]

    def check_budget(self, batches: int) -> None:
        """Fail if `batches` global batches would take more passes over a source than its `epochs`."""
        over = [p for p in self.plan(batches) if p["epochs"] is not None and p["rows"] > math.floor(p["epochs"] * p["size"] + 1e-9)]
        if over:
            lines = [f"source {p['name']} ({p['spec']}): the weights draw {p['rows']} sequences of its {p['size']}, "
                     f"{p['passes']:.2f} passes, but its epochs is {p['epochs']:g}" for p in over]
            raise MixError(f"{batches} batches of {self.batch_size * self.world} sequences ask more of a source than "
                           "its epochs allow:\n  " + "\n  ".join(lines) + "\nraise its epochs, lower its weight, "
                           "train fewer steps, or give it more data")


def _item_tokens(part) -> int | np.ndarray:
    """Tokens a drawn item puts in a batch: seq_len for a packed window; an SFT row's kept length."""
    if part.data.masks[0] is None:
        return int(part.seq_len)
    lengths = np.concatenate([np.diff(ix) for ix in part.data.index])
    return np.minimum(lengths, part.seq_len + 1) - 1


def _merge(batches: list[tuple], pad_id: int) -> tuple:
    """One batch from the sources' collated parts: rows stacked, narrower parts right-padded (ids with
    `pad_id`, masks with 0), which equals collating all rows at once."""
    if len(batches) == 1:
        return batches[0]
    width = max(b[0].shape[1] for b in batches)
    out = []
    for arrays in zip(*batches):
        padded = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=0 if a.dtype.kind == "f" else pad_id)
                  for a in arrays]
        out.append(np.concatenate(padded))
    return tuple(out)


def open_mixture(data_dir: str | Path, manifest: dict, open_part, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1, pad_id: int = 0) -> MixedBatches:
    """`MixedBatches` of a mixture dir; `open_part(dir)` opens one source's train split (item access)."""
    parts = []
    for s in manifest["mixture"]["sources"]:
        try:
            parts.append(open_part(Path(data_dir) / s["dir"]))
        except (ValueError, FileNotFoundError) as e:
            raise MixError(f"source {s['name']} ({s['spec']}): {e}") from None
    return MixedBatches(parts, manifest["mixture"]["sources"], batch_size, seed, shuffle, rank, world, pad_id)
