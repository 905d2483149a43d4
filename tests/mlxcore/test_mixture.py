"""Weighted mixtures: the weights' shares in every window, a resumable cursor per source, epochs, columns, config."""

from __future__ import annotations

import json
import random
import shutil
from fractions import Fraction

import numpy as np
import pytest

from mlxcore.config import ConfigError, PipelineConfig, load_config
from mlxcore.data import loader, mixture, pretokenize
from mlxcore.data.inputs import check_columns
from mlxcore.data.records import DataError
from mlxcore.train import loop as train
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train

WORDS = [f"{a}{b}" for a in "bcdfghklmnprst" for b in ("a", "e", "i", "o", "u", "ay", "ee")]


def _docs(seed: int, n: int, words: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mix(small_data, tmp_path_factory):
    """Two text sources pretokenized on their own ("web", its text under `body`, 120 rows; "books", 10
    rows, so drawn several times over, at most 8 passes) and their 0.7 / 0.3 mixture."""
    root = tmp_path_factory.mktemp("mix")
    web = _jsonl(root / "web.jsonl", [{"body": d, "id": i} for i, d in enumerate(_docs(1, 120, 40))])
    books = _jsonl(root / "books.jsonl", [{"text": d} for d in _docs(2, 10, 40)])
    opts = {"format": "text", "val_fraction": 0.25, "val_max_rows": 1000}
    pretokenize.pretokenize({"train": [web], "val": []}, small_data["tok"], "pretrain", root / "web",
                            source=opts | {"columns": {"text": "body"}}, progress_bar=False)
    pretokenize.pretokenize({"train": [books], "val": []}, small_data["tok"], "pretrain", root / "books",
                            source=opts, progress_bar=False)
    parts = [{"name": "web", "spec": str(web), "weight": 0.7, "epochs": None, "data_dir": root / "web"},
             {"name": "books", "spec": str(books), "weight": 0.3, "epochs": 8.0, "data_dir": root / "books"}]
    mixture.write_mixture(parts, root / "mix")
    return root


def _windows(data_dir, seq_len=32) -> set[bytes]:
    b = loader.PackedBatches(data_dir, "train", 1, seq_len, shuffle=False)
    return {bytes(b._collate(np.array([i]))[0][0]) for i in range(b.num_items)}


def _stream(root, n, cursor=None, batch_size=8, **kw):
    b = loader.open_batches(root / "mix", "train", batch_size, 32, **kw)
    out = []
    for _ in range(n):
        batch, cursor = b.next(cursor)
        out.append((batch, cursor))
    return out


def test_every_window_of_batches_holds_the_weights_shares(mix):
    web, books = _windows(mix / "web"), _windows(mix / "books")
    assert web and books and not web & books
    rows = {"web": 0, "books": 0}
    for n, ((x, y, m), cursor) in enumerate(_stream(mix, 40, seed=3), 1):
        got = [bytes(r) for r in x]
        rows["web"] += sum(r in web for r in got)
        rows["books"] += sum(r in books for r in got)
        assert rows["web"] + rows["books"] == 8 * n  # every row is a window of one source
        drawn = {s["name"]: s["rows"] for s in cursor["sources"]}
        assert drawn == rows  # the cursor counts what the batches held
        for name, w in (("web", Fraction(7, 10)), ("books", Fraction(3, 10))):
            assert abs(drawn[name] - 8 * n * w) < 1  # within one sequence of its share at every step
    tokens = {s["name"]: s["tokens"] for s in cursor["sources"]}
    assert tokens == {"web": 224 * 32, "books": 96 * 32}  # 320 sequences of 32 tokens: 70% / 30%


def test_draws_are_a_function_of_the_seed_and_resume_exactly_from_the_cursor(mix):
    a, b, c = _stream(mix, 12, seed=5), _stream(mix, 12, seed=5), _stream(mix, 12, seed=6)
    assert all(np.array_equal(p[0][0], q[0][0]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[0][0], q[0][0]) for p, q in zip(a, c))
    assert a[-1][1] == c[-1][1]  # other rows, the same counts per source
    saved = json.loads(json.dumps(a[4][1]))  # as a checkpoint stores it
    for (x, c1), (y, c2) in zip(a[5:], _stream(mix, 7, cursor=saved, seed=5)):
        assert all(np.array_equal(p, q) for p, q in zip(x, y)) and c1 == c2


def test_each_pass_over_a_source_visits_every_window_once_in_a_new_order(mix):
    books = _windows(mix / "books")
    n = len(books)
    stream = _stream(mix, 40, seed=1)
    seen = [bytes(r) for (x, _, _), _ in stream for r in x if bytes(r) in books]
    passes = [seen[i * n:(i + 1) * n] for i in range(len(seen) // n)]
    assert len(passes) >= 3 and all(set(p) == books for p in passes)
    assert passes[0] != passes[1]
    last = stream[-1][1]["sources"][1]
    assert (last["epoch"], last["index"]) == divmod(last["rows"], n)


def test_ranks_deal_the_same_global_batch_and_take_their_slices(mix):
    whole = loader.open_batches(mix / "mix", "train", 8, 32, seed=2).next()
    parts = [loader.open_batches(mix / "mix", "train", 4, 32, seed=2, rank=r, world=2).next() for r in (0, 1)]
    assert sorted(map(bytes, np.concatenate([p[0][0] for p in parts]))) == sorted(map(bytes, whole[0][0]))
    assert parts[0][1] == parts[1][1] == whole[1]


def test_a_source_asked_for_more_passes_than_its_epochs_fails_up_front(mix):
    b = loader.open_batches(mix / "mix", "train", 8, 32)
    n = b.sizes[1]
    assert n < 30  # books is small: 30% of 100 batches of 8 is 240 sequences, over 8 passes
    books = next(p for p in b.plan(100) if p["name"] == "books")
    assert books["rows"] == 240 and books["passes"] == 240 / n
    with pytest.raises(mixture.MixError, match=rf"source books .*240 sequences of its {n}.*epochs is 8"):
        b.check_budget(100)
    b.check_budget(3 * n)  # 0.3 x 8 x 3n = 7.2n sequences: within 8 passes


def test_sft_parts_merge_as_if_collated_together(small_data):
    sft = loader.SFTBatches(small_data["sft"], "train", 1, 64, shuffle=False)
    a, b = np.arange(0, 3), np.arange(10, 14)
    merged = mixture._merge([sft._collate(a), sft._collate(b)], pad_id=0)
    for p, q in zip(merged, sft._collate(np.concatenate([a, b]))):
        np.testing.assert_array_equal(p, q)


def test_an_sft_mixture_trains_on_its_rows_in_the_weights_shares(small_data, tmp_path):
    parts = [{"name": n, "spec": n, "weight": w, "epochs": None, "data_dir": small_data["sft"]}
             for n, w in (("chat", 3), ("more-chat", 1))]
    mixture.write_mixture(parts, tmp_path / "mix")
    (x, y, m), cursor = loader.open_batches(tmp_path / "mix", "train", 8, 64, seed=0).next()
    assert x.shape == y.shape == m.shape and x.shape[1] % 32 == 0 and m.sum(1).min() > 0
    assert [(s["name"], s["rows"]) for s in cursor["sources"]] == [("chat", 6), ("more-chat", 2)]
    assert 0 < sum(s["tokens"] for s in cursor["sources"]) <= 8 * 64  # SFT rows: their kept lengths
    job = TrainJob(data_dir=str(tmp_path / "mix"), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "run"),
                   model=micro_model(), train=quick_train(steps=4, eval_every=0, save_every=0, compile=False))
    result = train.run(job)
    assert [s["rows"] for s in result["mixture"]] == [24, 8] and result["val_loss"] < result["initial_val_loss"]


def test_dealing_keeps_every_source_within_one_sequence_of_its_share():
    rng = random.Random(0)
    for _ in range(40):
        weights = [round(rng.random(), rng.randint(1, 3)) for _ in range(rng.randint(2, 5))]
        if not sum(weights):
            continue
        quota = mixture.quotas(weights)
        total, counts = sum(quota), [0] * len(quota)
        for n, i in enumerate(mixture.deal(quota, counts, 1000), 1):
            counts[i] += 1
            assert all(abs(c - Fraction(n * q, total)) < 1 for c, q in zip(counts, quota)), weights
    assert mixture.quotas([0.7, 0.3]) == [7, 3] and mixture.quotas([2, 0, 1.5]) == [4, 0, 3]


def test_training_on_a_mixture_reports_per_source_tokens_and_resumes_exactly(mix, small_data, tmp_path):
    def job(out, steps=10):
        return TrainJob(data_dir=str(mix / "mix"), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                        model=micro_model(), train=quick_train(steps=steps, seq_len=32, save_every=5, eval_every=0,
                                                               compile=False))

    straight = train.run(job(tmp_path / "a"))
    assert {s["name"]: s["tokens"] for s in straight["mixture"]} == {"web": 56 * 32, "books": 24 * 32}
    shutil.copytree(tmp_path / "a/checkpoints/step-00000005", tmp_path / "b/checkpoints/step-00000005")  # killed there
    cursor = json.loads((tmp_path / "b/checkpoints/step-00000005/trainer_state.json").read_text())["cursor"]
    assert [s["rows"] for s in cursor["sources"]] == [28, 12]
    resumed = train.run(job(tmp_path / "b"))
    assert "step-00000005" in resumed["resumed_from"] and resumed["mixture"] == straight["mixture"]
    assert (tmp_path / "a/model/model.safetensors").read_bytes() == (tmp_path / "b/model/model.safetensors").read_bytes()
    with pytest.raises(mixture.MixError, match="source books"):  # 30% of 200 x 8 sequences: over 8 passes
        train.run(job(tmp_path / "c", steps=200))
    assert not (tmp_path / "c/checkpoints").exists()


# ------------------------------------------------------------------ config and columns


def test_sources_take_a_catalogs_dicts_and_name_each_source():
    catalog = [{"spec": "data/web/*.jsonl", "weight": 0.7, "format": "text", "columns": {"text": "body"}, "epochs": 2.0},
               {"spec": "hf:o/n/books.parquet", "weight": 0.3, "format": None, "columns": {}, "epochs": None}]
    mixed = PipelineConfig.model_validate({"data": {"pretrain": {"sources": catalog}}}).data.pretrain.mixture()
    assert [s.pop("name") for s in mixed] == ["0-web", "1-books"] and mixed == catalog


@pytest.mark.parametrize("sets, expect", [
    (["data.pretrain.sources=[{spec: a.jsonl, weight: 0}, {spec: b.jsonl, weight: 0}]"],
     "data.pretrain.sources: Value error, the weights of the sources sum to 0"),
    (["data.pretrain.sources=[{spec: a.jsonl, weight: -1}]"], "data.pretrain.sources.0.weight: Input should be"),
    (["data.pretrain.train=[a.jsonl]", "data.pretrain.sources=[{spec: b.jsonl}]"], "train (one source) or sources"),
    (["data.sft.sources=[{spec: a.jsonl, colums: {text: body}}]"], "data.sft.sources.0.colums: Extra inputs"),
    (["data.sft.sources=[{spec: a.jsonl, epochs: 0}]"], "data.sft.sources.0.epochs: Input should be greater than 0"),
])
def test_bad_sources_fail_at_config_time_naming_the_field(sets, expect):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert expect in str(err.value)


def test_a_bad_weight_in_a_yaml_names_its_line(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  pretrain:\n    sources:\n      - spec: a.jsonl\n        weight: -0.5\n")
    with pytest.raises(ConfigError, match=r"mix.yaml:5: data.pretrain.sources.0.weight"):
        load_config(path)


def test_a_column_mapping_to_a_missing_column_fails_naming_file_line_and_field(tmp_path):
    data = _jsonl(tmp_path / "web.jsonl", [{"content": "a b c"}])
    with pytest.raises(DataError, match=r"web.jsonl:1: data.pretrain.sources.1.columns.text: no column 'body'"):
        check_columns(str(data), "pretrain", {"text": "body"}, "data.pretrain.sources.1.columns")
    check_columns(str(data), "pretrain", {"text": "content"}, "data.pretrain.sources.1.columns")
