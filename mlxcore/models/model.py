"""The model: mlx-lm's model classes, configured from `ModelConfig` or read from a local dir.

A checkpoint directory is what `mlx_lm.load` and Hugging Face tooling read:
`config.json` (model_type llama), `model.safetensors`, tokenizer files; training checkpoints
add `trainer_state.json` and `optimizer.safetensors` (see `checkpoint.py`).

`load()` also opens any local Hugging Face / mlx-lm model dir whose `model_type` mlx-lm
implements (llama, qwen2, qwen3, mistral, ...), sharded or quantized, and adapter dirs. It never
executes code shipped in a model dir: a config asking for its own `model_file` is refused, and
tokenizers load with `trust_remote_code=False`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import _get_classes, load_model

from mlxcore.config import ModelConfig
from mlxcore.models.layout import is_adapter_dir, is_model_dir

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def hf_config(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int | None] | None = None) -> dict:
    """The `config.json` of a checkpoint: readable by mlx-lm and transformers' LlamaForCausalLM
    (Qwen3MoeForCausalLM when `cfg.num_experts` > 0)."""
    if cfg.vocab_size is not None and cfg.vocab_size != vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} does not match the tokenizer's {vocab_size} tokens"
        )
    ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.dtype,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
    } | (_moe_fields(cfg) if cfg.num_experts else {}) | (_retention_fields(cfg) if cfg.arch == "retention" else {})


def _retention_fields(cfg: ModelConfig) -> dict:
    """Power Retention: our own `model_type` (mlxcore/models/retention.py, found by `get_model_classes`)."""
    return {
        "architectures": ["PowerRetentionForCausalLM"],
        "model_type": "retention",
        "retention_degree": cfg.retention_degree,
        "retention_chunk": cfg.retention_chunk,
        "retention_gating": cfg.retention_gating,
    }


def get_model_classes(config: dict):
    """(Model, ModelArgs) for a config: `retention` is ours, any other `model_type` mlx-lm's own module."""
    if config.get("model_type") == "retention":
        from mlxcore.models import retention

        return retention.Model, retention.ModelArgs
    if config.get("model_type") == "mlxflow_vlm":  # tiny-vlm: our ViT + projector + llama (mlxcore/vlm)
        from mlxcore.vlm import model as vlm

        return vlm.Model, vlm.ModelArgs
    return _get_classes(config)


def _moe_fields(cfg: ModelConfig) -> dict:
    """A mixture of experts is a qwen3_moe (mlx-lm and transformers' Qwen3MoeForCausalLM), every layer sparse."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.resolved_experts_per_tok,
        "moe_intermediate_size": cfg.resolved_moe_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": cfg.norm_topk_prob,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
        "use_sliding_window": False,
    }


def rope_keys(config: dict) -> dict:
    """The top-level `rope_theta` / `rope_scaling` a config means but keeps in transformers 5's
    nested `rope_parameters` block ({"rope_type", "rope_theta", "factor", ...}): mlx-lm's llama and
    qwen2 (and the GGUF export) read only the top-level keys, so without them such a model would
    train and export with the default theta and no scaling. Empty when nothing needs lifting."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    out = {}
    if "rope_theta" not in config and params.get("rope_theta") is not None:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def from_config(config: dict, seed: int = 0) -> nn.Module:
    """A freshly initialised model for an HF-style config dict (any mlx-lm `model_type`)."""
    config = {**config, **rope_keys(config)}
    mx.random.seed(seed)
    model_class, args_class = get_model_classes(config)  # mlx_lm.models.<model_type>, or our retention
    model = model_class(args_class.from_dict(config))
    dtype = DTYPES.get(config.get("torch_dtype") or "float32", mx.float32)
    if dtype != mx.float32:
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def load(path: str | Path) -> tuple[nn.Module, dict]:
    """(model, config) for a checkpoint or a local HF / mlx-lm model dir (an adapter dir: `checkpoint.load`)."""
    path = Path(path)
    if is_adapter_dir(path):
        raise ValueError(f"{path} is an adapter dir: load it with mlxcore.models.checkpoint.load (base + adapters)")
    if not is_model_dir(path, adapters=False):
        raise FileNotFoundError(f"{path}: not a checkpoint or model dir (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    try:  # strict: every weight must match
        return load_model(path, get_model_classes=get_model_classes, trust_remote_code=False,
                          model_config=rope_keys(config))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's weights in Hugging Face layout (a MoE's stacked experts one by one: `moe.to_hf_layout`)."""
    from mlxcore.models import moe

    weights = dict(sorted(moe.to_hf_layout(dict(tree_flatten(model.parameters()))).items()))  # sorted: same bytes
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def num_params(model: nn.Module) -> int:
    """Parameters of the model as trained (a quantized weight counts its unpacked size, scales do not)."""
    modules = dict(model.named_modules())
    total = 0
    for path, p in tree_flatten(model.parameters()):
        owner, _, leaf = path.rpartition(".")
        bits = getattr(modules.get(owner), "bits", None)
        if bits and leaf in ("scales", "biases"):
            continue
        total += p.size * 32 // bits if bits and leaf == "weight" else p.size
    return total
