"""Fine-tuning mlx-vlm model dirs (the `llava` layout) on the shared loop (`train.fit`).

`init_from` may name a local model dir that mlx-vlm opens (`mlx_vlm.load(dir)`); of mlx-vlm's
layouts, `llava` (a CLIP/SigLIP ViT, a 2-layer MLP projector and a llama / qwen2 decoder) is
the one supported. It is the simplest mlx-vlm layout to train with this project's batches: a
fixed number of placeholder tokens per image (one per patch), channels-last square images and
plain 1-D RoPE, so the splice is tiny-vlm's own and the step compiles (`mx.compile`). qwen2-vl
would need flattened temporal patches, `image_grid_thw` and M-RoPE positions, and its mlx-vlm
forward reads values back to the host per row (`.item()`), which a compiled step cannot.

- `check(dir)` -> config.json, or a clear error (no config, not a VLM, an unsupported layout)
- `load(dir)` -> (`Trainable`, config): mlx-vlm's own model classes and weights
- `data_spec(dir)` / `image_processor(dir)`: what `vlm-preprocess` needs (image size, tokens per
  image, the image token; the model's own image processor, transformers' CLIPImageProcessor)
- `adapter_config(model, ours)`: the adapter dir's config in a form mlx-vlm reads too
  (`lora_parameters.keys` as full module paths, `base_quantization` per quantized module), so
  `mlx_vlm.load(base, adapter_path=dir)` rebuilds the trained model
- `build_tiny(out, tokenizer_dir)`: a tiny random-weight llava dir (tests, demos)

Nothing here imports torch (the trainer's child process forbids it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxcore.vlm import vision_geometry

SUPPORTED = ("llava",)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def read_config(path: str | Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a model dir (no config.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e.msg}") from None


def is_mlxvlm_config(config: dict) -> bool:
    """A multimodal config of a layout mlx-vlm implements (not tiny-vlm's own `mlxflow_vlm`)."""
    return bool(config.get("vision_config")) and config.get("model_type") not in (None, "mlxflow_vlm")


def is_mlxvlm_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "config.json").is_file() and is_mlxvlm_config(read_config(path))


def check(path: str | Path) -> dict:
    """config.json of a supported mlx-vlm dir, else a ValueError that names the dir and the field."""
    config = read_config(path)
    mt = config.get("model_type")
    if not config.get("vision_config"):
        raise ValueError(f"init_from {path}: not a vision-language model dir (config.json model_type {mt!r} "
                         "has no vision_config)")
    if mt not in SUPPORTED:
        raise ValueError(f"init_from {path}: config.json model_type {mt!r} is not supported for fine-tuning "
                         f"(supported: mlxflow_vlm, {', '.join(SUPPORTED)})")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"init_from {path}: config.json vision_feature_layer {layer!r}: only one layer (an int) is supported")
    if not list(Path(path).glob("*.safetensors")):
        raise FileNotFoundError(f"init_from {path}: no *.safetensors weights")
    return config


class Trainable(nn.Module):
    """An mlx-vlm llava model with tiny-vlm's call: `model(inputs [B, T], pixels [B, M, S, S, 3]) -> logits`.

    Its children are the mlx-vlm model's own (`vision_tower`, `multi_modal_projector`,
    `language_model`), so parameter names, and so adapter weight names, are mlx-vlm's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        for name, child in inner.children().items():
            setattr(self, name, child)
        self.config = inner.config

    @property
    def layers(self):  # LoRA (mlx-lm's linear_to_lora_layers) adapts the decoder's layers
        return self.language_model.model.layers

    def image_features(self, pixels: mx.array) -> mx.array:
        """[N, S, S, 3] -> [N, K, decoder width] (llava: a hidden layer of the ViT, CLS dropped, projected)."""
        *_, hidden = self.vision_tower(pixels, output_hidden_states=True)
        feats = hidden[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed(self, inputs: mx.array, pixels: mx.array | None) -> mx.array:
        emb = self.language_model.model.embed_tokens(inputs)
        if pixels is None:
            return emb
        B = inputs.shape[0]
        feats = self.image_features(pixels.reshape(-1, *pixels.shape[-3:]).astype(emb.dtype)).astype(emb.dtype)
        feats = feats.reshape(B, -1, feats.shape[-1])  # [B, M * K, D]: a row's images in order
        is_img = inputs == self.config.image_token_index
        idx = mx.minimum(mx.maximum(mx.cumsum(is_img.astype(mx.int32), axis=1) - 1, 0), feats.shape[1] - 1)
        return mx.where(is_img[..., None], mx.take_along_axis(feats, idx[..., None], axis=1), emb)

    def __call__(self, inputs: mx.array, pixels: mx.array | None = None, cache=None) -> mx.array:
        return self.language_model(inputs, inputs_embeds=self.embed(inputs, pixels), cache=cache).logits


def load(path: str | Path) -> tuple[Trainable, dict]:
    """(model, config.json) of an mlx-vlm llava dir, built by mlx-vlm itself (every weight must match)."""
    config = check(path)
    from mlx_vlm.utils import load_model

    try:
        inner = load_model(Path(path))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"init_from {path}: mlx-vlm cannot build it: {e}") from None
    return Trainable(inner), config


def check_for_training(config: dict, src, data: dict, contrastive_weight: float, itm_weight: float) -> None:
    """The data must be preprocessed for this model; the losses need heads a llava has not."""
    for key, w in (("loss.contrastive_weight", contrastive_weight), ("loss.itm_weight", itm_weight)):
        if w:
            raise ValueError(f"init_from {src} is an mlx-vlm {config['model_type']} model: it has no contrastive / "
                             f"matching heads, set {key}: 0 (only the LM loss trains it)")
    spec = data_spec(src, config)
    if data.get("image_token_id") != spec["image_token_id"] or data.get("tokens_per_image") != spec["tokens_per_image"]:
        raise ValueError(f"init_from {src}: its image token {spec['image_token_id']} x {spec['tokens_per_image']} "
                         f"differs from the data's {data.get('image_token_id')} x {data.get('tokens_per_image')} "
                         "(preprocess with init_from set, so its tokenizer and image processor are used)")


# ----------------------------------------------------------------------------- preprocessing
def data_spec(path: str | Path, config: dict | None = None) -> dict:
    """What preprocessing needs of the model: image side, patches per image, the image token and its id."""
    config = config or check(path)
    geometry = vision_geometry(config["vision_config"])
    size, patch = geometry["image_size"], geometry["patch_size"]
    k = (size // patch) ** 2 + (0 if config.get("vision_feature_select_strategy", "default") == "default" else 1)
    pc = Path(path) / "processor_config.json"
    token = json.loads(pc.read_text()).get("image_token", "<image>") if pc.is_file() else "<image>"
    return {"image_size": size, "patch_size": patch, "tokens_per_image": k, "image_token": token,
            "image_token_id": config.get("image_token_index", 32000)}


def image_processor(path: str | Path):
    """The model's own image processor (what mlx-vlm's llava processor loads: `use_fast=False`, no torch)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), use_fast=False)


