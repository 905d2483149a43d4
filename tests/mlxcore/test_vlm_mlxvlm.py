"""LoRA / DoRA / QLoRA on an mlx-vlm model dir (a tiny random llava built here): preprocessing
with the model's own tokenizer and image processor, training on the shared loop (loss falls; an
lr=0 control stays put), SIGKILL + resume bit-identical, and mlx-vlm itself opening the adapter
dir with logits equal to ours and generating. Bad `init_from` values fail with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mlx_vlm")

import mlxcore  # noqa: F401,E402
import mlx.core as mx  # noqa: E402

from mlxcore.config import QuantizeConfig, TrainConfig, VLMLossConfig  # noqa: E402
from mlxcore.vlm import data as vd  # noqa: E402
from mlxcore.vlm import mlxvlm  # noqa: E402
from mlxcore.vlm.train import VLMJob, run  # noqa: E402
from tests.conftest import kill_after_first_checkpoint  # noqa: E402

ON_CPU = mx.default_device() == mx.cpu
LM_ONLY = VLMLossConfig(contrastive_weight=0, itm_weight=0)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict:
    """Scenes (caption + QA rows), a tiny BPE, a random llava dir on it, the rows preprocessed for it."""
    from mlxcore.data import tokenizer as toks
    from mlxcore.vlm import synthetic

    root = tmp_path_factory.mktemp("llava")
    synthetic.write(root / "raw", digits=False, scenes=48, val_fraction=0.25)
    texts = [r.get("text") or json.dumps(r["messages"]) for r in map(json.loads, open(root / "raw/train.jsonl"))]
    toks.train_bpe(texts, 300, 2, root / "bpe")
    base = mlxvlm.build_tiny(root / "base", root / "bpe", image_size=16, patch_size=4, seed=1)
    files = {"train": [root / "raw/train.jsonl"], "val": [root / "raw/val.jsonl"]}
    m = vd.preprocess(files, root / "data", image_size=8, patch_size=2, max_images_per_sample=1, max_tokens=96,
                      tokenizer_dir=base)
    return {"root": root, "base": base, "data": root / "data", "manifest": m, "files": files}


def _job(llava, out: Path, steps=18, loss=LM_ONLY, **train) -> VLMJob:
    t = dict(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, save_every=6, eval_every=0, eval_batches=2,
             log_every=6, keep_last=3, fine_tune_type="lora", lora={"rank": 4, "num_layers": 2}) | train
    return VLMJob(data_dir=str(llava["data"]), out_dir=str(out), init_from=str(llava["base"]), loss=loss,
                  train=TrainConfig(**t))


def _mlx_vlm_logits(model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """mlx-vlm's own forward (batch 1, pixel_values channels first as its processor makes them)."""
    out = model(mx.array(ids[None]), mx.array(pixels[None].transpose(0, 3, 1, 2)), mask=None)
    return np.array(out.logits)


def _mlx_vlm_generate(model, processor, ids: np.ndarray, pixels: np.ndarray):
    """mlx-vlm's `generate` on a prompt we prepared (its llava processor cannot run here: mlx-vlm 0.7.10
    passes `padding` on to transformers 5.25's image processor, which rejects it)."""
    from mlx_vlm import generate

    return generate(model, processor, "", input_ids=mx.array(ids[None]), pixel_values=mx.array(pixels[None].transpose(0, 3, 1, 2)),
                    max_tokens=4, verbose=False)


def _first_row(llava) -> tuple[np.ndarray, np.ndarray]:
    s = vd.Split(llava["data"], "val")
    ts, tl, is_ = (int(v) for v in s.index[0][:3])
    return s.tokens[ts:ts + tl], s.pixels[is_].astype(np.float32)


def test_preprocess_uses_the_models_tokenizer_and_image_processor(llava):
    from PIL import Image
    from mlx_vlm import load

    m, cfg = llava["manifest"], json.loads((llava["base"] / "config.json").read_text())
    # the model decides: 16 px images, 4 px patches -> 16 tokens, its <image> token, CLIP normalisation
    assert m["tokens_per_image"] == 16 and m["image_token_id"] == cfg["image_token_index"]
    assert m["config"]["image_size"] == 16 and m["vocab_size"] == cfg["text_config"]["vocab_size"]
    ids, pix = _first_row(llava)
    assert np.sum(ids == cfg["image_token_index"]) == 16
    row = json.loads(open(llava["files"]["val"][0]).readline())
    img_path = Path(llava["files"]["val"][0]).parent / (row.get("images") or [row["messages"][0]["content"][0]["image"]])[0]
    ref = mlxvlm.pixels(mlxvlm.image_processor(llava["base"]), Image.open(img_path).convert("RGB"))
    np.testing.assert_allclose(pix, ref, atol=2e-3)  # stored as float16
    assert {"preprocessor_config.json", "processor_config.json"} <= {p.name for p in (llava["data"] / "tokenizer").iterdir()}
    # our forward (the trainer's) is mlx-vlm's forward
    ours, _ = mlxvlm.load(llava["base"])
    theirs, processor = load(str(llava["base"]))
    np.testing.assert_allclose(np.array(ours(mx.array(ids[None]), mx.array(pix[None, None]))),
                               _mlx_vlm_logits(theirs, ids, pix), atol=1e-5)
    prompt = ids[:int(np.argmax(vd.Split(llava["data"], "val").mask[:len(ids)] > 0))]  # the image tokens
    out = _mlx_vlm_generate(theirs, processor, prompt, pix)
    assert isinstance(out.text, str) and out.generation_tokens == 4


