"""The VLM training job (`kind: vlm`, run by `mlxcore.train.launch`): build or load the model, the
batch streams of a preprocessed dir (`mlxcore.vlm.data`) and the weighted loss, then `train.fit`.

`init_from` fine-tunes an existing VLM dir (ours: `model_type: mlxflow_vlm`, or an mlx-vlm
`llava` dir: `mlxvlm.py`, LM loss only, lora/dora/QLoRA only); with
`train.fine_tune_type: lora|dora` (QLoRA with `train.quantize`) only adapters on the language
model's layers train (mlx-lm's LoRA layers; the vision tower and projector stay frozen), and the
checkpoint is an mlx-lm adapter dir (on an mlx-vlm base: one `mlx_vlm.load(base, adapter_path=...)`
opens too). Resume after a kill is exact, as for every `fit` job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
from pydantic import BaseModel, ConfigDict

from mlxcore.config import TrainConfig, VLMLossConfig, VLMModelConfig
from mlxcore.io import dir_digest, read_manifest
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.models import adapters
from mlxcore.models import checkpoint as ckpt
from mlxcore.perf._blas import blas_threads
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.train.loop import fit, job_lineage
from mlxcore.vlm import mlxvlm
from mlxcore.vlm import model as vlm_model
from mlxcore.vlm import presets
from mlxcore.vlm.data import Batches
from mlxcore.vlm.losses import VLMLoss


class VLMJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["vlm"] = "vlm"
    data_dir: str
    out_dir: str
    train: TrainConfig
    model: VLMModelConfig | None = None
    init_from: str | None = None
    loss: VLMLossConfig = VLMLossConfig()


def make_loss(cfg: VLMLossConfig) -> VLMLoss:
    return VLMLoss(cfg.lm_weight, cfg.contrastive_weight, cfg.itm_weight, cfg.temperature, cfg.learn_temperature)


def freeze_unused(model, loss: VLMLossConfig) -> None:
    """Freeze the heads a zero-weight component would leave without gradient: they keep their values
    (no weight decay drift), and MLX's compiled step needs every trainable parameter in the graph."""
    if not loss.itm_weight:
        model.itm_head.freeze()
    if not loss.contrastive_weight:  # the ITM negatives are picked under stop_gradient: no gradient here
        model.image_proj.freeze()
        model.text_proj.freeze()
    if not loss.contrastive_weight or not loss.learn_temperature:
        model.freeze(recurse=False, keys=["logit_scale"])


def build_model(job: VLMJob, data: dict):
    cfg = job.train
    foreign = False  # an mlx-vlm dir (mlxvlm.py): LM loss only, adapters in mlx-vlm's adapter format
    if job.init_from:
        src = Path(job.init_from)
        if not src.is_dir():
            raise FileNotFoundError(f"init_from {src}: no such directory")
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
        foreign = mlxvlm.is_mlxvlm_config(config)
        if not foreign and not vlm_model.is_vlm_config(config):
            raise ValueError(f"init_from {src}: not a vision-language model dir (config.json model_type "
                             f"{config.get('model_type')!r} and no vision_config; expected {vlm_model.MODEL_TYPE!r} "
                             f"or an mlx-vlm layout: {', '.join(mlxvlm.SUPPORTED)})")
    if foreign:
        mlxvlm.check(src)
        if cfg.fine_tune_type == "full":
            raise ValueError(f"init_from {src} is an mlx-vlm {config['model_type']} model: set train.fine_tune_type "
                             "to lora or dora (full fine-tuning of it is not supported)")
        mlxvlm.check_for_training(config, src, data, job.loss.contrastive_weight, job.loss.itm_weight)
        model, config = mlxvlm.load(src)
    elif job.init_from:
        model, config = ckpt.load(src)
        for key in ("image_token_id", "tokens_per_image"):
            if config[key] != data[key]:
                raise ValueError(f"init_from {src}: its {key} {config[key]} differs from the data's {data[key]} "
                                 "(preprocess with its tokenizer and image size)")
    else:
        if cfg.fine_tune_type != "full":
            raise ValueError(f"fine_tune_type {cfg.fine_tune_type} trains adapters on a base model: set init_from")
        c = data["config"]
        config = presets.config_for(job.model or VLMModelConfig(), data["vocab_size"], data["image_token_id"],
                                      data["tokens_per_image"], c["image_size"], c["patch_size"],
                                      {"eos": data["eos_id"], "pad": data["pad_id"]})
        model = vlm_model.build(config, seed=cfg.seed)
    mx.random.seed(cfg.seed)
    adapter_config = adapters.prepare(model, cfg)
    if foreign:
        adapter_config = mlxvlm.adapter_config(model, adapter_config)
    else:
        freeze_unused(model, job.loss)
    if adapter_config is not None:
        adapter_config |= {"base_model": str(Path(job.init_from).resolve()), "base_digest": dir_digest(job.init_from)}
    if not foreign:
        use_fast_kernels(model.language_model)
    return model, config, adapter_config


def run(job: VLMJob, callback: TrainingCallback | None = None) -> dict:
    if job.train.world_size != 1:
        raise ValueError("VLM training runs on one process (train.world_size: 1)")
    data = read_manifest(job.data_dir, "vlm-data")
    model, config, adapter_config = build_model(job, data)
    cfg = job.train
    train = Batches(job.data_dir, "train", cfg.batch_size, seed=cfg.seed)
    val = Batches(job.data_dir, "val", cfg.batch_size, shuffle=False)
    with blas_threads(1):  # tiny matmuls: one MKL thread (an OpenMP team spins on busy cores; see blas_threads)
        return fit(model, config, cfg, train, val, job.out_dir, loss=make_loss(job.loss),
                   tokenizer_dir=Path(job.data_dir) / "tokenizer", callback=callback, adapter_config=adapter_config,
                   lineage=job_lineage(job.data_dir, job.init_from))