def pixels(processor, image) -> np.ndarray:
    """One PIL image -> [S, S, 3] float32, as the processor prepares it (channels last)."""
    out = processor(images=[image], return_tensors="np")["pixel_values"][0]
    return np.asarray(out, np.float32).transpose(1, 2, 0)


# ----------------------------------------------------------------------------- adapters
_LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")


def adapter_config(model: nn.Module, ours: dict) -> dict:
    """`adapters.prepare`'s config with the adapted modules as full paths (mlx-vlm's `keys`) and,
    after QLoRA, each quantized module's settings (mlx-vlm's `base_quantization`)."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    keys = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    base_name = lambda n: n[:-len(".linear")] if n.endswith(".linear") and n[:-len(".linear")] in keys else n  # noqa: E731
    quant = {base_name(n): {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
             for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    out = {**ours, "model_type": model.config.model_type,
           "lora_parameters": {**ours["lora_parameters"], "keys": sorted(keys)}}
    if quant:
        out["base_quantization"] = dict(sorted(quant.items()))
    return out


def mlx_lm_adapter_config(acfg: dict) -> dict:
    """The same config with per-layer keys (`self_attn.q_proj`), as `adapters.apply` (mlx-lm) takes them."""
    per_layer = []
    for key in acfg["lora_parameters"]["keys"]:
        m = _LAYER_KEY.match(key)
        if m is None:
            raise ValueError(f"adapter key {key!r} is not inside a decoder layer")
        if m.group(2) not in per_layer:
            per_layer.append(m.group(2))
    return {**acfg, "lora_parameters": {**acfg["lora_parameters"], "keys": per_layer}}


# ----------------------------------------------------------------------------- a tiny llava dir
def build_tiny(out_dir: str | Path, tokenizer_dir: str | Path, *, image_size: int = 16, patch_size: int = 4,
               vision_hidden_size: int = 32, vision_layers: int = 2, vision_heads: int = 2, hidden_size: int = 64,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               seed: int = 0) -> Path:
    """A random-weight mlx-vlm llava dir: config.json, model.safetensors, the tokenizer of
    `tokenizer_dir` + an `<image>` token, CLIP's preprocessor_config.json, processor_config.json."""
    from mlx.utils import tree_flatten
    from mlx_vlm.models import llava
    from transformers import AutoTokenizer

    from mlxcore.io import atomic_dir, write_json

    with atomic_dir(out_dir, replace=True) as tmp:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.save_pretrained(str(tmp))
        for stray in ("preprocessor_config.json",):
            (tmp / stray).unlink(missing_ok=True)
        vocab = len(tok)
        text = {"model_type": "llama", "hidden_size": hidden_size, "num_hidden_layers": num_layers,
                "intermediate_size": intermediate_size, "num_attention_heads": num_heads,
                "num_key_value_heads": num_kv_heads, "rms_norm_eps": 1e-5, "vocab_size": vocab,
                "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}
        vision = {"model_type": "clip_vision_model", "num_hidden_layers": vision_layers,
                  "hidden_size": vision_hidden_size, "intermediate_size": 4 * vision_hidden_size,
                  "num_attention_heads": vision_heads, "image_size": image_size, "patch_size": patch_size,
                  "projection_dim": vision_hidden_size, "num_channels": 3, "layer_norm_eps": 1e-5}
        config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                  "image_token_index": tok.convert_tokens_to_ids("<image>"), "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "vocab_size": vocab, "ignore_index": -100,
                  "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                  "text_config": text, "vision_config": vision, "torch_dtype": "float32"}
        mc = llava.ModelConfig.from_dict(config)
        mc.text_config, mc.vision_config = llava.TextConfig.from_dict(text), llava.VisionConfig.from_dict(vision)
        mx.random.seed(seed)
        model = llava.Model(mc)
        mx.eval(model.parameters())
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(sorted(tree_flatten(model.parameters()))),
                            metadata={"format": "mlx"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "preprocessor_config.json", {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True})
        write_json(tmp / "processor_config.json", {
            "processor_class": "LlavaProcessor", "patch_size": patch_size, "image_token": "<image>",
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1})
    return Path(out_dir)
