"""SFT bucketing: every row exactly once per epoch, less padding, rank slices, label counts."""

import numpy as np
import pytest

from mlxcore.data.loader import SFTBatches


def _rows(batches: SFTBatches, epoch: int = 0) -> list[tuple]:
    """Every (tokens, mask) row an epoch yields, padding stripped."""
    rows, cursor = [], {"epoch": epoch, "index": 0}
    for _ in range(batches.batches_per_epoch):
        (x, y, m), cursor = batches.next(cursor)
        for xi, yi, mi in zip(x, y, m):
            full = np.concatenate([xi[:1], yi])
            keep = len(full) - np.argmax((full != batches.pad_id)[::-1]) if (full != batches.pad_id).any() else 0
            rows.append((tuple(full[:keep]), float(mi.sum())))
    return rows


def _padding(batches: SFTBatches) -> int:
    cursor, pad = {"epoch": 0, "index": 0}, 0
    for _ in range(batches.batches_per_epoch):
        (x, _, _), cursor = batches.next(cursor)
        pad += int((x == batches.pad_id).sum())
    return pad


@pytest.mark.parametrize("bucket", ["length", "labels"])
def test_bucketing_keeps_every_row_and_token_exactly_once(small_data, bucket):
    plain = SFTBatches(small_data["sft"], "train", 8, 64, seed=3, pad_id=0)
    bucketed = SFTBatches(small_data["sft"], "train", 8, 64, seed=3, pad_id=0, bucket=bucket, bucket_window=8)
    a, b = _rows(plain), _rows(bucketed)
    assert len(a) == len(b) == plain.batches_per_epoch * 8
    assert sorted(a) == sorted(b)  # the same rows (tokens and label counts), each once
    assert sum(len(r[0]) for r in a) == sum(len(r[0]) for r in b)
    assert sum(r[1] for r in a) == sum(r[1] for r in b)
    assert a != b


def test_length_buckets_cut_padding(small_data):
    kw = dict(batch_size=8, seq_len=128, seed=0, pad_id=0, pad_multiple=8)
    plain = SFTBatches(small_data["sft"], "train", **kw)
    bucketed = SFTBatches(small_data["sft"], "train", bucket="length", bucket_window=16, **kw)
    assert _padding(bucketed) < 0.5 * _padding(plain), (_padding(bucketed), _padding(plain))


def test_label_buckets_group_rows_by_trainable_tokens(small_data):
    b = SFTBatches(small_data["sft"], "train", 8, 64, seed=0, pad_id=0, bucket="labels", bucket_window=1000)
    cursor, spreads = {"epoch": 0, "index": 0}, []
    for _ in range(b.batches_per_epoch):
        (_, _, m), cursor = b.next(cursor)
        counts = m.sum(axis=1)
        spreads.append(counts.max() - counts.min())
    plain = SFTBatches(small_data["sft"], "train", 8, 64, seed=0, pad_id=0)
    cursor, plain_spreads = {"epoch": 0, "index": 0}, []
    for _ in range(plain.batches_per_epoch):
        (_, _, m), cursor = plain.next(cursor)
        plain_spreads.append(m.sum(axis=1).max() - m.sum(axis=1).min())
    assert np.mean(spreads) < 0.5 * np.mean(plain_spreads)


def test_bucketed_epochs_differ_and_ranks_split_each_global_batch(small_data):
    kw = dict(seed=1, pad_id=0, bucket="length", bucket_window=4)
    one = SFTBatches(small_data["sft"], "train", 8, 64, **kw)
    r0 = SFTBatches(small_data["sft"], "train", 4, 64, rank=0, world=2, **kw)
    r1 = SFTBatches(small_data["sft"], "train", 4, 64, rank=1, world=2, **kw)
    rows = lambda b: sorted(tuple(np.concatenate([x[:1], y])[np.concatenate([x[:1], y]) != 0])  # noqa: E731
                            for x, y in zip(*b.next()[0][:2]))
    assert rows(one) == sorted(rows(r0) + rows(r1))
    assert _rows(one, 0) != _rows(one, 1)


def test_rows_whose_replies_all_lie_past_seq_len_fail_instead_of_training_on_nothing(small_data, tmp_path):
    """With data max_tokens above seq_len + 1, training cuts every row at seq_len + 1; when no
    reply starts before that cut, every loss mask is empty and the run "trained" at loss 0.000."""
    import json

    from mlxcore.data import pretokenize

    rows = [{"messages": [{"role": "user", "content": " ".join(["word"] * 60) + f" {i}"},
                          {"role": "assistant", "content": "ok"}]} for i in range(4)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = tmp_path / "long.jsonl"
    pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "sft", tmp_path / "out", max_tokens=512,
                            progress_bar=False)
    with pytest.raises(ValueError, match=r"no row has an assistant token within its first seq_len \+ 1 = 17 tokens"):
        SFTBatches(tmp_path / "out", "train", 2, seq_len=16)
    assert SFTBatches(tmp_path / "out", "train", 2, seq_len=256)._label_counts().min() > 0