@pytest.mark.slow  # a training subprocess (it imports mlx-vlm): ~15 s idle, more on busy cores
def test_lora_trains_resumes_after_sigkill_and_mlx_vlm_opens_the_adapters(llava, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_vlm import load

    from mlxcore.models import checkpoint
    from mlxcore.vlm import evaluate

    straight = run(_job(llava, tmp_path / "straight"))
    control = run(_job(llava, tmp_path / "control", lr=0.0))
    assert straight["initial_val_loss"] == control["initial_val_loss"]  # lora_b starts at 0: the base's loss
    assert straight["val_loss"] < straight["initial_val_loss"] - 0.3, straight
    assert control["val_loss"] == control["initial_val_loss"]  # lr 0: nothing moves
    assert straight["trainable_params"] < straight["params"] / 5  # adapters only (the vision tower is frozen)
    state = json.loads((tmp_path / "straight/model/trainer_state.json").read_text())
    logged = [h for h in state["history"] if h["event"] == "train"]
    assert logged and all("lm_loss" in h and "contrastive_loss" not in h for h in logged)

    killed = _job(llava, tmp_path / "killed")
    assert 0 < kill_after_first_checkpoint(killed, tmp_path) < 18  # the child process imports mlx-vlm, never torch
    resumed = run(killed)
    assert resumed["resumed_from"] and "step-" in resumed["resumed_from"]
    a, b = tmp_path / "straight/model", tmp_path / "killed/model"
    if ON_CPU:
        assert (a / "adapters.safetensors").read_bytes() == (b / "adapters.safetensors").read_bytes()
        assert resumed["val_loss"] == straight["val_loss"]

    # mlx-vlm opens base + adapter dir: the same logits as ours, and it generates
    acfg = json.loads((b / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lora" and all(k.startswith("language_model.model.layers.")
                                                     for k in acfg["lora_parameters"]["keys"])
    ours, cfg = checkpoint.load(b)
    assert cfg["model_type"] == "llava"
    theirs, processor = load(str(llava["base"]), adapter_path=str(b))
    ids, pix = _first_row(llava)
    np.testing.assert_allclose(np.array(ours(mx.array(ids[None]), mx.array(pix[None, None]))),
                               _mlx_vlm_logits(theirs, ids, pix), atol=1e-4)
    lora_b = [v for k, v in tree_flatten(ours.trainable_parameters()) if k.endswith("lora_b")]
    assert lora_b and any(float(mx.abs(v).max()) > 0 for v in lora_b)
    assert _mlx_vlm_generate(theirs, processor, ids[:20], pix).generation_tokens == 4
    # vlm-eval on it: generation metrics (no joint space, so no retrieval)
    metrics, _ = evaluate.evaluate(b, llava["data"], max_new_tokens=3, samples=1)
    assert metrics["captioning"]["items"] > 0 and "retrieval_caption" not in metrics


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_dora_and_qlora_adapters_open_in_mlx_vlm(llava, tmp_path, kind):
    from mlx_vlm import load

    from mlxcore.models import checkpoint

    extra = {"fine_tune_type": "dora"} if kind == "dora" else {"quantize": QuantizeConfig(bits=4, group_size=32)}
    result = run(_job(llava, tmp_path / kind, steps=6, **extra))
    assert result["val_loss"] < result["initial_val_loss"]
    d = Path(result["checkpoint"])
    acfg = json.loads((d / "adapter_config.json").read_text())
    assert ("base_quantization" in acfg) == (kind == "qlora")
    ours, _ = checkpoint.load(d)
    theirs, _ = load(str(llava["base"]), adapter_path=str(d))
    ids, pix = _first_row(llava)
    np.testing.assert_allclose(np.array(ours(mx.array(ids[None]), mx.array(pix[None, None]))),
                               _mlx_vlm_logits(theirs, ids, pix), atol=1e-4)


def test_bad_init_from_fails_clearly(llava, tmp_path):
    import shutil

    base = llava["base"]
    cfg = json.loads((base / "config.json").read_text())

    def variant(name: str, config: dict) -> Path:
        d = tmp_path / name
        shutil.copytree(base, d)
        (d / "config.json").write_text(json.dumps(config))
        return d

    text_only = variant("text-only", cfg["text_config"])
    qwen = variant("qwen2-vl", cfg | {"model_type": "qwen2_vl"})
    cases = [
        (dict(init_from=str(text_only)), "not a vision-language model dir"),
        (dict(init_from=str(qwen)), "model_type 'qwen2_vl' is not supported"),
        (dict(init_from=str(tmp_path / "nowhere")), "no such directory"),
        (dict(loss=VLMLossConfig(itm_weight=0)), "loss.contrastive_weight: 0"),
        (dict(loss=VLMLossConfig(contrastive_weight=0, itm_weight=0.5)), "loss.itm_weight: 0"),
        (dict(train_kw={"fine_tune_type": "full"}), "train.fine_tune_type"),
    ]
    for over, message in cases:
        job = _job(llava, tmp_path / "out", **over.pop("train_kw", {}))
        job = job.model_copy(update=over)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(job)
    # data preprocessed for tiny-vlm (its own BPE and image token) does not fit the llava
    other = tmp_path / "own-data"
    vd.preprocess(llava["files"], other, image_size=8, patch_size=4, max_images_per_sample=1, max_tokens=96,
                  vocab_size=280)
    with pytest.raises(ValueError, match="preprocess with init_from set"):
        run(_job(llava, tmp_path / "out2").model_copy(update={"data_dir": str(other)}))
    assert not (tmp_path / "out/model").exists() and not (tmp_path / "out2/model").exists()
