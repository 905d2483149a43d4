"""Preference data: every row format read from real files, tokenized to the chat template's tokens
with masks over the replies only, skips counted, bad rows named by file:line, batches resumable."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxcore.config import PreferenceSourceConfig, SyntheticPairsConfig
from mlxcore.data import tokenizer as tokenizers
from mlxcore.data.download import MINIMIND_REPO, DownloadError, HubFile, parse_spec
from mlxcore.data.pretokenize import Holdout
from mlxcore.data.records import BOM, DataError
from mlxcore.io import read_manifest
from mlxcore.preference import data as pref_data
from mlxcore.preference import synthetic as pref_synthetic
from mlxcore.preference.batches import PreferenceBatches
from mlxcore.preference.data import Examples, fit_lengths

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _tokenize(tmp_path, tok_dir, train, val=None, out="out", **kw):
    """pretokenize {train, val} (val defaults to the train files) into tmp_path/out: (manifest, train Examples)."""
    train = train if isinstance(train, list) else [train]
    val = train if val is None else val
    m = pref_data.pretokenize({"train": train, "val": val}, tok_dir, tmp_path / out, progress_bar=False, **kw)
    return m, Examples(tmp_path / out, "train")


def _template_ids(tok, messages) -> list[int]:
    """The tokenizer's own chat template, tokenized, with the generation prompt."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _assert_example(tok, ex, i, prompt, replies):
    """Example i: prompt ids are the template's; each reply's trained tokens are reply + end of turn,
    and what follows them (untrained) is the template's tail."""
    assert ex.prompt_ids(i).tolist() == _template_ids(tok, prompt)
    for j, reply in enumerate(replies):
        ids, trained = ex.response_ids(i, j)
        assert tok.decode(ids[:trained]) == reply + tok.eos_token
        assert tok.decode(ids[trained:]) == "\n"


@pytest.fixture(scope="module")
def tok_dir(small_data):
    return small_data["tok"]


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tokenizers.load(tok_dir)


# ------------------------------------------------------------------ formats, from real files

