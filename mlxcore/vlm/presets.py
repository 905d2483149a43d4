"""The config.json of a fresh `tiny-vlm` (kept apart from `model.py`, which `mlxcore.models.model`
imports: this module imports that one's `hf_config`)."""

from __future__ import annotations

from mlxcore.config import ModelConfig
from mlxcore.models.model import hf_config
from mlxcore.vlm.model import MODEL_TYPE


def config_for(model_cfg, vocab_size: int, image_token_id: int, tokens_per_image: int, image_size: int,
               patch_size: int, special_ids: dict | None = None) -> dict:
    """config.json of a fresh `tiny-vlm` (a `VLMModelConfig`)."""
    text = hf_config(ModelConfig(preset="custom", hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                                 num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
                                 intermediate_size=model_cfg.intermediate_size), vocab_size, special_ids)
    vision = {"image_size": image_size, "patch_size": patch_size, "hidden_size": model_cfg.vision_hidden_size,
              "num_layers": model_cfg.vision_layers, "num_heads": model_cfg.vision_heads,
              "mlp_ratio": model_cfg.vision_mlp_ratio}
    return {"architectures": ["MlxflowVLMForConditionalGeneration"], "model_type": MODEL_TYPE,
            "text_config": text, "vision_config": vision, "image_token_id": image_token_id,
            "tokens_per_image": tokens_per_image, "embed_dim": model_cfg.embed_dim, "vocab_size": vocab_size,
            "torch_dtype": "float32"}
