"""GrowingRows: SFT batches from a rows file that is still being written."""

import threading

import numpy as np
import pytest

from mlxcore.config import StreamConfig
from mlxcore.data.rows import RowStore, make_row
from mlxcore.distill.student import GenerationFailed, GrowingRows, RowEncoder, generation_state, mark_generation


def _row(i: int) -> dict:
    return make_row(messages=[{"role": "user", "content": f"q{i}"}], reply=f"a{i}", id=f"r{i}", category="math",
                    teacher="t", verified=True)


def _encode(rows):  # row i -> tokens [i+1, i+1, i+1], all trainable: batches say which rows they hold
    return [(np.full(3, int(r["meta"]["id"][1:]) + 1, dtype=np.int32), np.ones(3, dtype=np.uint8)) for r in rows]


def _rows_in(batch) -> list[int]:
    x, _, _ = batch
    return [int(v) - 1 for v in x[:, 0]]


def _write(path, lo, hi):
    with RowStore(path) as store:
        for i in range(lo, hi):
            store.append(_row(i))


def _source(path, state="running", **stream):
    cfg = StreamConfig(**{"val_rows": 4, "cold_start_rows": 8, "epochs": 2, "poll_s": 0.01, **stream})
    return GrowingRows(path, _encode, batch_size=4, seq_len=8, stream=cfg, state=lambda: (state, None),
                       pad_multiple=1, seed=1)


def test_fresh_rows_first_in_file_order_then_replay_passes(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, 0, 40)
    src = _source(path, state="done")
    val = src.val().take(10)
    assert [_rows_in(b) for b in val] == [[0, 1, 2, 3]]  # the first val_rows rows, never trained on
    cursor, seen = None, []
    for _ in range(9):  # 36 train rows = 9 batches of fresh rows
        batch, cursor = src.next(cursor)
        seen += _rows_in(batch)
    assert seen == list(range(4, 40))  # each train row once, in file order
    replay = []
    for _ in range(9):  # then one pass over all 36 in a permutation
        batch, cursor = src.next(cursor)
        replay += _rows_in(batch)
    assert sorted(replay) == list(range(4, 40)) and replay != seen


def test_a_batch_tops_up_fresh_rows_with_replayed_ones_and_resume_is_exact(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, 0, 14)  # 10 train rows: 2 batches of fresh rows and a half
    src = _source(path, state="done")
    src.val().take(1)
    cursor, batches = None, []
    for _ in range(6):
        batch, cursor = src.next(cursor)
        batches.append(_rows_in(batch))
        if len(batches) == 3:
            saved = dict(cursor)
    assert batches[2][:2] == [12, 13] and set(batches[2][2:]) <= set(range(4, 12))  # fresh, then replay
    again = _source(path, state="done")  # a resumed process: new reader, the saved cursor
    again.val().take(1)
    cursor = saved
    for want in batches[3:]:
        batch, cursor = again.next(cursor)
        assert _rows_in(batch) == want


def test_cold_start_and_pace_wait_for_rows_while_generation_runs(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, 0, 6)
    state = {"s": "running", "polls": 0}
    polled = threading.Event()

    def generation_state():  # polled by the reader each time it finds too few rows
        state["polls"] += 1
        if state["polls"] >= 3:
            polled.set()
        return state["s"], None

    def write_after_polls(lo, hi):  # the writer waits for the reader to be waiting (no clock)
        polled.wait()
        _write(path, lo, hi)

    cfg = StreamConfig(val_rows=4, cold_start_rows=8, epochs=1, poll_s=0.01)
    src = GrowingRows(path, _encode, batch_size=4, seq_len=8, stream=cfg, state=generation_state, pad_multiple=1)
    writer = threading.Thread(target=write_after_polls, args=(6, 12))
    writer.start()
    src.val().take(1)  # needs 4 + 8 rows: waits (polling) until the writer adds them
    writer.join()
    assert state["polls"] >= 3 and src.num_train == 8
    cursor = None
    for _ in range(2):
        _, cursor = src.next(cursor)
    state["polls"], _ = 0, polled.clear()
    writer = threading.Thread(target=write_after_polls, args=(12, 16))
    writer.start()
    batch, cursor = src.next(cursor)  # epochs=1: batch 3 needs 12 train rows
    writer.join()
    assert state["polls"] >= 3 and _rows_in(batch) == [12, 13, 14, 15]
    state["s"], state["polls"] = "done", 0  # generation over: no more waiting, replay only
    for _ in range(5):
        batch, cursor = src.next(cursor)
    assert state["polls"] <= 1 and src.done and src.stats()["train_rows"] == 12  # asked once, never waited


def test_a_failed_or_silent_generator_stops_training(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, 0, 6)
    src = _source(path, state="failed")
    with pytest.raises(GenerationFailed, match="generation failed"):
        src.val().take(1)
    src = _source(path, stall_timeout_s=0.2)
    with pytest.raises(GenerationFailed, match="no new row for"):  # gives up instead of waiting forever
        src.val().take(1)
    _write(path, 6, 8)
    src = _source(path, state="done")  # ended with fewer rows than the cold start: train on what there is
    assert len(src.val().take(1)) == 1 and src.num_train == 4


def test_generation_state_belongs_to_one_run(tmp_path):
    mark_generation(tmp_path, "run-1", "failed", error="boom")
    assert generation_state(tmp_path, "run-1") == ("failed", "boom")
    assert generation_state(tmp_path, "run-2") == ("running", None)  # a stale state from an earlier run
    (tmp_path / "manifest.json").write_text('{"kind": "distill-rows"}')
    assert generation_state(tmp_path, "run-2") == ("done", None)


def test_row_encoder_masks_exactly_the_reply(small_data):
    from mlxcore.data.tokenizer import load

    enc = RowEncoder(small_data["tok"])
    tok = load(small_data["tok"])
    row = _row(7) | {"conversations": [{"role": "user", "content": "What is 2+3?"},
                                       {"role": "assistant", "content": "Answer: 5"}]}
    [(ids, mask)] = enc([row])
    assert tok.decode(ids[mask.astype(bool)]) == "Answer: 5<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template(row["conversations"], tokenize=False)