ASSISTANT_X, ASSISTANT_Y = [A("1 2 3")], [A("3 2 1")]
CASES = {  # name: (rows, source options, detected format, kind, [(prompt messages, replies, target)])
    "pairs": ([{"prompt": "Sort: 3 1 2", "chosen": "1 2 3", "rejected": "1 3 2"}], {},
              "pairs", "pairs", [([U("Sort: 3 1 2")], ["1 2 3", "1 3 2"], 0.0)]),
    "pairs_instruction": ([{"instruction": "Copy: abc", "chosen": "abc", "rejected": "abd"}], {},
                          "pairs", "pairs", [([U("Copy: abc")], ["abc", "abd"], 0.0)]),
    "pairs_question": ([{"question": "What is 2+3?", "chosen": "5", "rejected": "6"}], {},
                       "pairs", "pairs", [([U("What is 2+3?")], ["5", "6"], 0.0)]),
    "pairs_prompt_format": ([{"q": "3 1", "task": "Sort", "chosen": "1 3", "rejected": "3 1"}],
                            {"prompt_format": "{task}: {q}"}, "pairs", "pairs", [([U("Sort: 3 1")], ["1 3", "3 1"], 0.0)]),
    "pairs_prompt_messages": ([{"prompt": [S("Be terse."), U("Sort: 2 1")], "chosen": "1 2", "rejected": "2 1"}], {},
                              "pairs", "pairs", [([S("Be terse."), U("Sort: 2 1")], ["1 2", "2 1"], 0.0)]),
    "pairs_system_prompt": ([{"prompt": "Sort: 2 1", "chosen": "1 2", "rejected": "2 1"}], {"system_prompt": "Be terse."},
                            "pairs", "pairs", [([S("Be terse."), U("Sort: 2 1")], ["1 2", "2 1"], 0.0)]),
    "minimind_dpo": ([{"chosen": [U("Sort: 3 1 2"), A("1 2 3")], "rejected": [U("Sort: 3 1 2"), A("3 2 1")]},
                      {"chosen": [S("sys"), U("hi"), A("hello")], "rejected": [S("sys"), U("hi"), A("go away")]}], {},
                     "pair-messages", "pairs", [([U("Sort: 3 1 2")], ["1 2 3", "3 2 1"], 0.0),
                                                ([S("sys"), U("hi")], ["hello", "go away"], 0.0)]),
    "multi_turn": ([{"chosen": [U("hi"), A("hello"), U("Sort: 2 1"), A("1 2")],
                     "rejected": [U("hi"), A("hello"), U("Sort: 2 1"), A("2 1")]}], {},
                   "pair-messages", "pairs", [([U("hi"), A("hello"), U("Sort: 2 1")], ["1 2", "2 1"], 0.0)]),
    "sharegpt_messages": ([{"chosen": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                            "rejected": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]}], {},
                          "pair-messages", "pairs", [([U("hi")], ["hello", "no"], 0.0)]),
    "hh": ([{"chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: Sort: 2 1\n\nAssistant: 1 2",
             "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: Sort: 2 1\n\nAssistant: no"}], {},
           "pair-messages", "pairs", [([U("hi there"), A("hello"), U("Sort: 2 1")], ["1 2", "no"], 0.0)]),
    "trl_conversational": ([{"prompt": [U("Sort: 3 2 1")], "chosen": ASSISTANT_X, "rejected": ASSISTANT_Y},
                            {"prompt": "Sort: 1 3 2", "chosen": ASSISTANT_X, "rejected": ASSISTANT_Y}], {},
                           "pair-messages", "pairs", [([U("Sort: 3 2 1")], ["1 2 3", "3 2 1"], 0.0),
                                                      ([U("Sort: 1 3 2")], ["1 2 3", "3 2 1"], 0.0)]),
    "openai_preference": ([{"input": {"messages": [S("Be terse."), U("Sort: 3 1 2")], "tools": [], "parallel_tool_calls": True},
                             "preferred_output": [A("1 2 3")], "non_preferred_output": [A("3 2 1")]}], {},
                          "pair-messages", "pairs", [([S("Be terse."), U("Sort: 3 1 2")], ["1 2 3", "3 2 1"], 0.0)]),
    "kto_bool": ([{"prompt": "Sort: 2 1", "completion": "1 2", "label": True},
                  {"prompt": "Sort: 2 1", "completion": "2 1", "label": False}], {},
                 "kto", "kto", [([U("Sort: 2 1")], ["1 2"], 1.0), ([U("Sort: 2 1")], ["2 1"], 0.0)]),
    "kto_conversational": ([{"prompt": [U("Sort: 2 1")], "completion": [A("1 2")], "label": True},
                            {"prompt": [U("Sort: 2 1")], "completion": [A("2 1")], "label": False}], {},
                           "kto", "kto", [([U("Sort: 2 1")], ["1 2"], 1.0), ([U("Sort: 2 1")], ["2 1"], 0.0)]),
    "kto_int": ([{"prompt": "Copy: ab", "response": "ab", "label": 1},
                 {"prompt": "Copy: ab", "response": "ac", "label": 0}], {},
                "kto", "kto", [([U("Copy: ab")], ["ab"], 1.0), ([U("Copy: ab")], ["ac"], 0.0)]),
    "scored_reward": ([{"prompt": "Sort: 2 1", "response": "1 2", "reward": 1.5},
                       {"instruction": "Sort: 2 1", "output": "2 1", "reward": -2}], {},
                      "scored", "scored", [([U("Sort: 2 1")], ["1 2"], 1.5), ([U("Sort: 2 1")], ["2 1"], -2.0)]),
    "scored_score": ([{"prompt": "Copy: ab", "completion": "ab", "score": 0.25}], {},
                     "scored", "scored", [([U("Copy: ab")], ["ab"], 0.25)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_format_is_detected_parsed_and_tokenized(case, tmp_path, tok_dir, tok):
    rows, opts, fmt, kind, expected = CASES[case]
    src = _write(tmp_path / "rows.jsonl", rows)
    m, ex = _tokenize(tmp_path, tok_dir, src, source=opts)
    assert m["kind"] == "preference" and m["formats"] == {"rows.jsonl": fmt}
    assert m["rows"] == kind and m["responses"] == (2 if kind == "pairs" else 1)
    assert m["stats"]["rows"] == 2 * len(rows) and m["splits"]["train"]["examples"] == len(rows) == len(ex)
    assert m["skipped"] == {"identical": 0, "no_prompt": 0} and m["skipped_examples"] == []
    for i, (prompt, replies, target) in enumerate(expected):
        _assert_example(tok, ex, i, prompt, replies)
        assert ex.target[i] == target


def test_config_options_read_score_and_completion_fields(tmp_path, tok_dir):
    """Through the data config's options (reward_field "reward", response_field "response" by default)
    scored rows with "score" and KTO rows with "completion" still read as documented."""
    opts = PreferenceSourceConfig(train=["x"]).options()
    assert opts["reward_field"] == "reward" and opts["response_field"] == "response"
    scored = _write(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b", "score": 3}])
    m, ex = _tokenize(tmp_path, tok_dir, scored, source=opts)
    assert m["rows"] == "scored" and ex.target.tolist() == [3.0]
    kto = _write(tmp_path / "k.jsonl", [{"question": "a", "completion": "b", "label": True},
                                        {"question": "a", "completion": "c", "label": False}])
    m, ex = _tokenize(tmp_path, tok_dir, kto, out="kto", source=opts)
    assert m["rows"] == "kto" and ex.target.tolist() == [1.0, 0.0]
    custom = _write(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b", "reward": 1, "judge": 7}])
    _, ex = _tokenize(tmp_path, tok_dir, custom, out="custom", source={**opts, "reward_field": "judge"})
    assert ex.target.tolist() == [7.0]


MINIMIND_ROWS = [  # dpo.jsonl's layout
    {"chosen": [U("Sort: 3 1 2"), A("1 2 3")], "rejected": [U("Sort: 3 1 2"), A("1 3 2")]},
    {"chosen": [U("Copy: abc"), A("abc")], "rejected": [U("Copy: abc"), A("abd")]},
    {"chosen": [U("hi"), A("hello"), U("Sort: 2 1"), A("1 2")], "rejected": [U("hi"), A("hello"), U("Sort: 2 1"), A("2 1")]},
]


def _jsonl_bom(path, rows):
    path.write_bytes(BOM + "".join(json.dumps(r) + "\n" for r in rows).encode())


def _json_array(path, rows):
    path.write_text(json.dumps(rows, indent=1))


def _json_array_bom(path, rows):
    path.write_bytes(BOM + json.dumps(rows).encode())


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name, writer", [("rows.jsonl", _jsonl_bom), ("rows.json", _json_array),
                                          ("bom.json", _json_array_bom), ("rows.parquet", _parquet)])
def test_file_types_give_the_same_examples_as_jsonl(name, writer, tmp_path, tok_dir, tok):
    _, ref = _tokenize(tmp_path, tok_dir, _write(tmp_path / "ref.jsonl", MINIMIND_ROWS), out="ref")
    writer(tmp_path / name, MINIMIND_ROWS)
    m, ex = _tokenize(tmp_path, tok_dir, tmp_path / name)
    assert m["formats"] == {name: "pair-messages"} and len(ex) == 3
    for field in ("prompt", "prompt_off", "response", "response_off", "response_train", "target"):
        np.testing.assert_array_equal(getattr(ex, field), getattr(ref, field))
    _assert_example(tok, ex, 2, [U("hi"), A("hello"), U("Sort: 2 1")], ["1 2", "2 1"])


def test_csv_cells_spell_kto_labels_and_rewards(tmp_path, tok_dir):
    """A CSV cell is text: a KTO label as true/false/1/0 and a reward as the number it spells read
    as the JSON row's bool and number would."""
    (tmp_path / "kto.csv").write_text('prompt,completion,label\n"Sort: 2 1","1 2",true\nSort: 2 1,2 1,FALSE\n'
                                      "Copy: ab,ab,1\nCopy: ab,ba,0\n")
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Sort: 2 1", "completion": "1 2", "label": True}, {"prompt": "Sort: 2 1", "completion": "2 1", "label": False},
        {"prompt": "Copy: ab", "completion": "ab", "label": True}, {"prompt": "Copy: ab", "completion": "ba", "label": False}]))
    (tmp_path / "scored.tsv").write_text("prompt\tresponse\treward\nSort: 2 1\t1 2\t0.75\nSort: 2 1\t2 1\t-1e-1\n")
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Sort: 2 1", "response": "1 2", "reward": 0.75}, {"prompt": "Sort: 2 1", "response": "2 1", "reward": -0.1}]))
    for name, ref in (("kto.csv", "kto.jsonl"), ("scored.tsv", "scored.jsonl")):
        _, ex = _tokenize(tmp_path, tok_dir, tmp_path / name, out=f"o-{name}")
        _, want = _tokenize(tmp_path, tok_dir, tmp_path / ref, out=f"o-{ref}")
        for field in ("prompt", "response", "response_train", "target"):  # target: the label / the reward
            np.testing.assert_array_equal(getattr(ex, field), getattr(want, field))
        assert len(ex) == len(want) > 0


