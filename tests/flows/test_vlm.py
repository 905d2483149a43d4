"""The `vlm` flow end to end (tiny), and LoRA on a tiny local VLM model dir: trains, is SIGKILLed
after a checkpoint, resumes bit-identically, and the adapter dir opens and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

import mlxcore  # noqa: F401,E402

from mlxcore.config import TrainConfig, VLMLossConfig, VLMModelConfig, VLMRunConfig, load_config  # noqa: E402
from tests.conftest import kill_after_first_checkpoint  # noqa: E402
import mlx.core as mx  # noqa: E402

ON_CPU = mx.default_device() == mx.cpu

TINY = dict(vision_hidden_size=32, vision_layers=1, vision_heads=2, hidden_size=48, num_layers=1, num_heads=2,
            num_kv_heads=1, intermediate_size=96, embed_dim=32)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from mlxcore.vlm import data, synthetic

    root = tmp_path_factory.mktemp("vlm-scenes")
    synthetic.write(root / "raw", digits=False, scenes=80, val_fraction=0.25)
    data.preprocess({"train": [root / "raw/train.jsonl"], "val": [root / "raw/val.jsonl"]}, root / "data",
                    image_size=8, patch_size=4, max_images_per_sample=1, max_tokens=96, vocab_size=280)
    return root / "data"


def test_lora_on_a_local_vlm_dir_resumes_bit_identically_after_sigkill(scenes, tmp_path):
    from mlx.utils import tree_flatten

    from mlxcore.io import read_manifest
    from mlxcore.models import checkpoint
    from mlxcore.vlm import evaluate, model as vm, presets
    from mlxcore.vlm.train import VLMJob, run

    m = read_manifest(scenes)
    config = presets.config_for(VLMModelConfig(**TINY), m["vocab_size"], m["image_token_id"], m["tokens_per_image"], 8, 4)
    base = checkpoint.save_model_dir(tmp_path / "base", vm.build(config, seed=3), config, tokenizer_dir=scenes / "tokenizer")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in base.iterdir()}

    def job(out):
        return VLMJob(data_dir=str(scenes), out_dir=str(out), init_from=str(base), loss=VLMLossConfig(itm_weight=0.5),
                      train=TrainConfig(steps=24, batch_size=16, lr=5e-3, warmup_steps=2, save_every=6, eval_every=0,
                                        eval_batches=1, log_every=6, keep_last=3, fine_tune_type="lora"))

    straight = run(job(tmp_path / "straight"))
    killed = job(tmp_path / "killed")
    at = kill_after_first_checkpoint(killed, tmp_path)
    assert 0 < at < 24
    resumed = run(killed)
    assert resumed["resumed_from"] and resumed["trainable_params"] < resumed["params"] / 4  # adapters only
    a, b = tmp_path / "straight/model", tmp_path / "killed/model"
    assert (a / "adapter_config.json").is_file() and not (a / "model.safetensors").exists()
    if ON_CPU:
        assert (a / "adapters.safetensors").read_bytes() == (b / "adapters.safetensors").read_bytes()
        assert (a / "optimizer.safetensors").read_bytes() == (b / "optimizer.safetensors").read_bytes()
        assert resumed["val_loss"] == straight["val_loss"]
    assert straight["val_loss"] < straight["initial_val_loss"]
    # the adapter dir opens through our loader (base + adapters) and generates
    model, cfg = checkpoint.load(b)
    assert cfg["model_type"] == "mlxflow_vlm"
    metrics, md = evaluate.evaluate(b, scenes, max_new_tokens=6, samples=2)
    assert metrics["captioning"]["items"] == 20 and "data:image/png;base64," in md
    lora_b = [v for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    assert lora_b and any(float(mx.abs(v).max()) > 0 for v in lora_b)  # the adapters moved off their zero start


def test_vlm_flow_end_to_end(prefect_server, tmp_path):
    from flows.vlm import vlm

    config = load_config(None, [f"out_dir={tmp_path}", "name=vlm-test", "data.scenes=40", "data.image_size=8",
                                "data.patch_size=4", "train.steps=20", "train.warmup_steps=2", "train.batch_size=32", "train.eval_every=0",
                                "train.save_every=0", "eval.max_new_tokens=8", "eval.samples=3",
                                *[f"model.{k}={v}" for k, v in TINY.items()]], cls=VLMRunConfig)
    result = vlm(config)
    ev = result["eval"]
    assert {"retrieval_digits", "retrieval_caption", "zero_shot", "captioning", "vqa"} <= set(ev)
    assert ev["zero_shot"]["items"] == 359 and ev["vqa"]["items"] == 8 and ev["captioning"]["items"] == 8
    assert result["train"]["step"] == 20 and result["train"]["val_loss"] < result["train"]["initial_val_loss"]
    suites = {r["suite"] for r in result["bench"]["rows"]}
    assert {"zero_shot", "captioning", "vqa", "retrieval_digits"} <= suites
    assert json.loads((tmp_path / "vlm-test/vlm-bench.json").read_text()) == result["bench"]["rows"]
    assert_bench_report(tmp_path / "vlm-test", result)
    report = next((tmp_path / "vlm-test").glob("vlm-eval-*/report.md")).read_text()
    assert report.count("data:image/png;base64,") == 3
    # a second run is served from the stage caches: same checkpoint, nothing retrained
    again = vlm(config)
    assert again["checkpoint"] == result["checkpoint"] and again["eval"] == ev


def _md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| suite")]


def assert_bench_report(run_dir: Path, result: dict) -> None:
    """`vlm-bench-*/report.md` (and the report card's bench section) show vlm-bench.json's numbers."""
    rows = json.loads((run_dir / "vlm-bench.json").read_text())
    report = Path(result["bench"]["path"]) / "report.md"
    assert report.parent.name.startswith("vlm-bench-") and report.parent.parent == run_dir
    assert json.loads((report.parent / "report.json").read_text()) == rows
    md_rows = _md_rows(report.read_text())
    assert len(md_rows) == len(rows)
    for r, (suite, metric, model, baseline, kind) in zip(rows, md_rows):
        assert (suite, metric) == (r["suite"], r["metric"]) and float(model) == r["model"]
        assert (baseline == "–") if r["baseline"] is None else float(baseline) == r["baseline"]
    card = (run_dir / "report.md").read_text()  # @reported's report card
    assert "## Bench" in card and "## Evaluation" not in card
    assert all(line in card for line in report.read_text().splitlines() if line.startswith("| "))


def test_vlm_flow_from_hub_image_splits_offline(prefect_server, tmp_path, monkeypatch):
    """data.train / data.val as hfds: specs, read offline from a local HF cache: downloaded (JSONL + PNGs,
    the commit in the manifest), preprocessed, trained, evaluated, reported."""
    from flows.vlm import vlm
    from tests.mlxcore.test_vlm_hub import ENV, N_TEST, N_TRAIN, REPO, image_dataset_cache

    env, commit, _ = image_dataset_cache(tmp_path / "hf")
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = load_config(None, [f"out_dir={tmp_path}", "name=vlm-hub", f"data.train=[hfds:{REPO}:train]",
                                f"data.val=[hfds:{REPO}:test]", "data.image_size=8", "data.patch_size=4",
                                "train.steps=4", "train.warmup_steps=1", "train.batch_size=16", "train.eval_every=0",
                                "train.save_every=0", "eval.max_new_tokens=4", "eval.samples=2",
                                *[f"model.{k}={v}" for k, v in TINY.items()]], cls=VLMRunConfig)
    result = vlm(config)
    run_dir = tmp_path / "vlm-hub"
    from mlxcore.io import read_manifest

    downloads = {read_manifest(d, "download")["source"]["split"]: read_manifest(d) for d in run_dir.glob("vlm-download-*")}
    m = downloads["train"]
    assert m["source"]["revision"] == commit and m["source"]["rows"] == N_TRAIN and m["source"]["images"] == N_TRAIN
    assert result["data"]["splits"]["train"]["rows"] == 2 * N_TRAIN  # a caption row and a QA row per image
    assert result["data"]["splits"]["val"]["rows"] == 2 * N_TEST
    ev = result["eval"]
    assert ev["zero_shot"]["items"] == N_TEST and ev["captioning"]["items"] == N_TEST and ev["vqa"]["items"] == N_TEST
    assert_bench_report(run_dir, result)
    assert "cc-by-4.0" in (Path(result["checkpoint"]) / "README.md").read_text()  # the dataset card's, carried on
    again = vlm(config)  # every stage, the downloads too, served from its cache
    assert again["checkpoint"] == result["checkpoint"] and again["eval"] == ev


def test_fine_tuning_uses_the_models_image_geometry_and_a_conflicting_setting_fails(scenes, tmp_path):
    """init_from one of our VLM dirs (built for 8 px images, 4 px patches): preprocessing takes the
    model's geometry whatever data.image_size / patch_size say by default, and a config that sets
    either to something else fails at load time, naming the key, both values and the fix."""
    from mlxcore.config import ConfigError
    from mlxcore.io import read_manifest
    from mlxcore.models import checkpoint
    from mlxcore.vlm import data, image_geometry, model as vm, presets

    m = read_manifest(scenes)
    config = presets.config_for(VLMModelConfig(**TINY), m["vocab_size"], m["image_token_id"], m["tokens_per_image"], 8, 4)
    base = checkpoint.save_model_dir(tmp_path / "base", vm.build(config, seed=3), config, tokenizer_dir=scenes / "tokenizer")
    assert image_geometry(base) == {"image_size": 8, "patch_size": 4} and image_geometry(tmp_path) is None

    raw = scenes.parent / "raw"
    out = data.preprocess({"train": [raw / "train.jsonl"], "val": [raw / "val.jsonl"]}, tmp_path / "data",
                          image_size=16, patch_size=2, max_images_per_sample=1, max_tokens=96, tokenizer_dir=base)
    assert (out["config"]["image_size"], out["config"]["patch_size"], out["tokens_per_image"]) == (8, 4, 4)

    common = [f"out_dir={tmp_path}", f"init_from={base}"]
    assert load_config(None, common, cls=VLMRunConfig).data.image_size == 16  # the default: unused, not an error
    assert load_config(None, common + ["data.image_size=8"], cls=VLMRunConfig).init_from == str(base)
    for key, value, model in (("image_size", 32, 8), ("patch_size", 2, 4)):
        with pytest.raises(ConfigError, match=rf"data\.{key}={value}, but init_from .* {key} {model} .* set it to {model}"):
            load_config(None, common + [f"data.{key}={value}"], cls=VLMRunConfig)
