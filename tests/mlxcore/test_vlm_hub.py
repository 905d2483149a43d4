"""Image-text `hfds:` splits for the vlm flow (`mlxcore.vlm.hub`), offline from a local HF cache: a
dataset with datasets' `Image` feature (40 of scikit-learn's digits as PIL images, parquet served once
by the loopback hub stand-in to fill the caches, then the hub stopped and HF_HUB_OFFLINE=1) becomes
JSONL rows + PNG files whose pixels are the originals, with revision / rows / digests in the
manifest; the vlm preprocess reads them unchanged. Bad mappings and specs fail before anything is
written. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from mlxcore.data.download import DownloadError, data_files  # noqa: E402
from mlxcore.io import read_manifest  # noqa: E402
from mlxcore.vlm import hub  # noqa: E402
from mlxcore.vlm.synthetic import DIGIT_WORDS  # noqa: E402
from tests.hubstandin import HubStandin  # noqa: E402

REPO = "owner/digits-captioned"
N_TRAIN, N_TEST = 40, 16
ENV = ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
       "HF_DATASETS_CACHE")


def digit_images(n: int, start: int = 0):
    """(PIL grey images, labels) of scikit-learn's bundled digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((d.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
            for i in range(start, start + n)]
    return imgs, [int(t) for t in d.target[start:start + n]]


def _parquet(imgs, labels) -> bytes:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": imgs, "caption": [f"a handwritten {DIGIT_WORDS[t]}" for t in labels],
                                     "label": labels, "question": ["what digit is this?"] * len(labels),
                                     "answer": [DIGIT_WORDS[t] for t in labels]}, features=features)
    buf = io.BytesIO()
    ds.to_parquet(buf)
    return buf.getvalue()