def test_minimind_dpo_rows_with_the_minimind_tokenizer(test_data, tmp_path):
    """The real MiniMind tokenizer: its template (with the empty think block) is what the prompt is."""
    tok_dir = test_data / "minimind_tokenizer"
    tok = tokenizers.load(tok_dir)
    m, ex = _tokenize(tmp_path, tok_dir, _write(tmp_path / "dpo.jsonl", MINIMIND_ROWS))
    assert m["vocab_size"] == 6400 and m["formats"] == {"dpo.jsonl": "pair-messages"}
    for i, row in enumerate(MINIMIND_ROWS):
        prompt = row["chosen"][:-1]
        assert ex.prompt_ids(i).tolist() == _template_ids(tok, prompt)
        assert tok.decode(ex.prompt_ids(i)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        for j, side in enumerate(("chosen", "rejected")):
            ids, trained = ex.response_ids(i, j)
            assert tok.decode(ids[:trained]) == row[side][-1]["content"] + "<|im_end|>"
            assert tok.decode(ids[trained:]) == "\n"


def test_synthetic_pairs_dataset_tokenizes_with_right_answers_chosen(tmp_path, tok_dir, tok):
    cfg = SyntheticPairsConfig(tasks=["sort", "copy", "arithmetic"], train_examples=30, val_examples=6, seed=3)
    pref_synthetic.write_dataset(cfg, tmp_path / "raw")
    assert read_manifest(tmp_path / "raw", "raw-dataset")["config"]["train_examples"] == 30
    rows = [json.loads(line) for line in open(tmp_path / "raw/preference/train.jsonl")]
    assert rows == [pref_synthetic.rows(pref_synthetic.example(3, "train", i, cfg.tasks), "pairs")[0] for i in range(30)]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    m = pref_data.pretokenize(tmp_path / "raw", tok_dir, tmp_path / "out", progress_bar=False)
    assert m["splits"]["train"]["examples"] == 30 and m["splits"]["val"]["examples"] == 6
    ex = Examples(tmp_path / "out", "train")
    for i in (0, 17, 29):
        _assert_example(tok, ex, i, [U(rows[i]["prompt"])], [rows[i]["chosen"], rows[i]["rejected"]])


# ------------------------------------------------------------------ skips: counted, not fatal


def test_unusable_pairs_are_skipped_counted_and_named(tmp_path, tok_dir, capsys):
    src = _write(tmp_path / "p.jsonl", [
        {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]},
        {"chosen": [U("q"), A("same")], "rejected": [U("q"), A("same")]},  # identical conversations
        {"chosen": [U("q"), A("same ")], "rejected": [U("q"), A(" same")]},  # identical replies
        {"chosen": [U("one"), A("a")], "rejected": [U("two"), A("b")]},  # nothing shared
        {"chosen": [U("q"), A("a"), U("more"), A("b")], "rejected": [U("q"), A("c")]},  # differ before the end
        {"chosen": [U("r"), A("x")], "rejected": [U("r"), A("y")]},
    ])
    pairs = _write(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"},
                                          {"prompt": "p", "chosen": "x", "rejected": "y"}])
    m, ex = _tokenize(tmp_path, tok_dir, [src, pairs], val=[src])
    assert m["skipped"] == {"identical": 2 + 1 + 2, "no_prompt": 2 + 2}
    assert m["splits"]["train"]["examples"] == 3 and m["splits"]["val"]["examples"] == 2
    assert m["skipped_examples"][:4] == [f"{src}:2: identical", f"{src}:3: identical", f"{src}:4: no_prompt",
                                         f"{src}:5: no_prompt"]
    assert len(m["skipped_examples"]) == pref_data.WARN_SKIPPED
    assert f"{src}:2: identical" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: DataError naming file:line

