"""`hfds:` specs (and `catalog:` entries that name one) through the real `datasets` library, against the
loopback hub stand-in and the caches it fills: rows as JSONL with a manifest, the column mapping, the
size guard and streaming, retries, and offline use of the datasets cache. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from mlxcore.data.download import DownloadError, data_files, fetch, parse_spec
from mlxcore.data.hfds import HfDataset
from mlxcore.io import read_manifest
from tests.hubstandin import HubStandin

REPO = "owner/qa"
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"{i}", "output": f"{2 * i}", "extra": i}
        for i in range(40)]


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _card(license_id: str) -> bytes:
    return f"---\nlicense: {license_id}\npretty_name: test\n---\n# test data\n".encode()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubStandin() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the datasets cache: hf-home/datasets
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        for var in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_CACHE"):
            monkeypatch.delenv(var, raising=False)
        yield hub


def _repo(hub, repo=REPO, rows=ROWS, card="cc-by-4.0", test_rows=None) -> str:
    if card:
        hub.add_file(repo, "README.md", _card(card), lfs=False)
    if test_rows:
        hub.add_file(repo, "data/test-00000-of-00001.parquet", _parquet(test_rows))
    return hub.add_file(repo, "data/train-00000-of-00001.parquet", _parquet(rows))


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _data_gets(hub) -> list[str]:
    return [p for m, p in hub.log if m == "GET" and p.endswith(".parquet")]


def test_parse_hfds_specs():
    assert parse_spec("hfds:tatsu-lab/alpaca:train") == HfDataset("tatsu-lab/alpaca", "train")
    assert parse_spec(f"hfds:o/n:main@{'ab' * 20}:test[:50]") == HfDataset("o/n", "test", "main", "ab" * 20, 50)
    assert parse_spec("hfds:o/n@v1:train") == HfDataset("o/n", "train", None, "v1")
    for bad, words in (("hfds:o/n", "expected hfds:"), ("hfds:o/n:tr ain", "bad split"), ("hfds:o/n@:train", "revision"),
                       ("hfds:o/n@..:train", "revision"), ("hfds:o--n/x:train", "repo id"), ("hfds:o/n:c/d:train", "config")):
        with pytest.raises(DownloadError) as e:
            parse_spec(bad)
        assert repr(bad) in str(e.value) and words in str(e.value), (bad, str(e.value))


def test_a_split_becomes_jsonl_with_its_commit_rows_digest_and_the_cards_license(hub, tmp_path):
    commit = _repo(hub, test_rows=ROWS[:5])
    out = tmp_path / "out"
    m = fetch(f"hfds:{REPO}:train", out, kind="sft", backoff_s=0.001)
    (path,) = data_files(out)
    assert path.name == "default-train.jsonl" and _jsonl(path) == ROWS
    assert m == read_manifest(out, "download")
    assert m["source"] == {"repo": REPO, "repo_type": "dataset", "config": "default", "split": "train",
                           "revision": commit, "rows": 40, "bytes": path.stat().st_size,
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "endpoint": hub.endpoint,
                           "streamed": False}
    assert m["license"] == "cc-by-4.0" and m["licenses"] == ["cc-by-4.0"]
    assert m["sources"] == [{"name": REPO, "kind": "dataset", "license": "cc-by-4.0", "spec": f"hfds:{REPO}:train",
                             "repo": REPO, "config": "default", "split": "train", "revision": commit}]
    # another split, a row prefix, a pinned commit
    m = fetch(f"hfds:{REPO}@{commit}:test[:3]", tmp_path / "test", backoff_s=0.001)
    assert _jsonl(data_files(tmp_path / "test")[0]) == ROWS[:3] and m["source"]["split"] == "test[:3]"
    with pytest.raises(DownloadError) as e:
        fetch(f"hfds:{REPO}:validation", tmp_path / "v", backoff_s=0.001)
    assert "no split 'validation'" in str(e.value) and "test, train" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-home", "hf-hub", "out", "test"]  # no temp dirs left


def test_offline_the_datasets_cache_is_used_and_a_missing_split_says_how_to_fix(hub, tmp_path, monkeypatch):
    commit = _repo(hub)
    first = fetch(f"hfds:{REPO}:train", tmp_path / "a", backoff_s=0.001)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = fetch(f"hfds:{REPO}:train", tmp_path / "b", backoff_s=0.001)
    assert again["source"]["sha256"] == first["source"]["sha256"] and again["source"]["revision"] == commit
    assert again["license"] == "cc-by-4.0"  # the card, from the hub cache
    with pytest.raises(DownloadError) as e:
        fetch("hfds:owner/never-fetched:train", tmp_path / "c", backoff_s=0.001)
    msg = str(e.value)
    assert "not prepared in the datasets cache" in msg and "HF_HUB_OFFLINE" in msg and "datasets.load_dataset(" in msg
    assert not (tmp_path / "c").exists()


def test_transient_failures_are_retried(hub, tmp_path, monkeypatch):
    from mlxcore.data import download, hfds

    _repo(hub)
    hub.fail_next(2, 503)  # huggingface_hub retries these itself (1 s)
    assert fetch(f"hfds:{REPO}:train", tmp_path / "a", retries=3, backoff_s=0.001)["source"]["rows"] == 40
    assert hub.log[0] == hub.log[1] == hub.log[2]  # the same request, answered the third time
    # past the library's own retries, ours: connection errors with growing backoff, then success
    delays, real, fails = [], hfds.builder, [ConnectionError("refused"), ConnectionError("refused")]

    def flaky(ds, cache):
        if fails:
            raise fails.pop()
        return real(ds, cache)

    monkeypatch.setattr(download, "_sleep", delays.append)
    monkeypatch.setattr(hfds, "builder", flaky)
    m = fetch(f"hfds:{REPO}:train", tmp_path / "b", retries=3, backoff_s=0.01)
    assert m["source"]["rows"] == 40 and len(delays) == 2 and 0.01 <= delays[0] <= 0.015 and 0.02 <= delays[1] <= 0.03
    fails += [ConnectionError("refused")] * 2  # the budget spent: the copy prepared in the datasets cache
    m = fetch(f"hfds:{REPO}:train", tmp_path / "cached", retries=1, backoff_s=0.001)
    assert m["source"]["rows"] == 40 and m["source"]["sha256"] == read_manifest(tmp_path / "a")["source"]["sha256"]
    fails += [ConnectionError("refused")] * 3
    with pytest.raises(DownloadError) as e:  # the budget spent, nothing prepared for this one: how to fix it
        fetch(f"hfds:{REPO}:test", tmp_path / "c", retries=1, backoff_s=0.001)
    assert "failed after 2 attempts" in str(e.value) and "not prepared in the datasets cache" in str(e.value)


def test_the_size_guard_refuses_a_big_split_before_download_and_streams_a_prefix(hub, tmp_path):
    _repo(hub)
    assert len(_parquet(ROWS)) > 1000  # the split's file is over the 0.001 MB limit; 7 rows of JSONL are not
    with pytest.raises(DownloadError) as e:
        fetch(f"hfds:{REPO}:train", tmp_path / "big", max_download_mb=0.001, backoff_s=0.001)
    assert "over the limit of 0.001 MB" in str(e.value) and "train[:N]" in str(e.value)
    assert _data_gets(hub) == [] and not (tmp_path / "big").exists()
    m = fetch(f"hfds:{REPO}:train[:7]", tmp_path / "head", max_download_mb=0.001, backoff_s=0.001)
    assert m["source"]["streamed"] is True and m["source"]["rows"] == 7
    assert _jsonl(data_files(tmp_path / "head")[0]) == ROWS[:7]
    # a prefix whose JSONL outgrows the limit still stops
    with pytest.raises(DownloadError, match="over the limit"):
        fetch(f"hfds:{REPO}:train[:39]", tmp_path / "long", max_download_mb=0.001, backoff_s=0.001)
    assert not (tmp_path / "long").exists()


def test_a_catalog_entry_maps_columns_and_carries_its_own_license(hub, tmp_path):
    commit = _repo(hub, "tatsu-lab/alpaca", card="apache-2.0")  # the catalog's license wins over the card's
    m = fetch("catalog:alpaca", tmp_path / "out", kind="sft", backoff_s=0.001)
    rows = _jsonl(data_files(tmp_path / "out")[0])
    assert rows == [{k: r[k] for k in ("instruction", "input", "output")} for r in ROWS]
    assert m["license"] == "cc-by-nc-4.0" and m["licenses"] == ["cc-by-nc-4.0"]
    assert m["catalog"] == "alpaca" and m["format"] == "alpaca" and m["columns"]["output"] == "output"
    (src,) = m["sources"]
    assert (src["name"], src["repo"], src["revision"], src["license"]) == ("alpaca", "tatsu-lab/alpaca", commit,
                                                                          "cc-by-nc-4.0")
    assert "non-commercial" in src["terms"]


def test_a_mapping_that_names_a_missing_column_fails_clearly(hub, tmp_path):
    _repo(hub, "tatsu-lab/alpaca", rows=[{"instruction": "x", "input": "", "answer": "y"}] * 3)
    with pytest.raises(DownloadError) as e:
        fetch("catalog:alpaca", tmp_path / "out", backoff_s=0.001)
    msg = str(e.value)
    assert "'catalog:alpaca'" in msg and "row 1" in msg and "'output'" in msg and "['answer', 'input', 'instruction']" in msg
    assert not (tmp_path / "out").exists()
