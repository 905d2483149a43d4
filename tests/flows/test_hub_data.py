"""The pipeline's download stage against a loopback hub stand-in: `gsm8k:train` is fetched as the
hub serves it (parquet under main/), size-guarded, cached, and still used when the hub is gone."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from mlxcore.config import PipelineConfig, load_config
from mlxcore.data.download import GSM8K_REPO
from mlxcore.io import read_manifest

from tests.conftest import REPO
from tests.hubstandin import HubStandin

pytestmark = pytest.mark.usefixtures("prefect_server")


def _gsm8k_parquet(n: int = 300) -> bytes:
    """GSM8K-shaped rows (question, answer ending in #### n) as the hub's parquet file."""
    rows = [(f"Tom has {i} apples and buys {i % 7 + 1} more. How many apples does he have?",
             f"{i} + {i % 7 + 1} = <<{i}+{i % 7 + 1}={i + i % 7 + 1}>>{i + i % 7 + 1}\n#### {i + i % 7 + 1}")
            for i in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"question": [q for q, _ in rows], "answer": [a for _, a in rows]}), buf)
    return buf.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubStandin() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        yield hub


def _config(tmp_path, *sets):
    return load_config(REPO / "configs/smoke.yaml", [
        f"out_dir={tmp_path / 'runs'}", "data.sft.train=[gsm8k:train]", "data.sft.val_max_rows=16", "sft.seq_len=64",
        "pretrain.steps=5", "pretrain.eval_every=0", "pretrain.save_every=0", "sft.steps=4", "sft.eval_every=0",
        "sft.save_every=0", "sft.warmup_steps=1", "sample.num_prompts=1", "sample.max_tokens=4", "bench=null",
        "export=null", *sets],
        cls=PipelineConfig)


def test_pipeline_downloads_gsm8k_from_the_hub_then_runs_offline_from_its_cache(hub, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    data = _gsm8k_parquet()
    commit = hub.add_file(GSM8K_REPO, "main/train-00000-of-00001.parquet", data)
    state = pipeline(_config(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    dl, = (tmp_path / "runs/smoke").glob("download-*")
    source = read_manifest(dl)["source"]
    assert source["revision"] == commit and source["size"] == len(data) and source["repo"] == GSM8K_REPO
    assert read_manifest(dl)["license"] == "mit"  # gsm8k:train is the catalog's gsm8k-train
    # the final model's card: GSM8K (MIT) and the synthetic pretraining text (mlxflow's own, MIT)
    from huggingface_hub import ModelCard

    final = state.result()["checkpoint"]
    card = ModelCard.load(f"{final}/README.md")
    assert card.data.license == "mit" and card.data.datasets == [GSM8K_REPO] and card.data.library_name == "mlx"
    assert {s["name"] for s in read_manifest(final)["sources"]} == {"gsm8k-train", "mlxflow-synthetic"}
    assert "## Held-out evaluation" in card.text
    pre = next(d for d in (tmp_path / "runs/smoke").glob("pretokenize-*") if read_manifest(d)["task"] == "sft")
    m = read_manifest(pre)
    assert m["formats"] == {"train-00000-of-00001.parquet": "gsm8k"} and m["stats"]["rows"] == 300
    assert 1 <= m["splits"]["val"]["num_docs"] <= 8  # about 1% of 300 held out

    # hub gone, offline: the same config is all cached; a fresh run dir is served from the HF cache
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = pipeline(_config(tmp_path / "again"), return_state=True)
    assert state.is_completed(), state.message
    dl2, = (tmp_path / "again/runs/smoke").glob("download-*")
    assert read_manifest(dl2)["source"]["sha256"] == source["sha256"]


def test_a_file_over_max_download_mb_is_refused_before_download(hub, tmp_path, capsys):
    hub.add_file(GSM8K_REPO, "main/train-00000-of-00001.parquet", _gsm8k_parquet())
    code = main(["run", "pipeline", "--config", str(REPO / "configs/smoke.yaml"), "--set", f"out_dir={tmp_path}",
                 "--set", "data.sft.train=[gsm8k:train]", "--set", "data.max_download_mb=0.001"])
    err = capsys.readouterr().err
    assert code == 1 and "gsm8k:train" in err and "max_download_mb" in err, err
    assert not [m for m, _ in hub.log if m == "GET"]
    assert not list((tmp_path / "smoke").glob("download-*"))
