"""Vision-language units: row formats and file:line errors, preprocessing, the image-token splice,
the loss components, and (one shared tiny training) that turning the contrastive weight to 0
lowers retrieval recall. Images are scikit-learn's bundled digits and generated scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

import mlxcore  # noqa: F401,E402
import mlx.core as mx  # noqa: E402

from mlxcore.config import TrainConfig, VLMModelConfig  # noqa: E402
from mlxcore.vlm import data as vd  # noqa: E402
from mlxcore.vlm import evaluate as ve  # noqa: E402
from mlxcore.vlm import losses as vl  # noqa: E402
from mlxcore.vlm import model as vm  # noqa: E402
from mlxcore.vlm import presets  # noqa: E402
from mlxcore.vlm import synthetic  # noqa: E402
from mlxcore.vlm.train import VLMJob, run  # noqa: E402

TINY = VLMModelConfig(vision_hidden_size=32, vision_layers=1, vision_heads=2, hidden_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=96, embed_dim=32)


def _png(path: Path, color=(200, 10, 10), size=8):
    from PIL import Image

    Image.new("RGB", (size, size), color).save(path)
    return path.name


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """The digits (no scenes), preprocessed to 8x8 images, 2x2 patches (16 tokens an image)."""
    root = tmp_path_factory.mktemp("vlm-digits")
    synthetic.write(root / "raw", digits=True, scenes=0, val_fraction=0.2)
    m = vd.preprocess({"train": [root / "raw/train.jsonl"], "val": [root / "raw/val.jsonl"]}, root / "data",
                      image_size=8, patch_size=2, max_images_per_sample=1, max_tokens=64, vocab_size=300)
    return {"root": root, "data": root / "data", "manifest": m}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_rows_fail_with_file_and_line_and_write_nothing(tmp_path):
    ok = _png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = {"text": "a red square", "images": [ok]}
    cases = {
        "missing": ({"text": "x", "images": ["nowhere.png"]}, "image 'nowhere.png' not found"),
        "corrupt": ({"text": "x", "images": ["corrupt.png"]}, "cannot read image"),
        "too-many": ({"text": "x", "images": [ok, ok, ok]}, "3 images, more than max_images_per_sample=2"),
        "wrong-field": ({"caption": "x", "images": [ok]}, "a row needs 'text'"),
        "bad-part": ({"messages": [{"role": "user", "content": [{"type": "picture", "image": ok}]},
                                   {"role": "assistant", "content": "y"}]}, "messages[0].content[0]"),
        "markers": ({"text": "<image> and <image>", "images": [ok]}, "2 <image> markers but 1 images"),
    }
    for name, (row, message) in cases.items():
        f = _write(tmp_path / f"{name}.jsonl", [good, good, row])
        with pytest.raises(vd.RowError) as e:
            vd.preprocess({"train": [f]}, tmp_path / f"out-{name}", image_size=8, patch_size=2,
                          max_images_per_sample=2, max_tokens=64)
        assert str(e.value).startswith(f"{f}:3:") and message in str(e.value), (name, str(e.value))
        assert not (tmp_path / f"out-{name}").exists()
    f = _write(tmp_path / "json.jsonl", [good, "{not json"])
    with pytest.raises(vd.RowError, match=rf"^{f}:2: not valid JSON"):
        vd.read_jsonl(f, 2)


def test_rows_become_image_tokens_text_and_masks(tmp_path):
    a, b = _png(tmp_path / "a.png", (255, 0, 0)), _png(tmp_path / "b.png", (0, 0, 255))
    rows = [{"text": "left <image> right <image>", "images": [a, b]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": a},
                                                       {"type": "text", "text": "what color?"}]},
                          {"role": "assistant", "content": "red"}]},
            {"text": "a plain sentence"}]
    f = _write(tmp_path / "rows.jsonl", rows * 4)
    m = vd.preprocess({"train": [f], "val": [f]}, tmp_path / "out", image_size=8, patch_size=4,
                      max_images_per_sample=2, max_tokens=64, vocab_size=280)
    k, img = m["tokens_per_image"], m["image_token_id"]
    assert k == 4 and m["splits"]["train"] == {"rows": 12, "images": 12, "max_images": 2,
                                                 "max_tokens": m["splits"]["train"]["max_tokens"], "max_caption": m["splits"]["train"]["max_caption"]}
    s = vd.Split(tmp_path / "out", "train")
    tok = vd.Encoder(tmp_path / "out/tokenizer", k).tok
    # row 0: "left " then 4 image tokens, " right " then 4 more; the loss covers the text and the end token
    ts, tl = s.index[0][:2]
    ids, mask = s.tokens[ts:ts + tl], s.mask[ts:ts + tl]
    where = np.flatnonzero(ids == img)
    assert len(where) == 2 * k and where[0] > 0 and np.all(mask[ids == img] == 0)
    assert tok.decode(ids[mask > 0]).replace(" ", "") == "leftright<|im_end|>"
    # row 1 (chat): only the assistant's "red" and its end token are trained
    ts, tl = s.index[1][:2]
    ids, mask = s.tokens[ts:ts + tl], s.mask[ts:ts + tl]
    assert tok.decode(ids[mask > 0]) == "red<|im_end|>" and np.sum(ids == img) == k
    # images resized + normalised to [-1, 1]: pure red is (1, -1, -1)
    np.testing.assert_allclose(s.pixels[0].astype(np.float32).mean(axis=(0, 1)), [1, -1, -1], atol=1e-2)
    batch = s.batch([0, 1, 2])
    assert batch["pixels"].shape == (3, 2, 8, 8, 3) and batch["image_valid"].tolist() == [[1, 1], [1, 0], [0, 0]]
    assert batch["pair_valid"].tolist() == [1, 0, 0]  # a caption with an image: only the text row with images
    assert (tmp_path / "out/tokenizer/preprocessor_config.json").is_file()


def test_image_tokens_are_replaced_by_projected_patches_in_order(digits):
    m = digits["manifest"]
    cfg = presets.config_for(TINY, m["vocab_size"], m["image_token_id"], m["tokens_per_image"], 8, 2)
    model = vm.build(cfg)
    b = vd.Split(digits["data"], "train").batch([0, 1])
    inputs, pixels = mx.array(b["inputs"]), mx.array(b["pixels"])
    emb = model.embed(inputs, pixels)
    feats = model.projector(model.vision_features(pixels))  # [B, 1, K, D]
    for r in range(2):
        pos = np.flatnonzero(b["inputs"][r] == m["image_token_id"])
        assert len(pos) == m["tokens_per_image"]
        np.testing.assert_allclose(np.array(emb)[r, pos], np.array(feats)[r, 0], atol=1e-6)
        text = np.flatnonzero((b["inputs"][r] != m["image_token_id"]))
        np.testing.assert_allclose(np.array(emb)[r, text],
                                   np.array(model.language_model.model.embed_tokens(inputs))[r, text], atol=1e-6)


def test_loss_components_and_weights(digits):
    m = digits["manifest"]
    model = vm.build(presets.config_for(TINY, m["vocab_size"], m["image_token_id"], m["tokens_per_image"], 8, 2))
    batch = vd.Batches(digits["data"], "train", 16).next({"epoch": 0, "index": 0})[0]
    arrays = [mx.array(a) for a in vl.VLMLoss().prepare(batch)]
    parts = {}
    for name, loss in {"all": vl.VLMLoss(lm_weight=1, contrastive_weight=2, itm_weight=0.5),
                       "lm": vl.VLMLoss(contrastive_weight=0, itm_weight=0),
                       "con": vl.VLMLoss(lm_weight=0, itm_weight=0, learn_temperature=False, temperature=0.5)}.items():
        total, n, aux = loss(model, *arrays)
        parts[name] = {k: v.item() / n.item() for k, v in aux.items()} | {"total": total.item() / n.item()}
    a = parts["all"]
    assert a["total"] == pytest.approx(a["lm_loss"] + 2 * a["contrastive_loss"] + 0.5 * a["itm_loss"], rel=1e-5)
    assert parts["lm"]["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5) and "contrastive_loss" not in parts["lm"]
    assert 0.8 * np.log(m["vocab_size"]) < a["lm_loss"] < 1.3 * np.log(m["vocab_size"])  # untrained: about uniform
    assert a["temperature"] == pytest.approx(0.07, rel=1e-4) and parts["con"]["temperature"] == pytest.approx(0.5)
    # InfoNCE with the same caption as positives: at random init close to log(#distinct captions ... batch)
    assert 0 < a["contrastive_loss"] < np.log(16) + 0.5 and 0 < a["itm_loss"] < 2


def _train(digits, out: Path, contrastive: float) -> dict:
    from mlxcore.config import VLMLossConfig

    job = VLMJob(data_dir=str(digits["data"]), out_dir=str(out), model=TINY,
                 loss=VLMLossConfig(contrastive_weight=contrastive, itm_weight=0.0),
                 train=TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=4, eval_every=0, save_every=0,
                                   eval_batches=2, log_every=10))
    result = run(job)
    metrics, _ = ve.evaluate(result["checkpoint"], digits["data"], max_new_tokens=1, samples=0)
    return {"result": result, "metrics": metrics}


def test_contrastive_weight_0_lowers_retrieval_recall(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    on, off = _train(digits, root / "on", 1.0), _train(digits, root / "off", 0.0)
    r_on, r_off = on["metrics"]["retrieval_digits"], off["metrics"]["retrieval_digits"]
    assert r_on["mean_recall"] > r_off["mean_recall"] + 0.1, (r_on, r_off)
    assert r_on["i2t_r1"] > 2 * r_on["chance_i2t_r1"]  # 10 captions: chance is 0.1
    assert on["metrics"]["zero_shot"]["accuracy"] > 0.2 and on["metrics"]["zero_shot"]["chance"] == 0.1
    # the components are logged per step in the history
    state = json.loads((Path(on["result"]["checkpoint"]) / "trainer_state.json").read_text())
    logged = [h for h in state["history"] if h["event"] == "train"]
    assert logged and all({"lm_loss", "contrastive_loss", "temperature"} <= set(h) for h in logged)
    assert logged[-1]["contrastive_loss"] < logged[0]["contrastive_loss"]
    assert all("contrastive_loss" not in h and h["lm_loss"] > 0 for h in json.loads(
        (Path(off["result"]["checkpoint"]) / "trainer_state.json").read_text())["history"] if h["event"] == "train")