GOOD = {"prompt": "p", "chosen": "x", "rejected": "y"}
MSGS = {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}
KTO = {"prompt": "p", "completion": "x", "label": True}
SCORED = {"prompt": "p", "response": "x", "reward": 1.0}
OPENAI = {"input": {"messages": [U("q")]}, "preferred_output": [A("a")], "non_preferred_output": [A("b")]}
BAD = {  # name: (rows, line, what the message must say)
    "missing_rejected": ([GOOD, {"prompt": "p", "chosen": "x"}], 2, "missing field 'rejected'"),
    "missing_prompt": ([GOOD, {"chosen": "x", "rejected": "y"}], 2, "missing field 'prompt'"),
    "chosen_not_string": ([GOOD, {"prompt": "p", "chosen": 5, "rejected": "y"}], 2, "field 'chosen' must be a string, got int"),
    "message_without_role": ([MSGS, {"chosen": [{"content": "q"}, A("a")], "rejected": [U("q"), A("b")]}], 2,
                             "chosen message 0 needs 'role'"),
    "message_bad_role": ([MSGS, {"chosen": [U("q"), A("a")], "rejected": [{"role": "bot", "content": "q"}, A("b")]}], 2,
                         "rejected message 0 needs 'role'"),
    "empty_message_list": ([MSGS, {"chosen": [], "rejected": [U("q"), A("b")]}], 2, "field 'chosen' must be a non-empty"),
    "not_ending_with_assistant": ([MSGS, {"chosen": [U("q"), A("a"), U("more")], "rejected": [U("q"), A("b")]}], 2,
                                  "the chosen conversation does not end with an assistant reply"),
    "bad_hh": ([{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
                {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "q then a"}], 2,
               "field 'rejected' is neither a message list nor a Human:/Assistant: transcript"),
    "label_yes": ([KTO, {"prompt": "p", "completion": "x", "label": "yes"}], 2, "field 'label' must be true or false"),
    "label_float": ([KTO, {"prompt": "p", "completion": "x", "label": 0.5}], 2, "field 'label' must be true or false"),
    "reward_nan": ([SCORED, '{"prompt": "p", "response": "x", "reward": NaN}'], 2, "field 'reward' must be a finite number"),
    "reward_inf": ([SCORED, '{"prompt": "p", "response": "x", "reward": -Infinity}'], 2,
                   "field 'reward' must be a finite number"),
    "reward_bool": ([SCORED, {"prompt": "p", "response": "x", "reward": True}], 2, "field 'reward' must be a finite number"),
    "reward_string": ([SCORED, {"prompt": "p", "response": "x", "reward": "high"}], 2, "field 'reward' must be a finite number"),
    "reward_nan_text": ([SCORED, {"prompt": "p", "response": "x", "reward": "nan"}], 2, "field 'reward' must be a finite number"),
    "openai_no_input": ([OPENAI, {"preferred_output": [A("a")], "non_preferred_output": [A("b")]}], 2,
                        "field 'input' must be an object with a 'messages' list"),
    "openai_tools": ([OPENAI, {**OPENAI, "input": {"messages": [U("q")], "tools": [{"type": "function"}]}}], 2,
                     "field 'input.tools': preference rows with tool definitions are not supported"),
    "openai_two_replies": ([OPENAI, {**OPENAI, "preferred_output": [A("a"), A("b")]}], 2,
                           "field 'preferred_output' must hold one assistant message"),
    "kto_two_completions": ([KTO, {"prompt": "p", "completion": [A("a"), A("b")], "label": True}], 2,
                            "field 'completion' must be text or one assistant message"),
    "invalid_json": ([GOOD, GOOD, '{"prompt": "p", "chosen": "x",'], 3, "invalid JSON"),
    "not_an_object": ([GOOD, "[1, 2]"], 2, "expected a JSON object, got list"),
    "unknown_fields": ([{"text": "hello"}], 1, "cannot tell the preference format from the fields ['text']"),
}


def _assert_nothing_left(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_fail_naming_file_line_and_field_and_leave_nothing(case, tmp_path, tok_dir):
    rows, line, what = BAD[case]
    src = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        _tokenize(tmp_path, tok_dir, src)
    assert str(e.value).startswith(f"{src}:{line}: ") and what in str(e.value), str(e.value)
    _assert_nothing_left(tmp_path)


def test_bad_row_in_a_val_file_and_in_a_parquet_file_leave_nothing(tmp_path, tok_dir):
    good = _write(tmp_path / "good.jsonl", [GOOD] * 3)
    bad = _write(tmp_path / "val.jsonl", [GOOD, GOOD, {"prompt": "p", "chosen": "x"}])
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}:3: missing field 'rejected'"):
        _tokenize(tmp_path, tok_dir, good, val=[bad])
    _assert_nothing_left(tmp_path)
    _parquet(tmp_path / "k.parquet", [{**KTO, "label": 1}, {**KTO, "label": 2}])  # a column has one type
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'k.parquet'))}:2: field 'label' must be true or false.*got 2$"):
        _tokenize(tmp_path, tok_dir, tmp_path / "k.parquet")
    _assert_nothing_left(tmp_path)


