"""Licenses travel: a catalog dataset (fetched from the loopback hub stand-in) through pretokenize and a
real (tiny) training run ends as a checkpoint whose manifest and README.md model card name its datasets
and licenses; training on from it adds the new data's terms; exports carry the card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mlxcore import lineage
from mlxcore.io import read_manifest
from tests.conftest import micro_model, quick_train
from tests.hubstandin import HubStandin

ROWS = [{"instruction": f"Sort: {i} {i + 2} {i + 1}", "input": "", "output": f"{i} {i + 1} {i + 2}", "text": "x"}
        for i in range(60)]


def _parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def alpaca_run(small_data, tmp_path_factory):
    """catalog:alpaca from the stand-in -> pretokenize (the session's 512-token BPE) -> 3 SFT steps of a
    2-layer model from scratch -> a second run from it on the synthetic SFT shards."""
    from mlxcore.data.download import fetch
    from mlxcore.data.pretokenize import pretokenize
    from mlxcore.train.loop import TrainJob, run

    root = tmp_path_factory.mktemp("card")
    mp = pytest.MonkeyPatch()
    try:
        with HubStandin() as hub:
            for var, value in (("HF_ENDPOINT", hub.endpoint), ("HF_HUB_CACHE", str(root / "hub")),
                               ("HF_HOME", str(root / "home")), ("HF_HUB_OFFLINE", "0")):
                mp.setenv(var, value)
            mp.delenv("HF_DATASETS_OFFLINE", raising=False)
            mp.delenv("HF_DATASETS_CACHE", raising=False)
            commit = hub.add_file("tatsu-lab/alpaca", "data/train-00000-of-00001.parquet", _parquet(ROWS))
            fetch("catalog:alpaca", root / "download", kind="sft", backoff_s=0.001)
    finally:
        mp.undo()
    pretokenize({"train": [str(root / "download")], "val": []}, small_data["tok"], "sft", root / "shards",
                source={"val_fraction": 0.1}, progress_bar=False)
    train = quick_train(steps=3, eval_every=0, save_every=0, batch_size=4, compile=False)
    first = run(TrainJob(data_dir=str(root / "shards"), tokenizer_dir=str(small_data["tok"]), out_dir=str(root / "a"),
                         model=micro_model(), train=train))
    second = run(TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]),
                          out_dir=str(root / "b"), init_from=first["checkpoint"], train=train))
    return {"root": root, "commit": commit, "first": first["checkpoint"], "second": second["checkpoint"]}


def _card(model_dir):
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(model_dir) / "README.md")


def test_the_license_travels_from_the_download_through_pretokenize_to_the_checkpoint(alpaca_run):
    root = alpaca_run["root"]
    for stage in (root / "download", root / "shards", Path(alpaca_run["first"])):
        m = read_manifest(stage)
        assert m["licenses"] == ["cc-by-nc-4.0"], stage
        (src,) = m["sources"]
        assert (src["name"], src["repo"], src["revision"]) == ("alpaca", "tatsu-lab/alpaca", alpaca_run["commit"])
    assert "README.md" not in read_manifest(alpaca_run["first"])["files"]  # the card is not part of the digest


def test_the_model_card_states_the_datasets_license_and_combined_terms(alpaca_run):
    card = _card(alpaca_run["first"])
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["tatsu-lab/alpaca"]
    assert card.data.library_name == "mlx" and "non-commercial" in card.data.tags and card.data.base_model is None
    assert "Contains CC BY-NC 4.0 data: non-commercial use only" in card.text
    assert "| alpaca | dataset | cc-by-nc-4.0 | tatsu-lab/alpaca |" in card.text
    assert "| steps | 3 |" in card.text  # the training config


def test_training_on_adds_the_new_datas_terms_and_names_the_base(alpaca_run):
    m = read_manifest(alpaca_run["second"])
    assert m["licenses"] == ["cc-by-nc-4.0", "mit"]  # alpaca via the base, the synthetic SFT rows
    assert {s["name"] for s in m["sources"]} == {"alpaca", "mlxflow-synthetic"}
    assert m["base_model"] == str(Path(alpaca_run["first"]).resolve())
    card = _card(alpaca_run["second"])
    assert card.data.license == "other" and card.data.license_name == "mixed-data-licenses"
    assert card.data.datasets == ["tatsu-lab/alpaca"] and card.data.base_model is None  # a local base: in the text
    assert f"Base model: `{m['base_model']}` (a local model dir)" in card.text
    assert "cc-by-nc-4.0: non-commercial use only" in card.text and "mit: permissive" in card.text


def test_a_flow_rewrites_the_card_with_results_and_exports_carry_it(alpaca_run, tmp_path):
    from mlxcore.models import card as cards

    model = Path(alpaca_run["first"])
    digest = read_manifest(model)["digest"]
    cards.write_card(model, results={"eval": {"sft": {"loss": 1.25, "ppl": 3.49, "tokens": 900}},
                                     "bench": {"overall": {"me": {"accuracy": 0.5}, "random": {"accuracy": 0.1}},
                                               "accuracy": {"sort": {"me": 0.5, "random": 0.1}}},
                                     "sample exact match": 0.75})
    text = _card(model).text
    assert "| sft | 1.25 | 3.49 | 900 |" in text and "| sort | 0.5 | 0.1 |" in text and "| sample exact match | 0.75 |" in text
    assert read_manifest(model)["digest"] == digest
    out = cards.export_card(model, tmp_path, "gguf", ["gguf", "q8_0"])
    exported = _card(tmp_path)
    assert out == tmp_path / "README.md" and exported.data.library_name == "gguf"
    assert exported.data.license == "cc-by-nc-4.0" and {"mlx", "gguf", "q8_0"} <= set(exported.data.tags)


def test_a_teacher_is_a_source_without_its_credentials():
    src = lineage.teacher_source("qwen2.5:7b", "ollama", "http://user:secret@127.0.0.1:11434")
    assert src == {"name": "qwen2.5:7b", "kind": "teacher", "license": "unknown", "api": "ollama",
                   "url": "http://127.0.0.1:11434", "note": src["note"]}
    lin = lineage.merge(lineage.of_sources(src), {"sources": [lineage.SYNTHETIC], "licenses": ["mit"]})
    assert lin["licenses"] == ["mit", "unknown"] and lineage.combined_license(lin["licenses"]) == "other"
    assert lineage.terms(["mit", "cc-by-sa-3.0", "cc-by-nc-4.0"])[0].startswith("cc-by-nc-4.0: non-commercial")
    assert json.loads(json.dumps(lin)) == lin
