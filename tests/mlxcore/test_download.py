"""Data downloads: hub specs against a loopback hub stand-in, the real HF cache layout, offline use,
size guard, retries, spec validation, local files. Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from mlxcore.data import download
from mlxcore.data.download import (GSM8K_REPO, MINIMIND_REPO, DownloadError, HubFile, LocalFiles, data_files,
                                   fetch, parse_spec)
from mlxcore.io import read_manifest
from tests.hubstandin import HubStandin, closed_endpoint

REPO = "owner/name"
COMMIT = "ab" * 20
DATA = b"".join(b'{"text": "row %d"}\n' % i for i in range(200))
SPEC = f"hf:{REPO}/data/train.jsonl"


@pytest.fixture
def hub():
    with HubStandin() as h:
        yield h


@pytest.fixture
def cache(monkeypatch, tmp_path, hub) -> Path:
    """Online against the stand-in, with a private HF cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def _resolves(hub, method=None):
    return hub.requests(method, "/resolve/")


def _storage(cache: Path, repo: str = REPO) -> Path:
    return cache / ("datasets--" + repo.replace("/", "--"))


# ------------------------------------------------------------------ hub downloads


def test_hf_spec_downloads_into_the_real_hf_cache_layout(hub, cache, tmp_path):
    commit = hub.add_file(REPO, "data/train.jsonl", DATA, commit=COMMIT)
    out = tmp_path / "out"
    m = fetch(SPEC, out, kind="pretrain", backoff_s=0.001)

    sha = hashlib.sha256(DATA).hexdigest()
    assert m == read_manifest(out, "download")
    assert m["config"] == {"spec": SPEC, "kind": "pretrain"}
    assert m["source"] == {"repo": REPO, "repo_type": "dataset", "revision": commit, "path": "data/train.jsonl",
                           "size": len(DATA), "sha256": sha, "endpoint": hub.endpoint}
    assert m["data_files"] == ["train.jsonl"] and m["files"] == {"train.jsonl": sha}
    assert (out / "train.jsonl").read_bytes() == DATA
    assert data_files(out) == [out.resolve() / "train.jsonl"]

    store = _storage(cache)
    blob = store / "blobs" / sha
    snap = store / "snapshots" / commit / "data" / "train.jsonl"
    assert blob.read_bytes() == DATA
    assert snap.is_symlink() and os.readlink(snap) == f"../../../blobs/{sha}"
    assert (store / "refs" / "main").read_text() == commit
    assert os.path.samefile(out / "train.jsonl", blob)  # a hard link, not a second copy
    assert len(_resolves(hub, "GET")) == 1
    assert sorted(os.listdir(tmp_path)) == ["hf-cache", "out"]  # no temp dirs left over


def test_the_license_comes_from_the_repo_card_else_unknown(hub, cache, tmp_path, monkeypatch):
    hub.add_file(REPO, "data/train.jsonl", DATA)
    m = fetch(SPEC, tmp_path / "no-card", backoff_s=0.001)
    assert m["license"] == "unknown" and m["sources"][0]["license"] == "unknown"
    commit = hub.add_file(REPO, "README.md", b"---\nlicense: cc-by-sa-4.0\n---\n# data\n", commit="cd" * 20,
                          lfs=False)  # a new commit: the first fetch cached "no card" for the old one
    m = fetch(SPEC, tmp_path / "card", backoff_s=0.001)
    assert m["license"] == "cc-by-sa-4.0" and m["licenses"] == ["cc-by-sa-4.0"]
    assert m["sources"] == [{"name": REPO, "kind": "dataset", "license": "cc-by-sa-4.0", "spec": SPEC, "repo": REPO,
                             "path": "data/train.jsonl", "revision": commit}]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the card from the cache
    hub.clear_log()
    assert fetch(SPEC, tmp_path / "offline", backoff_s=0.001)["license"] == "cc-by-sa-4.0" and hub.log == []
    local = tmp_path / "mine.jsonl"
    local.write_bytes(DATA)
    m = fetch(str(local), tmp_path / "local")
    assert m["license"] == "unknown" and m["sources"] == [{"name": str(local), "kind": "file", "license": "unknown",
                                                           "files": 1}]


