"""The `vlm` flow with `init_from` = a local mlx-vlm llava dir (built here, random weights) and LoRA:
preprocess with the model's tokenizer and image processor, train adapters, generation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mlx_vlm")

import mlxcore  # noqa: F401,E402

from mlxcore.config import VLMRunConfig, load_config  # noqa: E402


def test_vlm_flow_lora_on_an_mlx_vlm_llava_dir(prefect_server, tmp_path):
    from flows.vlm import vlm
    from mlxcore.data import tokenizer as toks
    from mlxcore.vlm import mlxvlm

    toks.train_bpe(["a red circle left of a blue square", "what color is the circle?", "red"] * 20, 280, 1,
                   tmp_path / "bpe")
    base = mlxvlm.build_tiny(tmp_path / "llava", tmp_path / "bpe", image_size=16, patch_size=4)
    config = load_config(None, [f"out_dir={tmp_path}", "name=llava", f"init_from={base}", "train.fine_tune_type=lora",
                                "loss.contrastive_weight=0", "loss.itm_weight=0", "data.digits=false",
                                "data.scenes=40", "train.steps=20", "train.warmup_steps=2", "train.batch_size=8",
                                "train.eval_every=0", "train.save_every=10", "eval.max_new_tokens=4", "eval.samples=2"],
                         cls=VLMRunConfig)
    result = vlm(config)
    t = result["train"]
    assert t["step"] == 20 and t["val_loss"] < t["initial_val_loss"] and t["trainable_params"] < t["params"] / 5
    acfg = json.loads((Path(result["checkpoint"]) / "adapter_config.json").read_text())
    assert acfg["model_type"] == "llava" and acfg["base_model"] == str(base.resolve())
    ev = result["eval"]
    assert {"captioning", "vqa"} <= set(ev) and not any(k.startswith("retrieval_") for k in ev)
    assert "zero_shot" not in ev