def test_empty_file_mixed_kinds_and_nothing_usable_fail_and_leave_nothing(tmp_path, tok_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no rows"):
        _tokenize(tmp_path, tok_dir, _write(tmp_path / "good.jsonl", [GOOD]), val=[empty])
    _assert_nothing_left(tmp_path)

    pairs, kto = _write(tmp_path / "pairs.jsonl", [GOOD]), _write(tmp_path / "kto.jsonl", [KTO])
    with pytest.raises(DataError, match="mix kinds") as e:
        _tokenize(tmp_path, tok_dir, [pairs, kto], val=[pairs])
    assert f"{pairs} (pairs)" in str(e.value) and f"{kto} (kto)" in str(e.value)
    _assert_nothing_left(tmp_path)
    msgs = _write(tmp_path / "msgs.jsonl", [MSGS])  # pairs and pair-messages train the same thing
    m, _ = _tokenize(tmp_path, tok_dir, [pairs, msgs], out="mixed")
    assert m["formats"] == {"pairs.jsonl": "pairs", "msgs.jsonl": "pair-messages"} and m["rows"] == "pairs"

    same = _write(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"},
                                            {"prompt": "q", "chosen": " y", "rejected": "y "}])
    with pytest.raises(DataError, match="no usable preference rows") as e:
        _tokenize(tmp_path, tok_dir, same)
    assert f"{same}:1: identical" in str(e.value)
    _assert_nothing_left(tmp_path)

    one_label = _write(tmp_path / "one_label.jsonl", [KTO, KTO])
    with pytest.raises(DataError, match="both desirable"):
        _tokenize(tmp_path, tok_dir, one_label)
    _assert_nothing_left(tmp_path)

    with pytest.raises(DataError, match="no held-out preference rows"):
        pref_data.pretokenize({"train": [pairs]}, tok_dir, tmp_path / "out", source={"val_fraction": 0.0},
                              progress_bar=False)
    _assert_nothing_left(tmp_path)