def image_dataset_cache(root: Path) -> tuple[dict, str, dict]:
    """Fill HF caches under `root` with REPO (train: 40 digits, test: 16) from the loopback stand-in, then
    stop it: (the env that reads those caches offline, the commit, {split: (images, labels)})."""
    from mlxcore.data.download import fetch
    import os

    data = {"train": digit_images(N_TRAIN), "test": digit_images(N_TEST, start=N_TRAIN)}
    env = {"HF_HUB_CACHE": str(root / "hf-hub"), "HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "0"}
    saved = {k: os.environ.get(k) for k in ENV}
    try:
        with HubStandin() as stand_in:
            os.environ.update(env | {"HF_ENDPOINT": stand_in.endpoint})
            for k in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_CACHE"):
                os.environ.pop(k, None)
            stand_in.add_file(REPO, "README.md", b"---\nlicense: cc-by-4.0\n---\n# digits\n", lfs=False)
            stand_in.add_file(REPO, "data/test-00000-of-00001.parquet", _parquet(*data["test"]))
            commit = stand_in.add_file(REPO, "data/train-00000-of-00001.parquet", _parquet(*data["train"]))
            for split in data:  # prepared in the datasets cache (the plain text path: no images written)
                fetch(f"hfds:{REPO}:{split}", root / f"warm-{split}", backoff_s=0.001)
            env["HF_ENDPOINT"] = stand_in.endpoint
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return env | {"HF_HUB_OFFLINE": "1"}, commit, data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-hub")
    env, commit, data = image_dataset_cache(root)
    return root, env, commit, data


@pytest.fixture
def offline(cache, monkeypatch):
    root, env, commit, data = cache
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return commit, data


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_image_split_arrives_as_jsonl_and_pngs_with_its_pixels_revision_rows_and_digests(offline, tmp_path):
    commit, data = offline
    out = tmp_path / "train"
    m = hub.fetch(f"hfds:{REPO}:train", out, {"image": "image", "text": "caption", "label": "label"}, backoff_s=0.001)
    assert m == read_manifest(out, "download")
    (jsonl,) = data_files(out)
    rows = _rows(jsonl)
    imgs, labels = data["train"]
    assert len(rows) == N_TRAIN
    pngs = b""
    for i, (row, img, label) in enumerate(zip(rows, imgs, labels)):
        assert row == {"text": f"a handwritten {DIGIT_WORDS[label]}", "images": [f"images/{i + 1:07d}.png"],
                       "label": label, "task": "caption"}
        png = jsonl.parent / row["images"][0]
        from PIL import Image

        with Image.open(png) as got:
            assert got.mode == "L" and np.array_equal(np.asarray(got), np.asarray(img))  # pixels intact
        pngs += png.read_bytes()
    src = m["source"]
    assert src["revision"] == commit and src["rows"] == N_TRAIN and src["images"] == N_TRAIN
    assert src["sha256"] == hashlib.sha256(jsonl.read_bytes()).hexdigest() and src["bytes"] == jsonl.stat().st_size
    assert src["images_sha256"] == hashlib.sha256(pngs).hexdigest() and src["image_bytes"] == len(pngs)
    assert m["config"] == {"spec": f"hfds:{REPO}:train", "kind": "vlm",
                           "columns": {"image": "image", "text": "caption", "label": "label"}}
    assert m["license"] == "cc-by-4.0" and m["digest"]
    assert sorted(p.name for p in out.iterdir()) == ["default-train.jsonl", "images", "manifest.json"]


def test_the_vlm_preprocess_reads_the_fetched_rows_unchanged(offline, tmp_path):
    from mlxcore.vlm import data as vlm_data

    commit, data = offline
    qa = {"image": "image", "label": "label", "question": "question", "answer": "answer"}
    hub.fetch(f"hfds:{REPO}:train", tmp_path / "train", qa, backoff_s=0.001)  # no text: the label's
    m = hub.fetch(f"hfds:{REPO}:test", tmp_path / "test", backoff_s=0.001)  # no mapping: guessed
    assert m["source"]["columns"] == qa | {"text": "caption"}
    files = {"train": [str(p) for p in data_files(tmp_path / "train")],
             "val": [str(p) for p in data_files(tmp_path / "test")]}
    rows = _rows(Path(files["train"][0]))
    _, labels = data["train"]
    assert rows[0] == {"text": f"a photo of the digit {DIGIT_WORDS[labels[0]]}", "images": ["images/0000001.png"],
                       "label": labels[0], "task": "classes"}
    assert rows[1]["messages"][1] == {"role": "assistant", "content": DIGIT_WORDS[labels[0]]}
    parsed = {s: [r for f in fs for r in vlm_data.read_jsonl(f, max_images=1)] for s, fs in files.items()}
    assert len(parsed["train"]) == 2 * N_TRAIN and len(parsed["val"]) == 2 * N_TEST  # (the full preprocess: the flow test)
    assert [r["kind"] for r in parsed["train"][:2]] == ["text", "chat"] and parsed["train"][1]["answer"] == rows[1][
        "messages"][1]["content"]
    imgs, _ = data["train"]
    want = np.stack([(np.asarray(im.convert("RGB"), np.float32) / 255.0 - 0.5) / 0.5 for im in imgs])
    got = np.stack([vlm_data.load_image(r["images"][0], 8, r["where"]) for r in parsed["train"][::2]])
    assert np.abs(got - want).max() < 1e-6  # what the preprocess stores (8x8: no resampling)
    assert [r["label"] for r in parsed["train"][::2]] == labels


@pytest.mark.parametrize("columns, words", [
    ({"image": "image", "text": "nope"}, ["no column 'nope'", "the split has", "caption"]),
    ({"image": "caption", "text": "caption"}, ["column 'caption'", "not an image", "image columns: ['image']"]),
    ({"image": "image", "colour": "caption"}, ["unknown field", "colour"]),
    ({"text": "caption"}, ["names no `image` column"]),
])
def test_a_bad_mapping_fails_naming_the_column_before_anything_is_written(offline, tmp_path, columns, words):
    with pytest.raises(DownloadError) as e:
        hub.fetch(f"hfds:{REPO}:train", tmp_path / "out", columns, backoff_s=0.001)
    assert f"hfds:{REPO}:train" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir


@pytest.mark.parametrize("spec, words", [
    ("hfds:owner/x", ["expected hfds:"]),
    ("hfds:o--n/x:train", ["bad repo id"]),
    (f"hf:{REPO}/data/rows.jsonl", ["hf: files are not supported", "hfds:"]),
    ("catalog:gsm8k-train", ["not image-text", "--kind vlm"]),
    ("catalog:mnist", ["unknown catalog dataset", "mnist-train"]),
    ("s3:bucket/rows.jsonl", ["unknown spec prefix 's3:'"]),
])
def test_a_bad_spec_fails_before_anything_is_fetched(offline, tmp_path, spec, words):
    with pytest.raises(DownloadError) as e:
        hub.fetch(spec, tmp_path / "out")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_a_split_never_cached_says_how_to_get_it(offline, tmp_path):
    with pytest.raises(DownloadError) as e:
        hub.fetch("hfds:owner/never-fetched:train", tmp_path / "out", backoff_s=0.001)
    assert "not prepared in the datasets cache" in str(e.value) and not (tmp_path / "out").exists()


def test_catalog_image_entries_parse_with_their_mapping():
    from mlxcore.data import catalog
    from mlxcore.data.download import parse_spec

    names = [e.name for e in catalog.entries("vlm")]
    assert {"mnist-train", "mnist-test", "flickr8k-train", "flickr8k-val"} <= set(names)
    ds = parse_spec("catalog:mnist-train", "vlm")
    assert (ds.repo, ds.split, dict(ds.columns), ds.license) == ("ylecun/mnist", "train",
                                                                 {"image": "image", "label": "label"}, "mit")
    hub.check_spec("catalog:flickr8k-val")  # kind vlm: accepted
