"""The file types users bring beside JSONL: compressed files, CSV / TSV, Arrow (`datasets`' own files).

Each is checked against the same rows written as plain JSONL: the rows read, and the token shards
`pretokenize` writes, are identical; damaged files fail naming the file (and line, where there is one).
"""

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.feather as feather
import pytest

from mlxcore.data import download, files, pretokenize, records
from mlxcore.data.loader import documents
from mlxcore.data.records import DataError
from mlxcore.data.specs import DownloadError

ROWS = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}, since {i} doubled is {2 * i}."} for i in range(400)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _zstd(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zstd}


def _rows(path):
    text = records.file_kind(path) == "txt"
    return [(line, records.decode_row(str(path), line, payload, text))
            for chunk, _ in records.read_chunks(path) for line, payload in records.chunk_items(chunk)]


def _shards(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.bin"))}


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("inner", [".jsonl", ".json", ".txt", ".csv"])
def test_a_compressed_file_reads_as_the_file_it_holds(tmp_path, monkeypatch, inner, suffix):
    """Each codec over each text format: the same rows with the same line numbers as the plain file,
    and progress counted in the file's own (compressed) bytes, up to its size."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 4096)  # many blocks: rows cut across reads
    monkeypatch.setattr(files, "CHUNK_ROWS", 64)
    plain = tmp_path / f"rows{inner}"
    if inner == ".jsonl":
        plain.write_bytes(records.BOM + _jsonl(ROWS))
    elif inner == ".json":  # a JSON array (Alpaca's layout)
        plain.write_text(json.dumps(ROWS, indent=1))
    elif inner == ".txt":
        plain.write_text("\n\n".join(f"{r['prompt']}\n{r['response']}" for r in ROWS) + "\n")
    else:
        plain.write_text("prompt,response\r\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\r\n' for r in ROWS))
    packed = tmp_path / f"rows{inner}{suffix}"
    packed.write_bytes(COMPRESS[suffix](plain.read_bytes()))
    assert records.file_kind(packed) == records.file_kind(plain)
    got = _rows(packed)
    assert got == _rows(plain) and len(got) == len(ROWS)
    positions = [pos for _, pos in records.read_chunks(packed)]
    assert positions == sorted(positions) and positions[-1] == packed.stat().st_size


def test_pretokenize_writes_the_same_shards_from_a_compressed_file(tmp_path, small_data):
    rows = [{"conversations": [{"role": "user", "content": f"Sort: {i % 7} {i % 3}"},
                               {"role": "assistant", "content": " ".join(sorted(f"{i % 7} {i % 3}".split()))}]}
            for i in range(300)]
    (tmp_path / "c.jsonl").write_bytes(_jsonl(rows))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(rows)))
    (tmp_path / "c.jsonl.zst").write_bytes(_zstd(_jsonl(rows)))
    shards, seen = {}, {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        out, src = tmp_path / f"out-{name}", tmp_path / name
        seen[name] = []
        m = pretokenize.pretokenize({"train": [src]}, small_data["tok"], "sft", out, progress_bar=False,
                                    on_progress=lambda done, total, s=seen[name]: s.append((done, total)))
        shards[name] = _shards(out)
        assert m["formats"] == {name: "conversations"}
        assert seen[name][-1] == (src.stat().st_size,) * 2
    assert shards["c.jsonl.gz"] == shards["c.jsonl"] == shards["c.jsonl.zst"] and len(shards["c.jsonl"]) == 6


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".xz", ".bz2"])
def test_a_truncated_or_mislabelled_compressed_file_fails_naming_it(tmp_path, small_data, suffix):
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(COMPRESS[suffix](_jsonl(ROWS))[:300])
    with pytest.raises(DataError, match=rf"{cut}: not a readable \w+ file .*is it whole"):
        _rows(cut)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=str(cut)):
        pretokenize.pretokenize({"train": [cut]}, small_data["tok"], "sft", out, progress_bar=False)
    assert not out.exists()
    plain = tmp_path / f"plain.jsonl{suffix}"  # not compressed at all
    plain.write_bytes(_jsonl(ROWS))
    with pytest.raises(DataError, match=rf"{plain}: not a readable"):
        _rows(plain)


def test_a_compressed_parquet_or_arrow_file_is_refused_with_the_reason(tmp_path):
    for name in ("t.parquet.gz", "t.arrow.zst"):
        (tmp_path / name).write_bytes(gzip.compress(b"x"))
        with pytest.raises(DataError, match="compresses its own columns, so decompress the file first"):
            records.file_kind(tmp_path / name)


def test_csv_and_tsv_rows_keep_quoted_fields_and_their_own_line_numbers(tmp_path):
    long = "w " * 100_000  # 200 KB in one field: over the csv module's default limit
    src = tmp_path / "d.csv"
    src.write_bytes(records.BOM + ('prompt,response,extra\r\n"a, b","multi\r\nline",x\r\n\r\nq3,"say ""hi""",\r\n'
                                   f'q4,{long},\r\nq5,short\r\n').encode())
    assert _rows(src) == [(2, {"prompt": "a, b", "response": "multi\r\nline", "extra": "x"}),
                          (5, {"prompt": "q3", "response": 'say "hi"', "extra": ""}),
                          (6, {"prompt": "q4", "response": long, "extra": ""}),
                          (7, {"prompt": "q5", "response": "short", "extra": None})]  # a short row: the rest missing
    tsv = tmp_path / "g.tsv"
    tsv.write_text("question\tanswer\n2+2?\t2+2=4 #### 4\n")
    assert _rows(tsv) == [(2, {"question": "2+2?", "answer": "2+2=4 #### 4"})]
    assert records.detect_format(_rows(tsv)[0][1], "g.tsv:2") == "gsm8k"
    assert records.detect_format(_rows(src)[0][1], "d.csv:2") == "instruction"