# ------------------------------------------------------------------ tokenization, truncation, splits


def test_fit_lengths_cuts_the_prompt_from_the_left_keeping_half_the_budget():
    p, r = list(range(100, 120)), [list(range(6)), list(range(4))]
    assert fit_lengths(p, r, [5, 3], None) == (p, r, [5, 3], False)
    assert fit_lengths(p, r, [5, 3], 26) == (p, r, [5, 3], False)
    assert fit_lengths(p, r, [5, 3], 16) == (p[-10:], r, [5, 3], True)  # the responses fit: prompt keeps the rest
    long = [list(range(30)), list(range(40))]
    prompt, responses, trained, cut = fit_lengths(p, long, [29, 39], 16)
    assert cut and prompt == p[-8:] and responses == [long[0][:8], long[1][:8]] and trained == [8, 8]
    prompt, responses, trained, cut = fit_lengths(p[:3], long, [29, 39], 16)  # a short prompt is kept whole
    assert cut and prompt == p[:3] and [len(x) for x in responses] == [13, 13] and trained == [13, 13]


def test_overlong_drop_leaves_long_examples_out_and_counts_them(tmp_path, tok_dir):
    """`overlong: drop` (the SFT option, accepted by the preference source too) was ignored: the
    examples were truncated instead."""
    prompt = "Sort: " + " ".join(str(i % 10) for i in range(40))
    rows = [{"prompt": prompt, "chosen": "1 2", "rejected": "2 1"}] + [
        {"prompt": f"Copy: {c}", "chosen": c, "rejected": "y"} for c in "abcd"]
    src = _write(tmp_path / "long.jsonl", rows)
    m, ex = _tokenize(tmp_path, tok_dir, src, max_tokens=32, source={"overlong": "drop"})
    assert m["stats"]["dropped_overlong"] == 2 and m["stats"]["truncated"] == 0  # the first row, in train and val
    assert len(ex) == 4 and all(len(ex.prompt_ids(i)) < 32 for i in range(4))


def test_a_row_s_system_field_is_the_system_turn_and_a_tool_call_side_is_refused(tmp_path, tok_dir, tok):
    """Intel/orca_dpo_pairs' rows carry a "system" field: it was dropped, so the pair taught a reply
    to a prompt it was not given. A side ending in a tool call would train its (empty) text."""
    row = {"system": "Answer in French.", "question": "Greet me.", "chosen": "Bonjour", "rejected": "Hello"}
    _, ex = _tokenize(tmp_path, tok_dir, _write(tmp_path / "orca.jsonl", [row] * 2))
    _assert_example(tok, ex, 0, [S("Answer in French."), U("Greet me.")], ["Bonjour", "Hello"])
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    bad = {"prompt": [U("Call f.")], "chosen": [call], "rejected": [A("no")]}
    with pytest.raises(DataError, match=r"tools.jsonl:1: the chosen conversation ends with a tool call"):
        _tokenize(tmp_path, tok_dir, _write(tmp_path / "tools.jsonl", [bad]), out="tools")
    assert not (tmp_path / "tools").exists()


