"""`tiny-vlm`: a small ViT (mlx.nn) + an MLP projector + mlx-lm's llama decoder.

Each image is cut into patches (a strided conv), run through pre-norm transformer blocks with
learned positions, and every patch feature is projected to the decoder's width; the decoder's
`<|image_pad|>` tokens (`tokens_per_image` per image, in order) are replaced by these features.
For the contrastive and matching losses the model also has a joint embedding space (mean-pooled
patch features -> `image_proj`; mean-pooled decoder states of the caption -> `text_proj`), a
learnable log inverse temperature and a 2-way image-text matching head.

A checkpoint is an HF-style dir: `config.json` (`model_type: mlxflow_vlm`, `text_config` = the
llama decoder's config, `vision_config`), `model.safetensors`, tokenizer files and
`preprocessor_config.json`; `mlxcore.models.model.load` opens it (`get_model_classes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from mlxcore.vlm import MLXFLOW_VLM

MODEL_TYPE = MLXFLOW_VLM


class ViT(nn.Module):
    def __init__(self, image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 mlp_ratio: float = 2.0, channels: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, hidden_size, patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.pos_embed = 0.02 * mx.random.normal((1, n, hidden_size))
        self.blocks = [nn.TransformerEncoderLayer(hidden_size, num_heads, int(hidden_size * mlp_ratio),
                                                  norm_first=True, activation=nn.gelu) for _ in range(num_layers)]
        self.norm = nn.LayerNorm(hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        """[N, S, S, C] -> [N, patches, hidden]."""
        h = self.patch_embed(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos_embed
        for block in self.blocks:
            h = block(h, None)
        return self.norm(h)


@dataclass
class ModelArgs:
    """config.json of a VLM checkpoint (what `mlx_lm.utils.load_model` builds it from)."""

    text_config: dict
    vision_config: dict
    image_token_id: int
    tokens_per_image: int
    embed_dim: int = 64
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        keys = ("text_config", "vision_config", "image_token_id", "tokens_per_image", "embed_dim", "model_type")
        return cls(**{k: config[k] for k in keys if k in config})


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        v, t = args.vision_config, args.text_config
        self.vision = ViT(v["image_size"], v["patch_size"], v["hidden_size"], v["num_layers"], v["num_heads"],
                          v.get("mlp_ratio", 2.0))
        self.projector = nn.Sequential(nn.Linear(v["hidden_size"], t["hidden_size"]), nn.GELU(),
                                       nn.Linear(t["hidden_size"], t["hidden_size"]))
        self.language_model = llama.Model(llama.ModelArgs.from_dict(t))
        self.image_proj = nn.Linear(v["hidden_size"], args.embed_dim)
        self.text_proj = nn.Linear(t["hidden_size"], args.embed_dim)
        self.itm_head = nn.Linear(t["hidden_size"], 2)
        self.logit_scale = mx.array([math.log(1 / 0.07)])

    @property
    def layers(self):  # LoRA (mlx-lm's linear_to_lora_layers) adapts the decoder's layers
        return self.language_model.layers

    # -- pieces
    def vision_features(self, pixels: mx.array) -> mx.array:
        """[..., S, S, 3] -> [..., K, vision hidden]."""
        lead = pixels.shape[:-3]
        h = self.vision(pixels.reshape(-1, *pixels.shape[-3:]))
        return h.reshape(*lead, *h.shape[1:])

    def embed(self, inputs: mx.array, pixels: mx.array | None) -> mx.array:
        emb = self.language_model.model.embed_tokens(inputs)
        if pixels is None:
            return emb
        B = inputs.shape[0]
        feats = self.projector(self.vision_features(pixels)).astype(emb.dtype)  # [B, M, K, D]
        feats = feats.reshape(B, -1, feats.shape[-1])
        is_img = inputs == self.args.image_token_id
        idx = mx.maximum(mx.cumsum(is_img.astype(mx.int32), axis=1) - 1, 0)
        idx = mx.minimum(idx, feats.shape[1] - 1)
        gathered = mx.take_along_axis(feats, idx[..., None], axis=1)
        return mx.where(is_img[..., None], gathered, emb)

    def hidden(self, inputs: mx.array | None, embeddings: mx.array) -> mx.array:
        return self.language_model.model(inputs, None, embeddings)

    def logits_of(self, h: mx.array) -> mx.array:
        lm = self.language_model
        return lm.model.embed_tokens.as_linear(h) if lm.args.tie_word_embeddings else lm.lm_head(h)

    def __call__(self, inputs: mx.array, pixels: mx.array | None = None, cache=None) -> mx.array:
        """Logits [B, T, V] of token ids with image placeholders filled from `pixels` [B, M, S, S, 3]."""
        return self.logits_of(self.hidden(inputs, self.embed(inputs, pixels)))

    def image_embedding(self, pixels: mx.array) -> mx.array:
        """L2-normalised joint-space embedding of images [N, S, S, 3] -> [N, E]."""
        e = self.image_proj(self.vision_features(pixels).mean(axis=-2))
        return e / mx.maximum(mx.linalg.norm(e, axis=-1, keepdims=True), 1e-6)

    def text_embedding(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """L2-normalised joint-space embedding of texts (mean of the decoder's states over `mask`)."""
        h = self.hidden(tokens, self.language_model.model.embed_tokens(tokens))
        m = mask[..., None].astype(h.dtype)
        e = self.text_proj((h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0))
        return e / mx.maximum(mx.linalg.norm(e, axis=-1, keepdims=True), 1e-6)

    def match_logits(self, image_tokens: mx.array, caption_emb: mx.array, caption_mask: mx.array) -> mx.array:
        """Image-text matching logits [N, 2] of (projected image tokens [N, K, D], caption embeddings [N, C, D])."""
        x = mx.concatenate([image_tokens, caption_emb], axis=1)
        h = self.hidden(None, x)[:, image_tokens.shape[1]:]  # the caption's states: each has seen the whole image
        m = caption_mask[..., None]
        return self.itm_head((h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0))

    def sanitize(self, weights: dict) -> dict:
        return weights


def build(config: dict, seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def is_vlm_config(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE
