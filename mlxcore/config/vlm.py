"""Vision-language runs (README "Vision-language")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlxcore.config.base import _Run, _Strict, _Tracked
from mlxcore.config.train import TrainConfig


class VLMModelConfig(_Strict):
    """`tiny-vlm`: a small ViT + MLP projector + a llama decoder (mlxcore/vlm/model.py)."""

    preset: Literal["tiny-vlm"] = Field("tiny-vlm", description="The named size; fields below override it.")
    vision_hidden_size: int = Field(64, gt=0)
    vision_layers: int = Field(2, gt=0)
    vision_heads: int = Field(4, gt=0)
    vision_mlp_ratio: float = Field(2.0, gt=0)
    hidden_size: int = Field(96, gt=0, description="The decoder's width.")
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    embed_dim: int = Field(64, gt=0, description="The joint image-text space of the contrastive loss.")


class VLMLossConfig(_Strict):
    """The weighted multimodal objective (mlxcore/vlm/losses.py); a weight of 0 turns a component off."""

    lm_weight: float = Field(1.0, ge=0, description="Token cross-entropy on text / assistant tokens.")
    contrastive_weight: float = Field(1.0, ge=0, description="Symmetric InfoNCE over the batch.")
    itm_weight: float = Field(0.5, ge=0, description="Image-text matching with in-batch hard negatives.")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature (the start value when learned).")
    learn_temperature: bool = Field(True, description="Learn the temperature (as a log inverse scale) or keep it fixed.")


class VLMDataConfig(_Strict):
    """Image-text rows: JSONL files (`text` + `images`, or chat `messages` with image parts), else
    the synthetic set (scikit-learn's digits + generated shape scenes with captions and QA)."""

    train: list[str] = Field(default_factory=list, description="JSONL files, or hfds: / catalog: specs of image-text "
                                                                 "datasets (mlxcore.vlm.hub); empty: the synthetic set.")
    val: list[str] = Field(default_factory=list, description="Held-out JSONL files or specs (needed with train).")
    columns: dict[str, str] = Field(default_factory=dict, description="hfds:/catalog: specs: our field <- the dataset's "
                                    "column (image, text, label, question, answer); empty: the catalog's, else guessed.")
    max_download_mb: float = Field(2048, gt=0, description="Refuse hub splits larger than this (images included).")
    digits: bool = Field(True, description="Synthetic: scikit-learn's 1,797 handwritten digits, captioned.")
    scenes: int = Field(600, ge=0, description="Synthetic: generated two-shape scenes (a caption + a QA row each).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Synthetic: the held-out share.")
    seed: int = 0
    image_size: int = Field(16, gt=0, description="Images are resized to image_size x image_size.")
    patch_size: int = Field(4, gt=0, description="ViT patch side; divides image_size.")
    max_images_per_sample: int = Field(4, gt=0, description="A row with more images is an error (file:line).")
    max_tokens: int = Field(128, gt=1, description="Tokens per row, image tokens included; longer is an error.")
    vocab_size: int = Field(400, gt=0, description="The BPE trained on the rows (when there is no init_from).")


class VLMEvalConfig(_Strict):
    max_new_tokens: int = Field(16, gt=0, description="Greedy decoding budget for captions and VQA answers.")
    batch_size: int = Field(64, gt=0)
    samples: int = Field(8, ge=0, description="Held-out images shown with their generated captions in the report.")


def _default_vlm_train() -> TrainConfig:
    return TrainConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=30, eval_every=200, save_every=100,
                       eval_batches=4, log_every=10)


class VLMRunConfig(_Run, _Tracked):
    """The `vlm` flow: data -> preprocess -> train -> vlm-eval -> bench report."""

    name: str = Field("vlm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    data: VLMDataConfig = VLMDataConfig()
    model: VLMModelConfig = VLMModelConfig()
    loss: VLMLossConfig = VLMLossConfig()
    train: TrainConfig = Field(default_factory=_default_vlm_train)
    init_from: str | None = Field(None, description="A VLM model dir to fine-tune: ours (model_type mlxflow_vlm; "
                                                    "full or train.fine_tune_type: lora|dora) or a local mlx-vlm llava "
                                                    "dir (lora|dora, QLoRA with train.quantize; LM loss only: "
                                                    "loss.contrastive_weight and loss.itm_weight 0; its tokenizer and "
                                                    "image processor preprocess the rows); null: a fresh model.")
    eval: VLMEvalConfig = VLMEvalConfig()

    @model_validator(mode="after")
    def _check_patches(self) -> "VLMRunConfig":
        if self.data.image_size % self.data.patch_size:
            raise ValueError(f"data.patch_size={self.data.patch_size} does not divide data.image_size={self.data.image_size}")
        from mlxcore.vlm import image_geometry  # json only

        model = image_geometry(self.init_from)  # fine-tuning: the model's geometry is used
        for key in ("image_size", "patch_size"):
            if model is not None and key in self.data.model_fields_set and getattr(self.data, key) != model[key]:
                raise ValueError(f"data.{key}={getattr(self.data, key)}, but init_from {self.init_from} was built for "
                                 f"{key} {model[key]} (its config.json) and preprocessing uses the model's: remove "
                                 f"data.{key} or set it to {model[key]}")
        return self