def test_a_template_that_refuses_a_conversation_names_the_row(tmp_path, tok_dir):
    """A strict template (Mistral's: roles must alternate) raising on a row printed jinja's stack
    and no file or line; SFT names them for the same row."""
    import shutil

    strict = tmp_path / "strict-tok"
    shutil.copytree(tok_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    good = {"prompt": [U("Copy: a")], "chosen": [A("a")], "rejected": [A("b")]}
    bad = {"prompt": [U("one"), U("two")], "chosen": [A("a")], "rejected": [A("b")]}
    with pytest.raises(DataError, match=r"roles.jsonl:2: the tokenizer's chat template cannot render this "
                                         r"conversation: .*roles must alternate"):
        _tokenize(tmp_path, strict, _write(tmp_path / "roles.jsonl", [good, bad]), out="roles")
    assert not (tmp_path / "roles").exists()


def test_long_examples_are_truncated_and_counted(tmp_path, tok_dir, tok):
    prompt = "Sort: " + " ".join(str(i % 10) for i in range(40))
    rows = [{"prompt": prompt, "chosen": "1 2", "rejected": "2 1"},
            {"prompt": "Copy: ab", "chosen": " ".join(str(i % 10) for i in range(30)), "rejected": "b"},
            {"prompt": "Copy: x", "chosen": "x", "rejected": "y"}]
    src = _write(tmp_path / "long.jsonl", rows)
    _, full = _tokenize(tmp_path, tok_dir, src, out="full")
    m, ex = _tokenize(tmp_path, tok_dir, src, max_tokens=32)
    assert m["stats"]["truncated"] == 2 * 2 and m["config"]["max_tokens"] == 32  # the first two rows, in train and val
    for i in range(3):
        p, fp = ex.prompt_ids(i), full.prompt_ids(i)
        assert len(p) >= min(len(fp), 16) and fp[len(fp) - len(p):].tolist() == p.tolist()  # the prompt's end
        for j in range(2):
            (ids, trained), (full_ids, full_trained) = ex.response_ids(i, j), full.response_ids(i, j)
            assert len(p) + len(ids) <= 32 and ids.tolist() == full_ids[: len(ids)].tolist()  # the response's start
            assert trained == min(full_trained, len(ids))
    assert len(ex.prompt_ids(0)) < len(full.prompt_ids(0)) and len(ex.response_ids(0, 0)[0]) == len(full.response_ids(0, 0)[0])
    long_reply, trained = ex.response_ids(1, 0)
    assert len(ex.prompt_ids(1)) == len(full.prompt_ids(1)) and len(long_reply) == 32 - len(full.prompt_ids(1))
    assert trained == len(long_reply) and tok.eos_token_id not in long_reply.tolist()  # cut before its end of turn
    assert ex.prompt_ids(2).tolist() == full.prompt_ids(2).tolist()


def test_val_holdout_is_fixed_by_row_number_and_val_files_replace_it(tmp_path, tok_dir):
    rows = [{"prompt": f"q{i}", "response": "a", "reward": i} for i in range(120)]
    src = _write(tmp_path / "s.jsonl", rows)
    source = {"val_fraction": 0.1, "val_max_rows": 500}
    runs = []
    for out in ("a", "b"):
        pref_data.pretokenize({"train": [src]}, tok_dir, tmp_path / out, source=source, progress_bar=False)
        runs.append((Examples(tmp_path / out, "train").target.tolist(), Examples(tmp_path / out, "val").target.tolist()))
    assert runs[0] == runs[1]
    train, val = runs[0]
    expected = np.flatnonzero(Holdout(0.1, 500)(120)).tolist()
    assert val == expected and 3 < len(val) < 25
    assert sorted(train + val) == list(range(120)) and not set(train) & set(val)

    pref_data.pretokenize({"train": [src]}, tok_dir, tmp_path / "capped", source={**source, "val_max_rows": 2},
                          progress_bar=False)
    assert Examples(tmp_path / "capped", "val").target.tolist() == expected[:2]

    val_file = _write(tmp_path / "v.jsonl", [{"prompt": "v", "response": "a", "reward": -i} for i in range(1, 4)])
    m, ex = _tokenize(tmp_path, tok_dir, src, val=[val_file], out="given", source=source)
    assert ex.target.tolist() == list(range(120)) and m["splits"]["val"]["examples"] == 3
    assert Examples(tmp_path / "given", "val").target.tolist() == [-1.0, -2.0, -3.0]


# ------------------------------------------------------------------ specs


def test_minimind_preference_specs_resolve_to_dpo_jsonl():
    dpo = HubFile(MINIMIND_REPO, "dpo.jsonl", None)
    assert parse_spec("minimind:dpo") == dpo == parse_spec("minimind:dpo", "preference")
    assert parse_spec("minimind:auto", "preference") == dpo
    assert parse_spec("minimind:auto", "sft") != dpo
    with pytest.raises(DownloadError, match="needs kind"):
        parse_spec("minimind:auto")


# ------------------------------------------------------------------ batches


@pytest.fixture
def pairs_dir(tmp_path, tok_dir):
    rows = [{"prompt": f"Sort: {i} {i + 1} 0", "chosen": f"0 {i} {i + 1}", "rejected": " ".join("x" * (1 + i % 4))}
            for i in range(10)]
    _tokenize(tmp_path, tok_dir, _write(tmp_path / "pairs.jsonl", rows), out="pairs")
    return tmp_path / "pairs", rows


def test_batches_interleave_rows_and_mask_only_the_replies(pairs_dir, tok):
    data_dir, rows = pairs_dir
    pad = read_manifest(data_dir)["pad_id"]
    batches = PreferenceBatches(data_dir, "train", batch_size=4, seq_len=64, shuffle=False, pad_id=pad,
                                pad_multiple=8, reference=np.arange(20, dtype=np.float32))
    batch = next(batches.in_order(4))
    n, width = batch["inputs"].shape
    assert n == 8 and width % 8 == 0 and batch["full"].shape == (8, width + 1)
    assert batch["target"].tolist() == [0.0] * 4 and batch["ref"].tolist() == list(range(8))
    np.testing.assert_array_equal(batch["inputs"], batch["full"][:, :-1])
    np.testing.assert_array_equal(batch["targets"], batch["full"][:, 1:])
    for k in range(n):
        i, side = divmod(k, 2)  # rows of example i: chosen, rejected
        reply = rows[i]["chosen" if side == 0 else "rejected"]
        prompt_len = len(_template_ids(tok, [U(rows[i]["prompt"])]))
        full, mask, last = batch["full"][k], batch["mask"][k], int(batch["last"][k])
        assert tok.decode(full[:prompt_len]) == tok.apply_chat_template([U(rows[i]["prompt"])], tokenize=False,
                                                                        add_generation_prompt=True)
        assert tok.decode(batch["targets"][k][mask == 1]) == reply + "<|im_end|>"
        assert np.flatnonzero(mask).tolist() == list(range(prompt_len - 1, last - 1))  # targets up to <|im_end|>
        assert tok.decode(full[: last + 1]) == tok.apply_chat_template(
            [U(rows[i]["prompt"]), A(reply)], tokenize=False)  # the whole conversation, its "\n" tail last
        assert full[last - 1] == tok.eos_token_id and tok.decode(full[last:last + 1]) == "\n"
        assert (full[last + 1:] == pad).all() and mask[last:].sum() == 0  # padding: not learned


def test_batches_are_a_function_of_the_cursor_and_check_the_reference(pairs_dir):
    data_dir, _ = pairs_dir
    with pytest.raises(ValueError, match="11 reference log-probs for 20 responses"):
        PreferenceBatches(data_dir, "train", batch_size=2, seq_len=64, reference=np.zeros(11, np.float32))
    ref = np.arange(20, dtype=np.float32)
    a = PreferenceBatches(data_dir, "train", batch_size=3, seq_len=64, seed=5, reference=ref)
    b = PreferenceBatches(data_dir, "train", batch_size=3, seq_len=64, seed=5, reference=ref)
    cursor, seen = None, []
    for _ in range(5):  # past the end of an epoch (3 batches of 3)
        batch, after = a.next(cursor)
        again, after_again = a.next(cursor)
        other, _ = b.next(cursor)  # another loader at the same cursor: the same batch
        assert after == after_again
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[key])
            np.testing.assert_array_equal(batch[key], other[key])
        seen.append(batch["ref"])
        # each row's reference value is that response's: example ref // 2, response ref % 2
        for k, r in enumerate(batch["ref"].astype(int)):
            i, j = divmod(r, 2)
            p = a.data.prompt_ids(i)
            ids, _ = a.data.response_ids(i, j)
            assert k % 2 == j and batch["full"][k][: len(p) + len(ids)].tolist() == p.tolist() + ids.tolist()
        cursor = after
    assert cursor == {"epoch": 1, "index": 2}
    first_epoch = np.concatenate(seen[:3]).astype(int) // 2
    assert len(set(first_epoch.tolist())) == 9  # an epoch visits distinct examples