@pytest.mark.parametrize("text, says", [
    (b"prompt,response\nq1,a1\nq2,a2,oops\n", r"bad.csv:3: 3 fields, but the header \(line 1\) names 2; is a value's ',' unquoted"),
    (b'prompt,response\n"two\nlines",a\nq,caf\xe9\n', r"bad.csv:4: not UTF-8 text \(byte 0xe9 at column 6\)"),
    (b"prompt,prompt\nq,a\n", r"bad.csv:1: the header row must name every column once"),
    (b"prompt,\nq,a\n", r"bad.csv:1: the header row must name every column once"),
    (b'prompt,response\nq1,a1\n"q2,a2\nq3,a3\n', r"bad.csv:3: not readable as CSV: unexpected end of data"),
    (b'prompt,response\n"q1"x,a1\n', r"bad.csv:2: not readable as CSV: ',' expected after '\"'"),
])
def test_a_bad_csv_fails_naming_file_and_line(tmp_path, small_data, text, says):
    src = tmp_path / "bad.csv"
    src.write_bytes(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=says):
        pretokenize.pretokenize({"train": [src]}, small_data["tok"], "sft", out, progress_bar=False)
    assert not out.exists()


def test_a_datasets_save_to_disk_dir_and_its_arrow_files_are_data(tmp_path, small_data):
    """What `datasets` users have on disk: `save_to_disk` output, named by its directory (the files
    its state.json lists) or by a glob of its .arrow files; a Feather (Arrow IPC file) too."""
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"), max_shard_size="8KB")  # several shards, in order
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    shards = [tmp_path / "saved" / f["filename"] for f in state["_data_files"]]
    assert len(shards) > 1
    assert download.match_local("saved", str(tmp_path / "saved")) == [p.resolve() for p in shards]
    rows = [r for p in shards for _, r in _rows(p)]
    assert rows == ROWS
    feather.write_feather(pa.Table.from_pylist(ROWS), tmp_path / "f.feather")
    assert [r for _, r in _rows(tmp_path / "f.feather")] == ROWS
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(ROWS))
    outs = {}
    for name, spec in (("jsonl", "rows.jsonl"), ("saved", "saved"), ("feather", "f.feather")):
        files = download.match_local(spec, str(tmp_path / spec))
        pretokenize.pretokenize({"train": files}, small_data["tok"], "sft", tmp_path / f"o-{name}", progress_bar=False)
        outs[name] = _shards(tmp_path / f"o-{name}")
    assert outs["saved"] == outs["jsonl"] == outs["feather"]
    assert len(list(documents(tmp_path / "o-saved", "train"))) + len(list(documents(tmp_path / "o-saved", "val"))) == 400

    DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DownloadError, match=rf"'{tmp_path}/dd' is a DatasetDict saved by datasets; name one split's "
                                        rf"directory: '{tmp_path}/dd/train', '{tmp_path}/dd/test'"):
        download.match_local("dd", str(tmp_path / "dd"))
    assert download.match_local("dd/test", str(tmp_path / "dd" / "test"))[0].suffix == ".arrow"
    (tmp_path / "plain").mkdir()
    with pytest.raises(DownloadError, match="is a directory; name its files with a glob"):
        download.match_local("plain", str(tmp_path / "plain"))
    for split in ("train", "valid", "test"):  # mlx-lm's layout: its splits apart, never a glob over all three
        (tmp_path / "mlxlm" / f"{split}.jsonl").parent.mkdir(exist_ok=True)
        (tmp_path / "mlxlm" / f"{split}.jsonl").write_bytes(_jsonl(ROWS[:4]))
    with pytest.raises(DownloadError, match=rf"mlx-lm's layout; give its splits apart, e.g. train=\['{tmp_path}/mlxlm/"
                                        rf"train.jsonl'\] val=\['{tmp_path}/mlxlm/valid.jsonl'\]"):
        download.match_local("mlxlm", str(tmp_path / "mlxlm"))
    (tmp_path / "saved" / shards[-1].name).unlink()
    with pytest.raises(DownloadError, match=rf"{shards[-1].name} \(listed in .*state.json\) is missing"):
        download.match_local("saved", str(tmp_path / "saved"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 10)
    with pytest.raises(DataError, match=r"junk.arrow: not a readable Arrow IPC stream or file"):
        _rows(tmp_path / "junk.arrow")
    (tmp_path / "cut.arrow").write_bytes(shards[0].read_bytes()[:-100])  # a copy cut short
    with pytest.raises(DataError, match=r"cut.arrow: not a readable Arrow file after row \d+ .*is it whole\?"):
        _rows(tmp_path / "cut.arrow")


def test_a_json_document_holding_its_rows_under_one_key_is_read(tmp_path):
    """`{"version": ..., "data": [rows]}` (SQuAD's layout; `datasets` reads it with field="data"),
    pretty-printed and compressed or not: the rows under the one key that holds a list of objects."""
    doc = {"version": "1.1", "data": ROWS[:50]}
    (tmp_path / "doc.json").write_text(json.dumps(doc, indent=2))
    (tmp_path / "doc.json.gz").write_bytes(gzip.compress(json.dumps(doc, indent=2).encode()))
    for name in ("doc.json", "doc.json.gz"):
        assert _rows(tmp_path / name) == [(i + 1, r) for i, r in enumerate(ROWS[:50])]
    (tmp_path / "two.json").write_text(json.dumps({"train": ROWS[:3], "dev": ROWS[3:6]}, indent=2))
    with pytest.raises(DataError, match=r"two.json: one JSON object with the keys \['dev', 'train'\], not rows; which "
                                        r"of \['train', 'dev'\] holds the rows\? Extract it: jq -c '.train\[\]' two.json"):
        _rows(tmp_path / "two.json")
    (tmp_path / "none.json").write_text(json.dumps({"version": "1"}, indent=2))
    with pytest.raises(DataError, match=r"none.json: one JSON object with the keys \['version'\], not rows; no key"):
        _rows(tmp_path / "none.json")
    (tmp_path / "line.json").write_text(json.dumps(doc) + "\n")  # on one line: a JSONL row whose fields say no format
    row = _rows(tmp_path / "line.json")[0][1]
    with pytest.raises(DataError, match=r"the field 'data' holds a list of objects: if those are the rows, give them "
                                        r"one per line"):
        records.detect_format(row, "line.json:1")
