"""Data: synthetic tasks, tokenizers, pretokenized shards + masks, resumable loaders, bad input."""

import json
import shutil

import numpy as np
import pytest

from mlxcore.config import SyntheticConfig, TokenizerConfig
from mlxcore.data import loader, pretokenize, synthetic, tokenizer as tokenizers
from mlxcore.data.records import DataError
from mlxcore.io import read_manifest


def _rows(path):
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------ synthetic


def test_synthetic_examples_are_correct():
    for i in range(400):
        ex = synthetic.example(0, "t", i, ["copy", "sort", "arithmetic", "json"])  # the rest: test_synthetic_mix.py
        body = ex["prompt"].split(":", 1)[1].strip()  # copy: the string on its own line
        if ex["task"] == "copy":
            assert ex["answer"] == body
        elif ex["task"] == "sort":
            assert ex["answer"].split() == [str(v) for v in sorted(map(int, body.split()))]
        elif ex["task"] == "arithmetic":
            a, op, b = body.split()
            assert int(ex["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        else:
            pairs = dict(p.split("=") for p in body.split(", "))
            assert {k: str(v) for k, v in json.loads(ex["answer"]).items()} == pairs


def test_synthetic_dataset_is_a_function_of_its_config(tmp_path):
    cfg = SyntheticConfig(pretrain_docs=50, sft_examples=30, val_examples=10, seed=7)
    a = synthetic.write_dataset(cfg, tmp_path / "a")
    b = synthetic.write_dataset(cfg, tmp_path / "b")
    c = synthetic.write_dataset(cfg.model_copy(update={"seed": 8}), tmp_path / "c")
    assert a["digest"] == b["digest"] != c["digest"]
    assert len(_rows(tmp_path / "a/sft/train.jsonl")) == 30 and len(_rows(tmp_path / "a/pretrain/val.jsonl")) == 10
    only_sort = synthetic.write_dataset(cfg.model_copy(update={"tasks": ["sort"]}), tmp_path / "d")
    assert {r["meta"]["task"] for r in _rows(tmp_path / "d/sft/train.jsonl")} == {"sort"}
    assert only_sort["config"]["tasks"] == ["sort"]


# ------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_layout_specials_template_and_digits(small_data):
    tok = tokenizers.load(small_data["tok"])
    assert len(tok) == 512 == read_manifest(small_data["tok"])["vocab_size"]
    assert tokenizers.special_ids(tok) == {"bos": 1, "eos": 2, "pad": 0, "separator": 0}
    msgs = [{"role": "user", "content": "Compute: 12 + 7"}, {"role": "assistant", "content": "19"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nCompute: 12 + 7<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n"
    ids = tok("31415", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == list("31415")  # digits are split one by one
    text = "Sort: 9 12 3\n3 9 12"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_local_tokenizer_dir_is_copied_and_used(test_data, small_data, tmp_path):
    src = test_data / "minimind_tokenizer"
    manifest = tokenizers.load_or_train(TokenizerConfig(path=str(src)), small_data["raw"], tmp_path / "tok")
    assert manifest["vocab_size"] == 6400
    out = pretokenize.pretokenize(small_data["raw"], tmp_path / "tok", "sft", tmp_path / "sft")
    assert out["dtype"] == "uint16" and out["vocab_size"] == 6400
    _assert_masks_are_answers(tmp_path / "sft", small_data["raw"], tokenizers.load(tmp_path / "tok"))


def test_local_tokenizer_dir_that_is_not_one_fails_clearly(small_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizers.load_or_train(TokenizerConfig(path=str(tmp_path)), small_data["raw"], tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# ------------------------------------------------------------------ pretokenize


def _split_docs(data_dir, split="val"):
    m = read_manifest(data_dir)
    shard = m["splits"][split]["shards"][0]["name"]
    toks = np.fromfile(data_dir / split / f"{shard}.tokens.bin", dtype=m["dtype"])
    index = np.fromfile(data_dir / split / f"{shard}.index.bin", dtype=np.int64)
    mask_path = data_dir / split / f"{shard}.mask.bin"
    mask = np.fromfile(mask_path, dtype=np.uint8) if mask_path.exists() else None
    return toks, index, mask


def _assert_masks_are_answers(data_dir, raw_dir, tok):
    toks, index, mask = _split_docs(data_dir)
    rows = _rows(raw_dir / "sft/val.jsonl")
    assert len(index) - 1 == len(rows)
    for i, row in enumerate(rows):
        lo, hi = index[i], index[i + 1]
        learned = tok.decode(toks[lo:hi][mask[lo:hi] == 1])
        assert learned == row["conversations"][1]["content"] + tok.eos_token
        assert tok.decode(toks[lo:hi]) == tok.apply_chat_template(row["conversations"], tokenize=False)


def test_sft_loss_mask_covers_exactly_the_assistant_replies(small_data):
    _assert_masks_are_answers(small_data["sft"], small_data["raw"], tokenizers.load(small_data["tok"]))


def test_pretrain_shards_hold_each_document_then_the_separator(small_data):
    tok = tokenizers.load(small_data["tok"])
    toks, index, mask = _split_docs(small_data["pretrain"])
    assert mask is None and toks.dtype == np.uint16
    for i, row in enumerate(_rows(small_data["raw"] / "pretrain/val.jsonl")):
        doc = toks[index[i] : index[i + 1]]
        assert doc[-1] == 0 and tok.decode(doc[:-1]) == row["text"]


def test_pretokenize_digest_depends_on_content_not_location(small_data, tmp_path):
    again = pretokenize.pretokenize(small_data["raw"], small_data["tok"], "sft", tmp_path / "elsewhere")
    assert again["digest"] == read_manifest(small_data["sft"])["digest"]


def test_documents_roll_over_to_new_shards(small_data, tmp_path, monkeypatch):
    monkeypatch.setattr(pretokenize, "SHARD_TOKENS", 5000)
    m = pretokenize.pretokenize(small_data["raw"], small_data["tok"], "pretrain", tmp_path / "pt")
    single = read_manifest(small_data["pretrain"])["splits"]["train"]
    assert len(m["splits"]["train"]["shards"]) > 3
    assert (m["splits"]["train"]["num_tokens"], m["splits"]["train"]["num_docs"]) == (single["num_tokens"], single["num_docs"])
    batches = loader.PackedBatches(tmp_path / "pt", "train", 4, 32, shuffle=False)
    x, y, _ = batches.next()[0]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


# ------------------------------------------------------------------ loaders


def test_cursor_resume_gives_the_same_batches(small_data):
    def stream(start, n):
        b, cursor, out = loader.open_batches(small_data["pretrain"], "train", 4, 32, seed=5), start, []
        for _ in range(n):
            batch, cursor = b.next(cursor)
            out.append(batch[0])
        return out, cursor

    straight, _ = stream(None, 9)
    first, cursor = stream(None, 4)
    rest, _ = stream(json.loads(json.dumps(cursor)), 5)  # the cursor survives a JSON round trip
    for a, b in zip(straight, first + rest):
        np.testing.assert_array_equal(a, b)


def test_each_epoch_visits_every_window_once_in_a_new_order(small_data):
    b = loader.PackedBatches(small_data["pretrain"], "train", 4, 32, seed=1)
    n, cursor, seen = b.batches_per_epoch, None, []
    for _ in range(2 * n):
        (x, _, _), cursor = b.next(cursor)
        seen.append(x)
    epoch0, epoch1 = np.concatenate(seen[:n]), np.concatenate(seen[n:])
    key = lambda rows: sorted(map(bytes, rows))  # noqa: E731
    # every window at most once per epoch; a remainder smaller than a batch is left out of each epoch
    # (a different one each time), the rest is the same set of windows in a new order
    left_out = b.num_items - len(epoch0)
    assert 0 <= left_out < 4 and len(set(map(bytes, epoch0))) == len(epoch0) == len(set(map(bytes, epoch1)))
    assert len(set(map(bytes, epoch0)) & set(map(bytes, epoch1))) >= len(epoch0) - left_out
    assert not np.array_equal(epoch0, epoch1)


def test_ranks_get_disjoint_slices_of_the_global_batch(small_data):
    whole = loader.PackedBatches(small_data["pretrain"], "train", 8, 32, seed=2).next()[0][0]
    parts = [loader.PackedBatches(small_data["pretrain"], "train", 4, 32, seed=2, rank=r, world=2).next()[0][0] for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_sft_batches_pad_to_a_multiple_of_32_and_mask_the_padding(small_data):
    b = loader.open_batches(small_data["sft"], "train", 8, 256, seed=0)
    (x, y, m), _ = b.next()
    assert x.shape[1] % 32 == 0 and x.shape == y.shape == m.shape
    lengths = (y != 0).sum(1)
    for row, n in zip(m, lengths):
        assert row[n:].sum() == 0 and row[:n].sum() > 0


def test_too_little_data_for_one_batch_is_explained_unless_evaluating(small_data):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        loader.open_batches(small_data["pretrain"], "val", 4096, 64)
    small = loader.open_batches(small_data["sft"], "val", 4096, 64, shrink=True)  # held-out: smaller batches
    assert small.batch_size == 80 and len(small.take(10)) == 1


# ------------------------------------------------------------------ bad input


BAD = {
    "malformed.jsonl": ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"conversations": [\n', ":2: invalid JSON"),
    "missing.jsonl": ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "hi"}\n', ":2: expected a non-empty 'conversations' or 'messages' list"),
    "empty.jsonl": ("", ": no rows (empty file)"),
    "assistant_first.jsonl": ('{"messages": [{"role": "assistant", "content": "yo"}]}\n', ":1: the first message is from the assistant"),
    "bad_role.jsonl": ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', ":1: message 0 needs 'role'"),
    "not_object.jsonl": ('[1, 2]\n', ":1: expected a JSON object"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_sft_rows_fail_naming_file_and_line_and_leave_nothing(small_data, tmp_path, name):
    text, expect = BAD[name]
    raw = tmp_path / "raw"
    shutil.copytree(small_data["raw"], raw)
    (raw / "sft/train.jsonl").write_text(text)
    with pytest.raises(DataError) as err:
        pretokenize.pretokenize(raw, small_data["tok"], "sft", tmp_path / "out")
    assert f"{raw / 'sft/train.jsonl'}{expect}" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no temp dir


def test_pretrain_row_without_text(small_data, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(small_data["raw"], raw)
    with open(raw / "pretrain/val.jsonl", "a") as f:
        f.write('{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"val.jsonl:81: missing field 'text' \(text format\)"):
        pretokenize.pretokenize(raw, small_data["tok"], "pretrain", tmp_path / "out")
    assert not (tmp_path / "out").exists()
