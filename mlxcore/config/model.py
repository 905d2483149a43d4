"""Model shape (named presets + overrides), adapters (LoRA / DoRA) and quantization."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mlxcore.config.base import ConfigError, _Strict


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # ~4.6M parameters with a 6400 vocab: fast enough to train on two CPU cores.
    "tiny": dict(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704
    ),
    # ~98M parameters with a 6400 vocab (MiniMind's tokenizer): the "200 MB in fp16" class.
    "200mb": dict(
        hidden_size=768,
        num_layers=15,
        num_heads=12,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=2048,
    ),
    # Mixtures of experts (mlx-lm's / transformers' qwen3_moe): tiny's attention, 8 experts of which
    # each token uses 2; 2 x 352 = tiny's 704, so its active parameters are tiny's (~4.6M; 11.1M in all).
    "tiny-moe": dict(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=352,
    ),
    # 200mb's attention, 8 experts of 256 (top-2): ~98M parameters in all (200 MB in fp16), ~45M active.
    "200mb-moe": dict(
        hidden_size=768, num_layers=15, num_heads=12, num_kv_heads=3, head_dim=64, intermediate_size=2048,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
    ),
}
# Power Retention (`arch: retention`, mlxcore/models/retention.py; README "Power Retention"): head_dim 64
# (state D x 64 per head, D = C(64 + p - 1, p)), as many key/value heads as heads. Sizes with a 6400 vocab.
MODEL_PRESETS |= {
    "retention-tiny": dict(arch="retention", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
                           head_dim=64, intermediate_size=1408),  # ~22.6M
    "retention-small": dict(arch="retention", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                            head_dim=64, intermediate_size=3072),  # ~118M
    "retention-medium": dict(arch="retention", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                             head_dim=64, intermediate_size=2816),  # ~315M
    "retention-large": dict(arch="retention", hidden_size=1536, num_layers=24, num_heads=24, num_kv_heads=24,
                            head_dim=64, intermediate_size=4096),  # ~690M
    "retention-7b": dict(arch="retention", hidden_size=4096, num_layers=32, num_heads=64, num_kv_heads=64,
                         head_dim=64, intermediate_size=11008),  # ~6.5B
}
_ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
_PRESET_KEYS = {k for preset in MODEL_PRESETS.values() for k in preset}


class ModelConfig(_Strict):
    """A LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

    With `num_experts` > 0 a mixture of experts (qwen3_moe: every MLP a routed set of SwiGLU experts)."""

    preset: Literal["tiny", "200mb", "tiny-moe", "200mb-moe",
                    "retention-tiny", "retention-small", "retention-medium", "retention-large", "retention-7b",
                    "custom"] = Field(
        "tiny", description="Named size; fields below override it.")
    hidden_size: int = Field(0, gt=0)
    num_layers: int = Field(0, gt=0)
    num_heads: int = Field(0, gt=0)
    num_kv_heads: int = Field(0, gt=0, description="Key/value heads (GQA); divides num_heads.")
    head_dim: int | None = Field(None, gt=0, description="Default: hidden_size // num_heads.")
    intermediate_size: int = Field(0, gt=0, description="SwiGLU inner width.")
    vocab_size: int | None = Field(None, gt=0, description="Default: the tokenizer's size.")
    rope_theta: float = Field(1e6, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # -- Power Retention (arch: retention); README "Power Retention"
    arch: Literal["llama", "retention"] = Field("llama", description="Attention: llama (softmax, RoPE) or "
                                                "retention (symmetric power retention, a fixed-size state).")
    retention_degree: int = Field(2, description="retention: the power p of (q.k)^p; even, >= 2.")
    retention_chunk: int = Field(128, gt=0, description="retention: tokens per chunk in training and prefill; "
                                                       "divides pretrain.seq_len.")
    retention_gating: bool = Field(True, description="retention: a learned per-head, per-token decay.")

    @field_validator("retention_degree")
    @classmethod
    def _even_degree(cls, value: int) -> int:
        if value < 1 or value % 2:
            raise ValueError(f"retention_degree={value}: the symmetric power expansion needs an even degree >= 2")
        return value

    @model_validator(mode="after")
    def _check_retention(self) -> "ModelConfig":
        if self.arch != "retention" and self.preset.startswith("retention-"):
            raise ValueError(f"arch={self.arch} with preset {self.preset!r}: a retention preset needs arch=retention")
        return self
    # -- mixture of experts (qwen3_moe: every layer's MLP is a routed SwitchGLU); README "Mixture of experts"
    num_experts: int = Field(0, ge=0, description="Experts per MoE layer; 0: a dense model (llama).")
    num_experts_per_tok: int | None = Field(None, gt=0, description="Experts each token is routed to (top-k); "
                                                                   "default: min(2, num_experts).")
    moe_intermediate_size: int | None = Field(None, gt=0, description="SwiGLU inner width of one expert; "
                                                                     "default: intermediate_size // top-k.")
    norm_topk_prob: bool = Field(True, description="Renormalise the top-k routing weights to sum to 1.")
    router_aux_loss_coef: float = Field(0.001, ge=0, description="Weight of the router's load-balancing loss "
                                                                 "in training; 0: off.")

    @model_validator(mode="wrap")
    @classmethod
    def _apply_preset(cls, data: Any, handler) -> "ModelConfig":
        """The preset fills the shapes nobody set; a field set to another value beats it.

        A shape equal to what the preset (or the class default) gives does not count as set,
        so a full dump (a Prefect parameter, a saved config) loaded again and given another
        preset takes the new preset's shapes. `model_fields_set` is what was really chosen:
        the config resolver carries only that forward."""
        if not isinstance(data, dict):
            return handler(data)
        preset = data.get("preset", "tiny")
        given = MODEL_PRESETS.get(preset, {})
        explicit = {k: v for k, v in data.items()
                    if not (k in _PRESET_KEYS and (v is None or v == given.get(k, cls.model_fields[k].default)))}
        if preset == "custom":
            missing = [k for k in _ARCH_KEYS if k not in explicit]
            if missing:
                raise ValueError(f"preset 'custom' needs {', '.join(missing)}")
        model = handler({**given, **explicit})
        object.__setattr__(model, "__pydantic_fields_set__", set(explicit) & set(cls.model_fields))
        return model

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if not self.num_experts:
            if self.preset.endswith("-moe"):
                raise ValueError(f"num_experts=0 with preset {self.preset!r} (a mixture of experts): "
                                 "set num_experts >= 1, or a dense preset")
            for key in ("num_experts_per_tok", "moe_intermediate_size"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}={getattr(self, key)} needs num_experts >= 1 (this model is dense)")
        elif getattr(self, "arch", None) == "retention":
            raise ValueError(f"num_experts={self.num_experts}: a mixture of experts is a qwen3_moe, not arch "
                             "'retention'; set num_experts: 0 or another arch")
        elif self.num_experts_per_tok is not None and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")
        return self

    def check_vocab(self, tokens: int, exact: bool = True, tokenizer: str = "the tokenizer") -> None:
        """A set `vocab_size` must equal the tokenizer's size (or, before a BPE is trained, not exceed it)."""
        if self.vocab_size is not None and (self.vocab_size != tokens if exact else self.vocab_size > tokens):
            raise ConfigError(f"model.vocab_size={self.vocab_size} does not match {tokenizer} "
                              f"({'' if exact else 'at most '}{tokens} tokens); unset it to use the tokenizer's size")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_params(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size or 0
        h, d = self.hidden_size, self.resolved_head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.num_experts:  # qwen3_moe: q/k norms, a router and `num_experts` SwiGLUs
            layer = attn + 2 * d + h * self.num_experts + 3 * h * self.resolved_moe_intermediate_size * self.num_experts + 2 * h
        else:
            layer = attn + 3 * h * self.intermediate_size + 2 * h
        if self.arch == "retention":  # q/k norms and the gate's projection
            layer += 2 * d + ((h + 1) * self.num_heads if self.retention_gating else 0)
        head = 0 if self.tie_embeddings else v * h
        return v * h + self.num_layers * layer + h + head

    @property
    def resolved_experts_per_tok(self) -> int:
        return self.num_experts_per_tok or min(2, self.num_experts)

    @property
    def resolved_moe_intermediate_size(self) -> int:
        return self.moe_intermediate_size or max(1, self.intermediate_size // max(self.resolved_experts_per_tok, 1))

    def num_active_params(self, vocab_size: int | None = None) -> int:
        """Parameters one token uses: num_params less the experts it is not routed to."""
        idle = self.num_experts - self.resolved_experts_per_tok if self.num_experts else 0
        return self.num_params(vocab_size) - self.num_layers * idle * 3 * self.hidden_size * self.resolved_moe_intermediate_size


LORA_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRAConfig(_Strict):
    """Low-rank adapters (mlx-lm's LoRA/DoRA layers) on the frozen base of `fine_tune_type: lora|dora`.

    The update of a wrapped linear layer is `scale * (x @ A) @ B` with rank-`rank` A and B; set
    `alpha` instead of `scale` for the PEFT convention scale = alpha / rank.
    """

    rank: int = Field(8, gt=0)
    scale: float | None = Field(None, gt=0, description="Adapter output multiplier (mlx-lm's `scale`; default 20).")
    alpha: float | None = Field(None, gt=0, description="PEFT-style alpha: scale = alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(list(LORA_KEYS), min_length=1,
                            description="Modules to adapt, relative to a decoder layer (short names like q_proj match too).")
    num_layers: int = Field(-1, description="Adapt the last N decoder layers; -1: all of them.")

    @model_validator(mode="after")
    def _one_scale(self) -> "LoRAConfig":
        if self.scale is not None and self.alpha is not None:
            raise ValueError("set either scale or alpha (scale = alpha / rank), not both")
        return self

    @property
    def resolved_scale(self) -> float:
        if self.alpha is not None:
            return self.alpha / self.rank
        return 20.0 if self.scale is None else self.scale


class QuantizeConfig(_Strict):
    """Quantize the frozen base model's linear layers (QLoRA); weights stay `bits`-bit in memory."""

    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 64
