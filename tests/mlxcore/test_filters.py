"""Filters: a corpus with planted duplicates, near-duplicates, short, control-character and non-Latin
rows loses exactly those, counted per source and filter; kept rows are written unchanged."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxcore.config import FilterConfig
from mlxcore.data import filters
from mlxcore.data.inputs import resolve_inputs, source_parts
from mlxcore.io import read_manifest

rng = random.Random(11)
VOCAB = sorted({"".join(rng.choice("abcdefghiklmnoprstuvwyz") for _ in range(rng.randint(3, 8))) for _ in range(3000)})


def _doc(seed: int, words: int = 120) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(VOCAB) for _ in range(words))


def _near(doc: str, at: int) -> str:
    words = doc.split()
    return " ".join(words[:at] + ["changed"] + words[at + 1:])  # one word of 120: Jaccard ~0.92


A = [_doc(i) for i in range(30)]
B = [_doc(100 + i) for i in range(10)]
HALF = " ".join(A[10].split()[:60] + _doc(999).split()[:60])  # half of row 11's words: not a near-duplicate
PLANTED_A = [A[3], _near(A[7], 50), "hi there", _doc(500) + " \x07 bell", "".join(chr(0x4E00 + i * 7) for i in range(200)), HALF]
PLANTED_B = [A[1], _near(A[19], 80)]
EXPECTED = [("a", 31, "exact_dup"), ("a", 32, "near_dup"), ("a", 33, "length"), ("a", 34, "control"), ("a", 35, "charset"),
            ("b", 11, "exact_dup"), ("b", 12, "near_dup")]
ALL_ON = FilterConfig(min_chars=50, drop_control=True, scripts=["latin"], exact_dedup=True, near_dedup=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in A + PLANTED_A))
    pq.write_table(pa.table({"body": B + PLANTED_B, "n": list(range(12))}), root / "b.parquet")
    inputs = {"sources": [{"train": [str(root / "a.jsonl")], "val": []}, {"train": [str(root / "b.parquet")], "val": []}]}
    opts = {"format": "auto", "sources": [{"name": "a", "spec": "a.jsonl", "format": None, "columns": {}},
                                          {"name": "b", "spec": "b.parquet", "format": "text", "columns": {"text": "body"}}]}
    return root, inputs, opts


def _run(corpus, out, cfg=ALL_ON):
    root, inputs, opts = corpus
    return filters.filter_sources(source_parts(inputs, opts), "pretrain", cfg.model_dump(), root / out)


def test_exactly_the_planted_rows_are_dropped_and_counted(corpus):
    root = corpus[0]
    manifest = _run(corpus, "out")
    dropped = [json.loads(line) for line in (root / "out/dropped.jsonl").read_text().splitlines()]
    files = {"a": root / "a.jsonl", "b": root / "b.parquet"}
    assert [(d["source"], d["where"], d["filter"]) for d in dropped] == [(s, f"{files[s]}:{n}", f) for s, n, f in EXPECTED]
    zero = dict.fromkeys(filters.FILTERS, 0)
    assert manifest["counts"] == [
        {"source": "a", "rows_in": 36, **zero, "length": 1, "control": 1, "charset": 1, "exact_dup": 1, "near_dup": 1, "rows_out": 31},
        {"source": "b", "rows_in": 12, **zero, "exact_dup": 1, "near_dup": 1, "rows_out": 10}]
    assert manifest["total"] == {"source": "all", "rows_in": 48, "length": 1, "control": 1, "charset": 1, "exact_dup": 2,
                                 "near_dup": 2, "rows_out": 41}
    # kept rows, first occurrences, in order: the JSONL lines byte for byte, parquet rows as JSON lines
    files = resolve_inputs(filters.filtered_inputs(root / "out", corpus[1])["sources"][0], "pretrain")["train"]
    lines = (root / "a.jsonl").read_bytes().splitlines(keepends=True)
    assert files[0].read_bytes() == b"".join(lines[:30] + lines[35:])
    b_rows = [json.loads(line) for line in resolve_inputs(filters.filtered_inputs(root / "out", corpus[1])["sources"][1],
                                                          "pretrain")["train"][0].read_text().splitlines()]
    assert b_rows == [{"body": d, "n": i} for i, d in enumerate(B)]


def test_the_output_is_a_function_of_the_input(corpus):
    # self-contained: under xdist the other tests of this module may run on another worker
    first = _run(corpus, "first")["digest"]
    assert _run(corpus, "again")["digest"] == first == read_manifest(corpus[0] / "first")["digest"]


def test_each_filter_alone_drops_only_its_rows(corpus):
    for name, cfg in [("length", FilterConfig(min_chars=50)), ("control", FilterConfig(drop_control=True)),
                      ("charset", FilterConfig(scripts=["latin"])), ("exact_dup", FilterConfig(exact_dedup=True))]:
        counts = _run(corpus, f"only-{name}", cfg)["total"]
        expect = sum(f == name for _, _, f in EXPECTED)
        assert counts[name] == expect and counts["rows_in"] - counts["rows_out"] == expect, (name, counts)
    assert not FilterConfig().active and ALL_ON.active


def test_script_fraction_counts_letters_of_known_scripts():
    assert filters.script_fraction("hello 世界 123", ["latin"]) == 5 / 7
    assert filters.script_fraction("12345 !!", ["cjk"]) == 1.0  # no letters: nothing to judge
    assert filters.script_fraction("Привет мир", ["latin", "cyrillic"]) == 1.0


def test_exact_dedup_tells_rows_apart_by_their_tools():
    """Two tool-calling rows with the same messages but other tool definitions are different rows."""
    from mlxcore.data.filters import _content
    from mlxcore.data.messages import Chat

    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}]
    a, b = ({"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time"))
    assert _content(Chat(msgs, [a])) != _content(Chat(msgs, [b]))
    assert _content(Chat(msgs, [a])) == _content(Chat(list(msgs), [a]))
    assert _content(msgs) == _content(list(msgs)) != _content(Chat(msgs, [a]))