def test_a_catalog_hub_file_with_a_column_mapping_is_rewritten_to_our_fields(hub, cache, tmp_path, monkeypatch):
    from mlxcore.data import catalog

    rows = b"".join(b'{"q": "question %d", "a": "answer %d", "id": %d}\n' % (i, i, i) for i in range(5))
    hub.add_file(REPO, "qa.jsonl", rows)
    text = (f"datasets:\n  qa:\n    description: d\n    kind: sft\n    spec: hf:{REPO}/qa.jsonl\n    repo: {REPO}\n"
            "    format: instruction\n    columns: {prompt: q, response: a}\n    license: cc-by-4.0\n"
            "  bad:\n    description: d\n    kind: sft\n    spec: hf:owner/name/qa.jsonl\n    repo: owner/name\n"
            "    format: instruction\n    columns: {prompt: question, response: a}\n    license: mit\n")
    monkeypatch.setattr(catalog, "load", lambda: catalog.parse(text))
    m = fetch("catalog:qa", tmp_path / "out", backoff_s=0.001)
    (path,) = data_files(tmp_path / "out")
    assert path.name == "qa.jsonl" and m["data_files"] == ["qa.jsonl"] and m["license"] == "cc-by-4.0"
    assert [__import__("json").loads(x) for x in path.read_text().splitlines()] == [
        {"prompt": f"question {i}", "response": f"answer {i}"} for i in range(5)]
    assert (m["catalog"], m["format"], m["columns"]) == ("qa", "instruction", {"prompt": "q", "response": "a"})
    with pytest.raises(DownloadError) as e:
        fetch("catalog:bad", tmp_path / "bad", backoff_s=0.001)
    assert "'catalog:bad'" in str(e.value) and "qa.jsonl: row 1: no column 'question'" in str(e.value)
    assert "['a', 'id', 'q']" in str(e.value) and not (tmp_path / "bad").exists()


def test_refetch_uses_the_cache_online_and_offline(hub, cache, tmp_path, monkeypatch):
    commit = hub.add_file(REPO, "data/train.jsonl", DATA)
    first = fetch(SPEC, tmp_path / "a", backoff_s=0.001)

    hub.clear_log()
    again = fetch(SPEC, tmp_path / "b", backoff_s=0.001)  # online: metadata only, no body
    assert _resolves(hub, "GET") == [] and _resolves(hub, "HEAD")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    offline = fetch(SPEC, tmp_path / "c", backoff_s=0.001)
    assert hub.log == []
    assert offline["source"]["revision"] == commit
    assert (tmp_path / "c" / "train.jsonl").read_bytes() == DATA
    assert first["digest"] == again["digest"] == offline["digest"]


def test_online_fetch_works_when_the_library_was_imported_offline(hub, cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if HF_HUB_OFFLINE=1 at import
    hub.add_file(REPO, "data/train.jsonl", DATA)
    fetch(SPEC, tmp_path / "out", backoff_s=0.001)
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == DATA
    assert constants.HF_HUB_OFFLINE is True  # restored
    assert [p for _, p in hub.log if "/resolve/" not in p] == []  # no side requests (agent registry)


def test_revision_and_commit_pins(hub, cache, tmp_path, monkeypatch):
    main = hub.add_file(REPO, "x.txt", b"new", commit="11" * 20)
    v1 = hub.add_file(REPO, "x.txt", b"old", commit="22" * 20, revision="v1")
    m = fetch(f"hf:{REPO}@v1/x.txt", tmp_path / "v1", backoff_s=0.001)
    assert m["source"]["revision"] == v1 and (tmp_path / "v1" / "x.txt").read_bytes() == b"old"
    assert (_storage(cache) / "refs" / "v1").read_text() == v1
    m = fetch(f"hf:{REPO}/x.txt", tmp_path / "main", backoff_s=0.001)
    assert m["source"]["revision"] == main and (tmp_path / "main" / "x.txt").read_bytes() == b"new"

    hub.clear_log()  # a cached commit is immutable: no request even online
    m = fetch(f"hf:{REPO}@{v1}/x.txt", tmp_path / "pinned", backoff_s=0.001)
    assert hub.log == [] and m["source"]["revision"] == v1


def test_cache_dir_falls_back_to_hf_home(hub, cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub.add_file(REPO, "data/train.jsonl", DATA)
    fetch(SPEC, tmp_path / "out", backoff_s=0.001)
    assert (_storage(tmp_path / "home" / "hub") / "refs" / "main").is_file()
    assert not cache.exists()


# ------------------------------------------------------------------ size guard


def test_size_guard_refuses_before_downloading(hub, cache, tmp_path):
    hub.add_file(REPO, "big.bin", b"x" * 5000)
    spec, out = f"hf:{REPO}/big.bin", tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(spec, out, max_download_mb=0.001, backoff_s=0.001)
    msg = str(e.value)
    assert spec in msg and "5,000 bytes" in msg and "0.005 MB" in msg and "0.001 MB" in msg
    assert "max_download_mb" in msg
    assert _resolves(hub, "GET") == [] and len(_resolves(hub, "HEAD")) == 1
    assert not out.exists() and not (_storage(cache) / "blobs").exists()

    fetch(spec, out, max_download_mb=0.01, backoff_s=0.001)  # under the limit: fine
    assert (out / "big.bin").stat().st_size == 5000
    # Already cached: nothing to download, so the limit does not apply.
    fetch(spec, tmp_path / "again", max_download_mb=0.001, backoff_s=0.001)


# ------------------------------------------------------------------ retries and hub errors


def test_transient_failures_are_retried_with_growing_backoff(hub, cache, tmp_path, monkeypatch):
    delays = []
    monkeypatch.setattr(download, "_sleep", delays.append)
    hub.add_file(REPO, "data/train.jsonl", DATA)
    hub.fail_next(2, 503)
    m = fetch(SPEC, tmp_path / "out", retries=2, backoff_s=0.01)
    assert m["source"]["size"] == len(DATA)
    log = _resolves(hub)
    assert [meth for meth, _ in log[:3]] == ["HEAD"] * 3 and log[-1][0] == "GET"
    assert len(delays) == 2 and 0.01 <= delays[0] <= 0.015 and 0.02 <= delays[1] <= 0.03

    hub.fail_next(1, 429)  # rate limited: transient too
    fetch(SPEC, tmp_path / "out2", retries=1, backoff_s=0.001)


def test_retry_budget_exhausted(hub, cache, tmp_path):
    hub.add_file(REPO, "data/train.jsonl", DATA)
    hub.fail_next(2, 503)
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(SPEC, out, retries=1, backoff_s=0.001)
    msg = str(e.value)
    assert SPEC in msg and "2 attempts" in msg and "503" in msg
    assert len(_resolves(hub)) == 2 and _resolves(hub, "GET") == []
    assert not out.exists()


@pytest.mark.parametrize("spec, words", [
    (f"hf:{REPO}/missing.jsonl", ["file 'missing.jsonl' not found", REPO]),
    ("hf:nobody/nothing/x.jsonl", ["repo nobody/nothing not found"]),
    (f"hf:{REPO}@nope/data/train.jsonl", ["revision 'nope' not found", REPO]),
])
def test_missing_repo_file_or_revision_fails_at_once(hub, cache, tmp_path, spec, words):
    hub.add_file(REPO, "data/train.jsonl", DATA)
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(spec, out, retries=3, backoff_s=0.001)
    assert spec in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert len(hub.log) == 1  # exactly one attempt
    assert not out.exists()


def test_forbidden_fails_at_once(hub, cache, tmp_path):
    hub.add_file(REPO, "data/train.jsonl", DATA)
    hub.fail_next(1, 403)
    with pytest.raises(DownloadError, match="denied"):
        fetch(SPEC, tmp_path / "out", retries=3, backoff_s=0.001)
    assert len(hub.log) == 1


# ------------------------------------------------------------------ offline / unreachable


def _assert_fix_instructions(msg: str, cache: Path):
    assert SPEC in msg and REPO in msg and "data/train.jsonl" in msg
    assert f"hf download {REPO} data/train.jsonl --repo-type dataset" in msg
    assert str(cache) in msg and "HF_ENDPOINT" in msg and "HF_HUB_OFFLINE" in msg and "local" in msg


def test_offline_and_not_cached_says_how_to_fix(hub, cache, tmp_path, monkeypatch):
    hub.add_file(REPO, "data/train.jsonl", DATA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(SPEC, out, backoff_s=0.001)
    _assert_fix_instructions(str(e.value), cache)
    assert hub.log == [] and not out.exists()


def test_unreachable_hub_and_not_cached_says_how_to_fix(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint())
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(SPEC, out, retries=2, backoff_s=0.001)
    _assert_fix_instructions(str(e.value), cache)
    assert "3 attempts" in str(e.value)
    assert not out.exists()


def test_unreachable_hub_falls_back_to_the_cache(hub, cache, tmp_path, monkeypatch):
    commit = hub.add_file(REPO, "data/train.jsonl", DATA)
    fetch(SPEC, tmp_path / "a", backoff_s=0.001)
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint())
    m = fetch(SPEC, tmp_path / "b", retries=1, backoff_s=0.001)
    assert m["source"]["revision"] == commit and (tmp_path / "b" / "train.jsonl").read_bytes() == DATA


# ------------------------------------------------------------------ a hand-built cache


def _gsm8k_parquet() -> tuple[bytes, list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(50)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue(), rows


def _hand_built_cache(cache: Path, data: bytes, commit: str, name: str | None = None) -> Path:
    """The documented HF cache layout, written by hand: blobs/<sha256>, snapshots/<commit>/..., refs/main."""
    store = _storage(cache, GSM8K_REPO)
    sha = name or hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / sha).write_bytes(data)
    snap = store / "snapshots" / commit / "main" / "train-00000-of-00001.parquet"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(f"../../../blobs/{sha}")
    (store / "refs").mkdir()
    (store / "refs" / "main").write_text(commit)
    return store / "blobs" / sha


def test_gsm8k_from_a_hand_built_cache_offline(cache, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data, rows = _gsm8k_parquet()
    commit = "0123456789abcdef0123456789abcdef01234567"
    blob = _hand_built_cache(cache, data, commit)

    out = tmp_path / "gsm8k"
    m = fetch("gsm8k:train", out, kind="sft")
    assert m["source"]["revision"] == commit and m["source"]["repo"] == GSM8K_REPO
    assert m["source"]["path"] == "main/train-00000-of-00001.parquet"
    assert m["source"]["sha256"] == hashlib.sha256(data).hexdigest() and m["source"]["size"] == len(data)
    (path,) = data_files(out)
    assert path.name == "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    assert table.column_names == ["question", "answer"] and table.to_pylist() == rows
    assert blob.read_bytes() == data  # the cache is untouched
    # gsm8k:train is the catalog's gsm8k-train: its license and name travel in the manifest
    assert m["license"] == "mit" and m["licenses"] == ["mit"]
    assert m["sources"] == [{"name": "gsm8k-train", "kind": "dataset", "license": "mit", "spec": "gsm8k:train",
                             "repo": GSM8K_REPO, "path": "main/train-00000-of-00001.parquet", "revision": commit}]


def test_corrupt_cached_blob_is_refused_and_evicted(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data, _ = _gsm8k_parquet()
    blob = _hand_built_cache(cache, data[:-10] + b"x" * 10, "89" * 20, name=hashlib.sha256(data).hexdigest())
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="sha256 mismatch") as e:
        fetch("gsm8k:train", out)
    assert "gsm8k:train" in str(e.value)
    assert not out.exists() and not blob.exists()
    assert os.listdir(tmp_path) == ["hf-cache"]


# ------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize("spec, kind, expected", [
    ("minimind:smoke", None, HubFile(MINIMIND_REPO, "lora_identity.jsonl", None)),
    ("minimind:small", None, HubFile(MINIMIND_REPO, "lora_medical.jsonl", None)),
    ("minimind:auto", "pretrain", HubFile(MINIMIND_REPO, "pretrain_hq.jsonl", None)),
    ("minimind:auto", "sft", HubFile(MINIMIND_REPO, "sft_mini_512.jsonl", None)),
    ("minimind:r1_mix_1024.jsonl", None, HubFile(MINIMIND_REPO, "r1_mix_1024.jsonl", None)),
    ("gsm8k:train", None, HubFile(GSM8K_REPO, "main/train-00000-of-00001.parquet", None)),
    ("gsm8k:test", "sft", HubFile(GSM8K_REPO, "main/test-00000-of-00001.parquet", None)),
    ("hf:a-b/c.d_e/x.jsonl", None, HubFile("a-b/c.d_e", "x.jsonl", None)),
    ("hf:o/n@v1.0/dir/sub/x.parquet", None, HubFile("o/n", "dir/sub/x.parquet", "v1.0")),
    (f"hf:o/n@{COMMIT}/x", None, HubFile("o/n", "x", COMMIT)),
    ("data/*.jsonl", None, LocalFiles("data/*.jsonl")),
])
def test_parse_spec(spec, kind, expected):
    parsed = parse_spec(spec, kind)
    assert parsed == expected
    if isinstance(parsed, HubFile):
        assert parsed.repo_type == "dataset"


def test_parse_spec_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_spec("~/d/*.jsonl") == LocalFiles(f"{tmp_path}/d/*.jsonl")


@pytest.mark.parametrize("spec, kind, words", [
    ("minimind:auto", None, ["kind", "pretrain", "sft"]),
    ("minimind:auto", "eval", ["kind", "'eval'"]),
    ("gsm8k:validation", None, ["gsm8k:train", "gsm8k:test"]),
    ("hf:o/n", None, ["hf:<owner>/<name>"]),
])
def test_parse_spec_errors_name_the_choices(spec, kind, words):
    with pytest.raises(DownloadError) as e:
        parse_spec(spec, kind)
    assert repr(spec) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


JUNK = [
    "hf:a/b/../../etc/passwd", "hf:a/b//x", "hf:a/b/\\x", "hf:../b/x", "minimind:../x", "minimind:a/b",
    "hf:a/b@../main/x", "hf:a/b/x\x00", "hf:a/b//etc/passwd", "hf:a/b/./x", "hf:a/b/x/", "hf:a--b/c/x",
    "hf:a/b@/x", "hf:a/b@v1/x\n", "hf:a/b c/x", "hf:/a/b/x", "minimind:", "minimind:..", "minimind:a\\b",
    "gsm8k:../train",
]


@pytest.mark.parametrize("spec", JUNK)
def test_junk_specs_are_refused_before_any_request(hub, cache, tmp_path, spec):
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as e:
        fetch(spec, out, backoff_s=0.001)
    assert repr(spec) in str(e.value)
    assert hub.log == [] and not out.exists()


@pytest.mark.parametrize("spec", ["foo:bar", "s3:x", "gs:bucket/*.jsonl"])
def test_unknown_prefix(hub, cache, tmp_path, spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError) as e:
        fetch(spec, tmp_path / "out")
    prefix = spec.split(":")[0]
    assert f"unknown spec prefix '{prefix}:'; use minimind:, gsm8k:, hf:, hfds:, catalog: or a local path" in str(e.value)
    assert hub.log == []


def test_existing_file_with_a_colon_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("foo:bar").write_text("hello\n")
    m = fetch("foo:bar", tmp_path / "out")
    assert m["data_files"] == [str((tmp_path / "foo:bar").resolve())]


# ------------------------------------------------------------------ local files


def test_local_glob_lists_sorted_files_and_tracks_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "data"
    d.mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (d / name).write_text(f'{{"text": "{name}"}}\n')

    m1 = fetch("data/*.jsonl", tmp_path / "out1", kind="sft")
    files = data_files(tmp_path / "out1")
    assert files == [(d / "a.jsonl").resolve(), (d / "b.jsonl").resolve()]
    assert m1["data_files"] == [str(p) for p in files]
    assert [f["sha256"] for f in m1["source"]["files"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert os.listdir(tmp_path / "out1") == ["manifest.json"]  # nothing copied

    m_same = fetch("data/*.jsonl", tmp_path / "out1", kind="sft")  # re-fetch replaces the dir
    assert m_same["digest"] == m1["digest"]
    (d / "b.jsonl").write_text('{"text": "changed"}\n')
    m2 = fetch("data/*.jsonl", tmp_path / "out2", kind="sft")
    assert m2["digest"] != m1["digest"]

    single = fetch(str(d / "c.txt"), tmp_path / "out3")
    assert data_files(tmp_path / "out3") == [(d / "c.txt").resolve()]
    assert single["source"]["files"][0]["size"] == (d / "c.txt").stat().st_size


def test_local_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    with pytest.raises(DownloadError, match=r"no file matches 'nothing/\*\.jsonl'"):
        fetch("nothing/*.jsonl", tmp_path / "out")
    with pytest.raises(DownloadError, match="is a directory"):
        fetch("data", tmp_path / "out")
    with pytest.raises(DownloadError, match="is a directory"):
        fetch("d*", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    fetch("data/a.jsonl", tmp_path / "out")
    (tmp_path / "data" / "a.jsonl").unlink()
    with pytest.raises(DownloadError, match="no longer exists"):
        data_files(tmp_path / "out")


# ------------------------------------------------------------------ the stand-in itself


def test_standin_speaks_the_hub_headers(hub):
    import urllib.error
    import urllib.request

    commit = hub.add_file(REPO, "d/x.bin", b"0123456789")
    plain = hub.add_file(REPO, "README.md", b"# hi\n", lfs=False)
    url = f"{hub.endpoint}/datasets/{REPO}/resolve/main/d/x.bin"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["X-Repo-Commit"] == commit and r.headers["Content-Length"] == "10"
        assert r.headers["ETag"] == r.headers["X-Linked-Etag"] == f'"{hashlib.sha256(b"0123456789").hexdigest()}"'
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=4-"})) as r:
        assert r.status == 206 and r.read() == b"456789" and r.headers["Content-Range"] == "bytes 4-9/10"
    with urllib.request.urlopen(f"{hub.endpoint}/datasets/{REPO}/resolve/{plain}/README.md") as r:
        assert r.headers["ETag"] == f'"{hashlib.sha1(b"blob 5" + bytes(1) + b"# hi" + bytes([10])).hexdigest()}"'
        assert r.headers.get("X-Linked-Etag") is None
    for path, code in [(f"{REPO}/resolve/main/nope", "EntryNotFound"), ("a/b/resolve/main/x", "RepoNotFound"),
                       (f"{REPO}/resolve/v9/d/x.bin", "RevisionNotFound")]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{hub.endpoint}/datasets/{path}")
        assert e.value.code == 404 and e.value.headers["X-Error-Code"] == code
    assert hub.log[0] == ("HEAD", f"/datasets/{REPO}/resolve/main/d/x.bin") and len(hub.log) == 6
