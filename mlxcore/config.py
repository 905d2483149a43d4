"""Typed configs, one per concern. Presets are named instances; YAML only overrides them.

Every model rejects unknown keys, so a typo in a YAML file is an error that names the key,
the file and the line, never a silently ignored setting.
"""

from __future__ import annotations

import typing

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

from mlxcore.distill.schema import PromptConfig, TeacherConfig, VerifyPolicy
from mlxcore.models.layout import is_model_dir
from mlxcore.clients.secrets import KeyedEndpoint


class ConfigError(ValueError):
    """A config value is invalid; the message names the file, line and key."""


class _Strict(BaseModel):
    # hide_input_in_errors: a refused value (a pasted API key, say) is never echoed in an error
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


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


# copy, sort and the bench suites' formats (json_calc: the bench's json suite); arithmetic, json: own formats
SyntheticTask = Literal["copy", "sort", "arithmetic", "json", "math_mcq", "qa", "logic", "knowledge", "json_calc"]


class SyntheticConfig(_Strict):
    """Deterministic synthetic tasks: every example is a function of (seed, split, index)."""

    tasks: list[SyntheticTask] | dict[SyntheticTask, float] = Field(
        ["copy", "copy", "sort", "arithmetic", "json"],
        description="A list (a task listed twice comes twice as often) or {task: weight}: tasks come in exactly "
                    "these proportions (mlxcore/data/proportional.py).")
    working: bool = Field(False, description="Reading (qa) and logic answers show their working in a <think> "
                                             "block: the asked people's facts copied, a boolean expression "
                                             "reduced a level at a time, an ordering as 'taller > shorter' pairs.")
    pretrain_docs: int = Field(24000, gt=0, description="Plain-text documents for pretraining.")
    sft_examples: int = Field(8000, gt=0, description="User/assistant conversations for SFT.")
    val_examples: int = Field(400, gt=0, description="Held-out documents and conversations each.")
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, value):
        if not value or (isinstance(value, dict) and not any(w > 0 for w in value.values())):
            raise ValueError("name at least one task (with a weight > 0)")
        if isinstance(value, dict) and any(not w >= 0 or w == float("inf") for w in value.values()):
            raise ValueError("task weights are finite numbers >= 0")
        return value


ROW_FORMAT = Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids"]


class MixSource(_Strict):
    """One source of a weighted mixture (`sources` of `data.pretrain` / `data.sft`): mlxcore/data/mixture.py.

    A data catalog's named mixes are lists of these dicts ({spec, weight, format, columns, epochs})."""

    spec: str = Field(min_length=1, description="A download spec of its files (as in train).")
    weight: float = Field(1.0, ge=0, description="Its share of the training sequences: weight / the sum of the weights.")
    epochs: float | None = Field(None, gt=0, description="At most this many passes over it: a run whose steps and "
                                                         "weights need more fails before training; null: no limit.")
    format: ROW_FORMAT | None = Field(None, description="Its row schema; null: the section's format.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our field <- its column, e.g. {text: body} "
                                                                      "or {prompt: question, response: solution}.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="Its name in reports and cursors; default: <index>-<file name in the spec>.")


def _source_name(spec: str, index: int) -> str:
    """`1-web` for `data/web/*.jsonl`, `0-books` for `hf:o/n/books.parquet`: index + the spec's last name."""
    import re

    for part in reversed(re.split(r"[/:@\\]", spec)):
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", re.sub(r"[*?\[\]]", "", part).split(".")[0]).strip("-_")[:40]
        if slug:
            return f"{index}-{slug}"
    return f"{index}-source"


class SourceConfig(_Strict):
    """Where one kind of data (pretrain text or SFT chats) comes from and how rows become examples.

    `train` / `val` take download specs: `minimind:smoke|small|auto|<file>`, `gsm8k:train|test`,
    `hf:<owner>/<name>[@revision]/<path>` (hub datasets), or local files and globs (JSONL, a JSON
    array, parquet, or .txt whose blank-line-separated paragraphs are documents). Instead of
    `train`, `sources` is a weighted mixture of such specs (README: "Data mixtures and filters").
    """

    train: list[str] = Field([], description="Specs of the training files (one source); or set sources.")
    val: list[str] = Field([], description="Specs of held-out files; empty: hold out val_fraction of train.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Train rows held out when val is empty (fixed by row number).")
    val_max_rows: int = Field(1000, gt=0, description="At most this many held-out rows.")
    format: Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids"] = Field(
        "auto", description="Row schema; auto: detected from each file's first row.")
    text_field: str = Field("text", description="text format: the field holding the document.")
    prompt_field: str = Field("prompt", description="instruction format: the prompt's field.")
    response_field: str = Field("response", description="instruction format: the response's field.")
    prompt_format: str | None = Field(None, description="Template over the row's fields for the user turn, e.g. 'Q: {question}'.")
    response_format: str | None = Field(None, description="Template over the row's fields for the assistant turn.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_tokens: int | None = Field(None, gt=1, description="Per-document token limit; SFT default: its seq_len + 1.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What happens to documents over max_tokens.")
    sources: list[MixSource] = Field([], description="A weighted mixture instead of train: per source its spec, "
                                                     "weight, epochs, format, columns; each holds out val_fraction.")

    @field_validator("sources")
    @classmethod
    def _weights(cls, value: list[MixSource]) -> list[MixSource]:
        if value and not sum(s.weight for s in value) > 0:
            raise ValueError(f"the weights of the sources sum to {sum(s.weight for s in value):g}: "
                             "give at least one source a positive weight")
        names = [s.name or _source_name(s.spec, i) for i, s in enumerate(value)]
        if len(set(names)) != len(names):
            raise ValueError(f"sources need distinct names, got {names}")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "SourceConfig":
        if bool(self.train) == bool(self.sources):
            raise ValueError("set train (one source) or sources (a weighted mixture)"
                             + (", not both" if self.train else ""))
        if self.sources and self.val:
            raise ValueError("val: with sources, each source holds out val_fraction of its rows; val files are not taken")
        return self

    def mixture(self) -> list[dict]:
        """The sources as plain dicts, each with its name (what the stages and the loader record)."""
        return [{"name": s.name or _source_name(s.spec, i), "spec": s.spec, "weight": s.weight, "epochs": s.epochs,
                 "format": s.format, "columns": dict(s.columns)} for i, s in enumerate(self.sources)]

    @field_validator("prompt_format", "response_format")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            from mlxcore.data.records import template_fields

            try:
                if not template_fields(value):
                    raise ValueError("it uses no {field} of the row")
            except ValueError as e:
                raise ValueError(f"bad template {value!r}: {e}") from None
        return value

    def options(self) -> dict:
        """The format options pretokenize and tokenizer training take."""
        return self.model_dump(exclude={"train", "val", "max_tokens", "sources"})


class FilterConfig(_Strict):
    """Row filters between download and pretokenize (mlxcore/data/filters.py) over every real source of
    a kind (not the synthetic tasks). All off by default, and then no filter stage runs at all."""

    min_chars: int = Field(0, ge=0, description="Drop rows with fewer characters of text; 0: no lower bound.")
    max_chars: int | None = Field(None, gt=0, description="Drop rows with more characters; null: no upper bound "
                                                           "(a token bound: max_tokens with overlong: drop).")
    drop_control: bool = Field(False, description="Drop rows with control characters (but tab, newline, CR), "
                                                  "lone surrogates or U+FFFD (bytes that were not text).")
    scripts: list[Literal["latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "cjk"]] = Field(
        [], description="Keep rows whose letters are mostly of these scripts; empty: off.")
    min_script_fraction: float = Field(0.5, gt=0, le=1, description="The share of a row's letters that must be in "
                                                                     "`scripts`.")
    exact_dedup: bool = Field(False, description="Drop rows whose content equals an earlier row's (a content hash).")
    near_dedup: bool = Field(False, description="Drop near-duplicates of earlier rows (MinHash LSH, datasketch).")
    near_dup_threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity of two rows' "
                                                                    "shingles that makes one a near-duplicate.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a closer estimate, slower).")
    shingle: Literal["words", "chars"] = Field("words", description="Shingles of words, or of characters (text "
                                                                    "without spaces between words).")
    shingle_size: int = Field(5, gt=0, description="Words (or characters) per shingle.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bounds(self) -> "FilterConfig":
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars={self.max_chars} is below min_chars={self.min_chars}")
        return self

    @property
    def active(self) -> bool:
        """Whether any filter is on (else the pipeline runs no filter stage)."""
        return bool(self.min_chars or self.max_chars is not None or self.drop_control or self.scripts
                    or self.exact_dedup or self.near_dedup)


class DataConfig(_Strict):
    """Training data: real sources per kind, or (when unset) the synthetic tasks below."""

    synthetic: SyntheticConfig = SyntheticConfig()
    pretrain: SourceConfig | None = Field(None, description="Pretraining text; unset: synthetic.")
    sft: SourceConfig | None = Field(None, description="SFT conversations; unset: synthetic.")
    max_download_mb: float = Field(2048, gt=0, description="Refuse hub files larger than this (checked before downloading).")
    workers: int = Field(0, ge=0, description="Pretokenize processes; 0: every core (one process for small inputs).")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Row filters (dedup, near-dup, length, "
                                                                            "charset) before pretokenize; off by default.")

    @property
    def uses_synthetic(self) -> bool:
        return self.pretrain is None or self.sft is None


class TokenizerConfig(_Strict):
    path: str | None = Field(None, description="A local Hugging Face tokenizer dir; unset: train a BPE.")
    vocab_size: int = Field(1024, ge=300, description="Size of the byte-level BPE to train.")
    min_frequency: int = Field(2, ge=1)
    train_mb: float = Field(256, gt=0, description="Train the BPE on at most this much text (MB) of the train files.")


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


class HostConfig(_Strict):
    """One host of an `mlx.launch` hostfile (what `mlx.distributed_config` writes)."""

    ssh: str = Field(min_length=1, description="The name to reach it by: ssh's host, exec_prefix's {ssh}.")
    ips: list[str] = Field(default_factory=list, description="Addresses the ring backend listens on (one port per "
                           "rank and address); nccl / jaccl use the first host's first one as the coordinator.")
    rdma: list[str | list[str] | None] = Field(default_factory=list, description="jaccl: RDMA device to each host.")


class DistributedConfig(_Strict):
    """Where the `world_size` ranks run: this machine (no hosts), or hosts started over ssh / a command prefix."""

    backend: Literal["ring", "mpi", "nccl", "jaccl"] = Field(
        "ring", description="mx.distributed backend: ring (TCP), mpi (through mpirun), nccl (CUDA GPUs), jaccl (RDMA).")
    hosts: str | list[HostConfig] = Field(
        default_factory=list, description="An mlx.launch hostfile (JSON list of {ssh, ips}, or {hosts: [...], envs, "
        "backend}) or the same list inline; empty: every rank on this machine.")
    ranks_per_host: int = Field(1, gt=0, description="Ranks started on each host (one per GPU with nccl).")
    exec_prefix: str = Field("", description="Command that starts a rank on a host, with {ssh} {ip} {rank} "
                             "{local_rank}; empty: `ssh -o BatchMode=yes {ssh}`. A prefix that runs ssh gets the rank's "
                             "command as one quoted string, any other `sh -c COMMAND`, e.g. `ip netns exec {ssh}`.")
    python: str = Field("", description="Python on the hosts; empty: this one's path (the same venv on every host).")
    threads_per_rank: int = Field(0, ge=0, description="BLAS / OpenMP threads of a rank; 0: the host's cores / ranks_per_host.")
    starting_port: int = Field(32323, gt=0, lt=65536, description="ring: first port, +1 per rank and address; jaccl: "
                               "the coordinator's port (as mlx.launch).")
    nccl_port: int = Field(12345, gt=0, lt=65536, description="nccl: the coordinator's port (as mlx.launch).")

    @field_validator("exec_prefix")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        try:
            v.format(ssh="h", ip="0.0.0.0", rank=0, local_rank=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{v!r}: only {{ssh}} {{ip}} {{rank}} {{local_rank}} can be filled in ({e})") from None
        return v


class TrainConfig(_Strict):
    """One optimisation run: optimizer, schedule (linear warmup, cosine to a floor), memory knobs."""

    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seq_len: int = Field(128, gt=1, description="Tokens per packed sequence / SFT truncation length.")
    lr: float = Field(1e-3, ge=0, description="Peak learning rate; 0 trains nothing (a control run).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    eval_every: int = Field(100, ge=0, description="Steps between held-out evals; 0: only at the ends.")
    eval_batches: int = Field(8, gt=0)
    save_every: int = Field(100, ge=0, description="Steps between checkpoints; 0: only the final one.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept in checkpoints/.")
    log_every: int = Field(10, gt=0)
    seed: int = 0
    compile: bool = True
    # -- what trains
    fine_tune_type: Literal["full", "lora", "dora"] = Field(
        "full", description="full: every weight; lora/dora: adapters on a frozen base (mlx-lm's names).")
    lora: LoRAConfig = LoRAConfig()
    quantize: QuantizeConfig | None = Field(None, description="QLoRA: quantize the frozen base (lora/dora only).")
    # -- optimizer
    optimizer: Literal["adamw", "adafactor", "lion", "muon"] = Field(
        "adamw", description="muon: Muon on hidden weight matrices, AdamW on embeddings, norms and head.")
    optimizer_state_dtype: Literal["float32", "param"] = Field(
        "float32", description="AdamW moments in float32, or in the parameters' dtype (halves state for bf16).")
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of the Muon part (optimizer: muon).")
    fused_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Clip + update over concatenated buffers (adamw/lion); auto: where measured faster.")
    # -- memory
    grad_checkpoint: int = Field(0, ge=0, description="Recompute activations in segments of N layers; 0: off.")
    loss_chunk: int = Field(0, ge=0, description="Tokens per logits chunk in the loss (never the full [B,T,V]); 0: off.")
    sparse_loss: bool = Field(False, description="Compute logits only where the loss mask is 1 (SFT).")
    bucket: Literal["none", "length", "labels"] = Field(
        "none", description="SFT: batch rows of similar length / label count (less padding, fewer shapes).")
    bucket_window: int = Field(32, gt=0, description="Batches per sorting window when bucketing.")
    pad_multiple: int = Field(32, gt=0, description="SFT rows (and sparse label counts) pad to a multiple of this.")
    pack: bool | Literal["auto"] = Field(
        False, description="SFT: pack rows into seq_len sequences (best-fit decreasing), each row attending to itself "
        "with positions from 0; batch_size counts packs; bucket is then unused. auto: pack where the model and data "
        "allow (mlx-lm llama / qwen2 / qwen3, not a weighted mixture), else rows (the log says which).")
    # -- scale and diagnostics
    world_size: int = Field(1, gt=0, description="Data-parallel ranks (mx.distributed); batch_size is per rank.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Where the ranks run "
                                           "(README: Scale out); the job dir must be on a filesystem every host shares.")
    profile_timing: bool = Field(False, description="Time data, forward+backward, clip and optimizer separately.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if self.quantize is not None and self.fine_tune_type == "full":
            raise ValueError("quantize (QLoRA) needs fine_tune_type lora or dora: quantized weights cannot train")
        return self


class SampleConfig(_Strict):
    num_prompts: int = Field(4, ge=0)
    max_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)


def _default_sft() -> TrainConfig:
    # packed: 10 packs of 128 positions hold ~27 of the demo's conversations (45 tokens on average),
    # where 32 rows padded to the longest spent ~47% of each step on padding (configs/demo.yaml)
    return TrainConfig(steps=400, batch_size=10, lr=5e-4, warmup_steps=10, eval_every=100, pack="auto")


# The demo's synthetic mixture: copy and sort as before, one share for each other bench suite.
DEMO_TASKS = {"copy": 4.0, "sort": 2.0, "knowledge": 1.0, "qa": 1.0, "math_mcq": 1.0, "logic": 1.0, "json_calc": 1.0}


class _Run:
    """What a flow's config has: a run dir, and the token limit pretokenize applies per kind."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def pretokenize_limit(self, kind: str) -> int | None:
        """Per-document token limit: the source's max_tokens; SFT default seq_len + 1 (what training sees)."""
        source = getattr(self.data, kind)
        if source is not None and source.max_tokens is not None:
            return source.max_tokens
        return getattr(self, kind).seq_len + 1 if kind == "sft" else None


class TrackingConfig(_Strict):
    """Where `report_to` trackers send a run (mlxcore/tracking; README "Tracking and report cards")."""

    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, "
                                                     "else sqlite:///<run dir>/mlflow.db.")
    experiment: str | None = Field(None, description="Experiment / project name; default: the run's name.")
    run_name: str | None = Field(None, description="The tracker run's name; default: <name>-<UTC time>.")
    retries: int = Field(2, ge=0, description="Retries of a failed tracker call (after the first try).")
    backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry; doubles at each next one.")
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of one tracker request (MLflow).")
    system_metrics: bool = Field(True, description="CPU / memory metrics where the tracker records them.")


class _Tracked(_Strict):
    """What every training flow's config has: the experiment trackers it reports to."""

    report_to: list[Literal["mlflow", "wandb", "trackio", "tensorboard"]] = Field(
        default_factory=list, description="Experiment trackers: any of mlflow, wandb, trackio, tensorboard.")
    tracking: TrackingConfig = TrackingConfig()


BENCH_SUITES = ("math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy")
SuiteName = Literal["math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy"]


class BenchTarget(KeyedEndpoint, _Strict):
    """One column of a bench report: our checkpoint, an export of it (`gguf`: a GGUF file run by
    llama.cpp; `mlx-quantized`: a quantized MLX dir, or a float one quantized in memory), an Ollama
    model, an OpenAI-compatible endpoint, or `random` (a uniformly random answer from each
    question's answer space)."""

    kind: Literal["checkpoint", "gguf", "mlx-quantized", "ollama", "openai", "random"]
    name: str | None = Field(None, description="Its label in the report; default: the dir name, the model, 'random'.")
    path: str | None = Field(None, description="checkpoint / mlx-quantized: a local model dir; gguf: a .gguf file.")
    bits: Literal[4, 8] = Field(4, description="mlx-quantized, on a float model: quantize to this many bits.")
    group_size: Literal[32, 64, 128] = Field(64, description="mlx-quantized, on a float model: weights per scale.")
    url: str | None = Field(None, description="ollama (default http://127.0.0.1:11434) / openai: the server's base URL.")
    model: str | None = Field(None, description="ollama / openai: the model name the server knows.")
    workers: int = Field(4, ge=1, description="ollama / openai: concurrent requests.")
    timeout_s: float = Field(120, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "BenchTarget":
        if self.kind in ("checkpoint", "mlx-quantized") and not self.path:
            raise ValueError(f"a {self.kind} target needs path=/path/to/model")
        if self.kind == "gguf" and not (self.path and self.path.endswith(".gguf")):
            raise ValueError("a gguf target needs path=/path/to/model.gguf")
        if self.kind in ("ollama", "openai") and not self.model:
            raise ValueError(f"an {self.kind} target needs model=<name>")
        if self.kind == "openai" and not self.url:
            raise ValueError("an openai target needs url=http://HOST:PORT (the server's base URL)")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind in ("checkpoint", "mlx-quantized", "gguf"):
            path = Path(self.path)
            label = path.parent.name if path.name == "model" else path.stem if self.kind == "gguf" else path.name
            return label + (f"-mlx{self.bits}" if self.kind == "mlx-quantized" else "")
        return self.model if self.kind in ("ollama", "openai") else "random"


class BenchConfig(_Strict):
    """Synthetic bench suites scored per kind (see mlxcore/bench); every target answers the same questions."""

    suites: list[SuiteName] = Field(list(BENCH_SUITES), min_length=1)
    examples: int = Field(40, gt=0, description="Questions per suite.")
    seed: int = Field(0, description="Which questions: each is a pure function of (suite, seed, index).")
    max_tokens: int = Field(64, gt=0, description="Reply length limit (greedy decoding everywhere).")
    batch_size: int = Field(32, gt=0, description="checkpoint targets: questions generated per batch.")
    targets: list[BenchTarget] = Field([BenchTarget(kind="random")],
                                       description="Besides the flow's own model (pipeline, distill, rl).")

    @model_validator(mode="after")
    def _unique(self) -> "BenchConfig":
        labels = [t.label for t in self.targets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"targets need distinct names, got {labels}: set name= on each")
        return self


def _demo_targets() -> list[BenchTarget]:
    return [BenchTarget(kind="checkpoint", path="runs/demo/model", name="demo"), BenchTarget(kind="random")]


class BenchRunConfig(_Run, BenchConfig):
    """The `bench` flow alone: its targets side by side (default: the demo pipeline's model vs random)."""

    name: str = Field("bench", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Answers and reports go to <out_dir>/<name>/.")
    targets: list[BenchTarget] = Field(default_factory=_demo_targets, min_length=1)


class EvalConfig(_Run, _Strict):
    """The `eval` flow: held-out loss and perplexity of a checkpoint on files tokenized with its tokenizer."""

    name: str = Field("eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Tokenized data and metrics go to <out_dir>/<name>/.")
    checkpoint: str = Field("runs/demo/model", description="A local model dir (its tokenizer is used).")
    data: list[str] = Field(["runs/demo/data-*/sft/val.jsonl"], min_length=1,
                            description="Held-out files or download specs (as in data.sft.val).")
    kind: Literal["sft", "pretrain"] = Field("sft", description="sft: loss on assistant tokens; pretrain: every token.")
    format: Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k"] = "auto"
    system_prompt: str | None = None
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(256, gt=0)
    max_batches: int | None = Field(None, gt=0, description="Evaluate only the first N batches.")
    max_download_mb: float = Field(2048, gt=0)

    def check_checkpoint(self) -> None:
        if not is_model_dir(self.checkpoint):
            raise ConfigError(f"checkpoint: {self.checkpoint!r} is not a local model dir (no config.json); "
                              "set checkpoint=/path/to/model (or run `mlxflow run pipeline` for runs/demo/model)")


GGUF_TYPES = ("f16", "q8_0", "q4_0")
ExportFormat = Literal["f16", "q8_0", "q4_0", "mlx-4bit", "mlx-8bit"]


class GateTolerance(_Strict):
    """Points of bench accuracy (0-100) any suite may lose against the checkpoint; null: reported only."""

    f16: float | None = Field(1.0, ge=0)
    q8_0: float | None = Field(2.0, ge=0)
    q4_0: float | None = Field(None, ge=0)


class ParityGateConfig(_Strict):
    """Is the shipped GGUF the trained model? llama.cpp (llama-cpp-python) tokenizes text and answers the
    bench; the gate fails on any token id that differs from ours, or a suite's accuracy drop past
    `tolerance`. Its answers are also the bench's `gguf` column."""

    suites: list[SuiteName] = Field(list(BENCH_SUITES), min_length=1)
    examples: int = Field(100, gt=0, description="Bench questions per suite, answered greedily by both (100: one "
                                                 "answer is one point, finer than the tolerances).")
    max_tokens: int = Field(64, gt=0)
    seed: int = 0
    text: list[str] = Field([], description="Text files or dirs (.txt, .jsonl, ...) whose first `text_bytes` "
                                            "both tokenize, besides the bench prompts and every vocabulary entry.")
    text_bytes: int = Field(1_000_000, gt=0)
    tolerance: GateTolerance = GateTolerance()
    fail: bool = Field(True, description="A failed gate fails the flow; false: report it only.")


class HubPushConfig(KeyedEndpoint, _Strict):
    """Upload the exports to a Hugging Face Hub model repo (huggingface_hub; HF_ENDPOINT / HF_TOKEN honoured)."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="owner/name of the model repo (created if missing).")
    endpoint: str | None = Field(None, description="The hub's base URL; default $HF_ENDPOINT, else huggingface.co.")
    private: bool = False
    revision: str = "main"


class ExportConfig(_Strict):
    """Ship a checkpoint: GGUF (+ an Ollama Modelfile) and quantized MLX, gated on parity with llama.cpp."""

    formats: list[ExportFormat] = Field(["q8_0"], min_length=1,
                                        description="f16 / q8_0 / q4_0: GGUF; mlx-4bit / mlx-8bit: quantized MLX.")
    ollama: bool = Field(True, description="Write a Modelfile (explicit TEMPLATE and stops) beside each GGUF.")
    mlx_group_size: Literal[32, 64, 128] = 64
    gate: ParityGateConfig | None = Field(ParityGateConfig(), description="null: no gate (GGUF exports unchecked).")
    push: HubPushConfig | None = Field(None, description="Upload every export to the hub; null: keep them local.")

    @property
    def gguf(self) -> list[str]:
        return [f for f in self.formats if f in GGUF_TYPES]

    @property
    def mlx_bits(self) -> list[int]:
        return [int(f.split("-")[1][0]) for f in self.formats if f.startswith("mlx-")]


class ExportRunConfig(_Run, ExportConfig):
    """The `export` flow alone: ship any model dir mlxflow wrote (full, adapters, QLoRA) or a local HF one."""

    name: str = Field("export", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    model: str = Field(description="The model dir to ship (a checkpoint, adapter dir or local HF model).")


class PreferenceObjective(_Strict):
    """The preference objective (the losses: mlxcore/preference/losses.py)."""

    name: Literal["dpo", "ipo", "hinge", "simpo", "orpo", "kto"] = Field(
        "dpo", description="dpo / ipo / hinge / kto use reference log-probs (their own cached stage); simpo / orpo none.")
    beta: float = Field(0.1, gt=0, description="dpo/ipo/hinge/kto: how far from the reference; simpo: reward scale; "
                                                "orpo: weight of the odds-ratio term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/simpo: share of pairs taken as mislabelled "
                                                                  "(conservative DPO).")
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows.")
    sft_weight: float = Field(0.0, ge=0, description="Add this x the chosen reply's per-token NLL (RPO, TRL's "
                                                     "rpo_alpha); orpo has its own.")


class PreferenceSourceConfig(SourceConfig):
    """Preference files: pairs (prompt/chosen/rejected), chosen/rejected conversations (MiniMind's
    dpo.jsonl, HH, UltraFeedback), KTO rows (prompt/completion/label) or scored rows
    (prompt/response/reward). `train`/`val` take the same specs as SFT data (`minimind:dpo`, `hf:`, files)."""

    val_fraction: float = Field(0.05, ge=0, lt=1, description="Train rows held out when val is empty (fixed by row number).")
    val_max_rows: int = Field(500, gt=0, description="At most this many held-out rows.")
    format: Literal["auto", "pairs", "pair-messages", "kto", "scored"] = Field(
        "auto", description="Row schema; auto: detected from each file's first row.")
    reward_field: str = Field("reward", description="scored format: the field holding the reward (else 'score').")
    train: list[str] = Field(min_length=1, description="Specs of the training files.")
    sources: list[MixSource] = Field([], exclude=True, description="Not for preference data (mixtures are for "
                                                                   "data.pretrain / data.sft).")

    @field_validator("sources")
    @classmethod
    def _no_mixture(cls, value: list[MixSource]) -> list[MixSource]:
        if value:
            raise ValueError("weighted mixtures are for data.pretrain / data.sft; preference data takes train / val")
        return value


class SyntheticPairsConfig(_Strict):
    """Preference data drawn from the bench's generators: chosen is the right answer, rejected a near miss."""

    tasks: list[Literal["sort", "copy", "arithmetic"]] = Field(["sort"], min_length=1)
    train_examples: int = Field(2000, gt=0)
    val_examples: int = Field(200, gt=0)
    rows: Literal["pairs", "kto", "scored"] = Field("pairs", description="pairs; kto: each side as a labelled row; "
                                                                          "scored: each side with reward 1 / 0.")
    seed: int = 0


def _default_preference_train() -> TrainConfig:
    return TrainConfig(steps=150, batch_size=16, lr=5e-5, warmup_steps=10, eval_every=50, save_every=50,
                       eval_batches=4, seq_len=128, weight_decay=0.0)


class PreferenceStage(_Strict):
    """Preference training on a fine-tuned model: its data, objective and optimisation."""

    data: PreferenceSourceConfig | None = Field(None, description="Preference files; unset: synthetic pairs "
                                                                  "(pipeline, preference flow) or the distill run's "
                                                                  "own pairs (distill).")
    synthetic: SyntheticPairsConfig = SyntheticPairsConfig()
    objective: PreferenceObjective = PreferenceObjective()
    train: TrainConfig = Field(default_factory=_default_preference_train)
    eval_batch_size: int = Field(16, gt=0, description="Reference log-probs and held-out metrics: examples per batch.")
    pairs_val_fraction: float = Field(0.2, gt=0, lt=1, description="distill's own pairs: the share held out "
                                                                   "(by row number) for the held-out metrics.")

    def max_tokens(self) -> int:
        return self.data.max_tokens if self.data is not None and self.data.max_tokens else self.train.seq_len + 1


class PreferenceRunConfig(_Run, _Tracked, PreferenceStage):
    """The `preference` flow: data -> pretokenize pairs -> reference log-probs -> train -> eval -> bench."""

    name: str = Field("preference", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    init_from: str = Field(description="The model to align: a local model dir (an SFT'd checkpoint, HF or mlx-lm).")
    max_download_mb: float = Field(2048, gt=0)
    bench: BenchConfig | None = Field(BenchConfig(suites=["sort", "copy"]),
                                      description="The trained model beside the one it started from; null: skip.")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")


def _default_reward_train() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=1e-4, warmup_steps=10, eval_every=50, save_every=50,
                       eval_batches=4, seq_len=128, weight_decay=0.0)


class RewardModelRunConfig(_Run, _Strict):
    """The `reward-model` flow: a scalar-head model on pairs (Bradley-Terry) or scored rows (regression)."""

    name: str = Field("reward-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    init_from: str = Field(description="The decoder to start from: a local model dir (its LM head is not used).")
    data: PreferenceSourceConfig | None = Field(None, description="Pairs or scored rows; unset: synthetic pairs.")
    synthetic: SyntheticPairsConfig = SyntheticPairsConfig()
    train: TrainConfig = Field(default_factory=_default_reward_train)
    margin: float = Field(0.0, ge=0, description="pairs: the margin chosen must beat rejected by.")
    dense_weight: float = Field(0.0, ge=0, description=(
        "pairs: weight of a per-position Bradley-Terry term. At every position after chosen and rejected first "
        "differ, the chosen prefix must score higher, so the head learns to carry a mistake it saw to the last "
        "token it is read at (0: the plain last-token loss)."))
    eval_batch_size: int = Field(16, gt=0)
    max_download_mb: float = Field(2048, gt=0)

    def max_tokens(self) -> int:
        return self.data.max_tokens if self.data is not None and self.data.max_tokens else self.train.seq_len + 1


class PipelineConfig(_Run, _Tracked):
    """The whole DAG: data -> tokenizer -> pretokenize -> pretrain -> sft -> eval -> sample."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    data: DataConfig = DataConfig(synthetic=SyntheticConfig(tasks=DEMO_TASKS, sft_examples=16000))  # configs/demo.yaml says why
    # The demo's BPE merges only pairs seen 500+ times: the task words, not the letters of random
    # strings, so a string to copy is the same tokens in the prompt and in the answer.
    tokenizer: TokenizerConfig = TokenizerConfig(min_frequency=500)
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig(steps=500)  # the tiny model learns to copy at ~300 steps
    sft: TrainConfig = Field(default_factory=_default_sft)
    sample: SampleConfig = SampleConfig()
    bench: BenchConfig | None = Field(BenchConfig(), description="The last stage: bench suites vs `targets`; null: skip.")
    preference: PreferenceStage | None = Field(None, description="After SFT: preference training (DPO, ...) on "
                                                                  "synthetic pairs or given files; null: none.")
    export: ExportConfig | None = Field(ExportConfig(), description="The final model as GGUF q8_0 (+ Modelfile), "
                                                                   "gated on llama.cpp parity; null: none.")

    @model_validator(mode="after")
    def _check_retention(self) -> "PipelineConfig":
        m = self.model
        if m.arch == "retention":
            if self.pretrain.seq_len % m.retention_chunk:
                raise ValueError(f"model.retention_chunk={m.retention_chunk} does not divide pretrain.seq_len="
                                 f"{self.pretrain.seq_len}: training sequences must be whole chunks")
            if self.sft.pack is True:
                raise ValueError("sft.pack: packed rows need a per-row attention mask, which model.arch=retention "
                                 "does not take; set sft.pack: false (or auto)")
        return self


def _default_finetune() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=2e-4, warmup_steps=10, eval_every=100, fine_tune_type="lora")


class FinetuneConfig(_Run, _Tracked):
    """Fine-tune a local Hugging Face / mlx-lm model dir on chat data (its own tokenizer)."""

    name: str = Field("finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    base_model: str = Field(description="A local model dir (llama / qwen2 / qwen3 ...); no code from it runs.")
    data: DataConfig = DataConfig()
    sft: TrainConfig = Field(default_factory=_default_finetune)
    sample: SampleConfig = SampleConfig()
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")

    @field_validator("base_model")
    @classmethod
    def _is_model_dir(cls, value: str) -> str:
        if not is_model_dir(value, adapters=False):
            raise ValueError(f"{value!r} is not a local model dir (no config.json); set base_model=/path/to/model")
        return value


class PromotionConfig(_Strict):
    """Champion / challenger (mlxcore/tracking/promotion.py): `<run>/model` moves to a new iteration's model only when
    it beats the champion on the same questions (paired bootstrap) and no suite loses more than `tolerance`."""

    enabled: bool = Field(True, description="Gate `<run>/model`; false: every iteration's model is published.")
    metric: Literal["auto", "bench", "eval"] = Field(
        "auto", description="bench: per-question bench correctness; eval: the held-out prompts' accuracy (their "
                            "reward without an accuracy term); auto: bench when `bench` is set, else eval.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Promote only when the lower end of this paired "
                                                            "bootstrap interval of (challenger - champion) is above 0.")
    tolerance: float = Field(0.02, ge=0, description="No suite may lose more than this (accuracy, 0-1) vs the champion.")
    resamples: int = Field(10_000, gt=0)
    start_from: Literal["auto", "latest", "champion"] = Field(
        "latest", description="RL: the policy the next iteration starts from. latest: the last iteration's (the "
                              "gate only decides what `<run>/model` links); auto: the latest, unless it was "
                              "significantly worse than the champion or a suite regressed past `tolerance` (then "
                              "the champion); champion: always the champion.")
    registry_uri: str | None = Field(None, description="MLflow tracking URI whose model registry records each "
                                                       "champion (alias `champion`); null: $MLFLOW_TRACKING_URI or none.")
    registry_model: str | None = Field(None, description="The registered model's name (null: the run's name).")


class StreamConfig(_Strict):
    """How the student trains on rows while they are still being generated."""

    val_rows: int = Field(32, ge=1, description="The first N rows are held out for evaluation.")
    cold_start_rows: int = Field(64, ge=1, description="Training starts once this many train rows exist.")
    epochs: float = Field(2.0, gt=0, description="Passes over the rows: paces training while generation runs "
                                                 "and plans the step count.")
    poll_s: float = Field(0.5, gt=0, description="How often to look for new rows while waiting.")
    stall_timeout_s: float = Field(900, gt=0, description="Give up when no row arrives for this long.")


class StudentConfig(_Strict):
    """The model distillation trains: a fresh one (`model` preset + a tokenizer) or `init_from`."""

    init_from: str | None = Field(None, description="A local model dir (ours, Hugging Face or mlx-lm) to start "
                                                    "from; its tokenizer is used. Unset: a fresh `model`.")
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = Field(
        default_factory=lambda: TokenizerConfig(vocab_size=2048),
        description="A fresh student's tokenizer: a local dir, or a BPE trained on the prompt stream.")

    @field_validator("init_from")
    @classmethod
    def _is_model_dir(cls, value: str | None) -> str | None:
        if value is not None and not is_model_dir(value, adapters=False):
            raise ValueError(f"{value!r} is not a local model dir (no config.json)")
        return value


def _default_distill_train() -> TrainConfig:
    return TrainConfig(steps=2000, batch_size=8, seq_len=512, lr=5e-4, warmup_steps=20, eval_every=50,
                       save_every=50, log_every=5)


class DistillConfig(_Run, _Tracked):
    """A teacher writes verified SFT rows while the student trains on the growing file.

    `train.steps` is the most steps; the run plans `stream.epochs` passes over `target_rows`.
    """

    name: str = Field("distill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    teacher: TeacherConfig = TeacherConfig()
    prompts: PromptConfig = PromptConfig()
    verify: VerifyPolicy = VerifyPolicy()
    target_rows: int = Field(2000, gt=0, description="Verified rows to generate.")
    max_prompts: int | None = Field(None, gt=0, description="Prompts to try at most; default 20 x target_rows.")
    student: StudentConfig = StudentConfig()
    train: TrainConfig = Field(default_factory=_default_distill_train)
    stream: StreamConfig = StreamConfig()
    sample: SampleConfig = Field(default_factory=lambda: SampleConfig(num_prompts=8, max_tokens=128))
    bench: BenchConfig | None = Field(BenchConfig(), description="The last stage: the student vs the teacher and "
                                                               "`targets` on the bench suites; null: skip.")
    preference: PreferenceStage | None = Field(None, description="After the student: preference training on the "
                                                                  "teacher's verified right vs wrong replies (pairs.jsonl) "
                                                                  "or on `preference.data`; null: none.")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")
    promotion: PromotionConfig = Field(PromotionConfig(), description="Champion / challenger: when a run's student "
                                                                      "becomes <run>/model.")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.train.fine_tune_type != "full" and self.student.init_from is None:
            raise ValueError(f"train.fine_tune_type {self.train.fine_tune_type} trains adapters on a base model: "
                             "set student.init_from")
        if self.target_rows <= self.stream.val_rows:
            raise ValueError(f"target_rows={self.target_rows} leaves no training rows after stream.val_rows="
                             f"{self.stream.val_rows}")
        if self.train.world_size != 1:
            raise ValueError("distillation trains on one process: train.world_size must be 1")
        return self


class RolloutConfig(_Strict):
    """How each RL iteration samples: `prompts` prompts of the train set, `k` completions each."""

    prompts: int = Field(64, gt=0, description="Prompts per iteration (the next ones of a seeded shuffle).")
    k: int = Field(8, ge=2, description="Samples per prompt (the group the advantages compare within).")
    max_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    prompts_per_batch: int = Field(8, gt=0, description="Prompts whose k samples generate in one batch.")


RL_LOSSES = ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo")


class RLUpdateConfig(_Strict):
    """The update of one iteration: a GRPO-family loss or PPO (mlxcore/rl/objectives.py, ppo.py).

    PPO names as in the MLX-Pretrain seed / TRL: ppo_epochs = `epochs`, ppo_mini_batch_size =
    `batch_size`, clip_range = `clip_eps`."""

    loss: Literal["grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo"] = Field(
        "grpo", description="grpo | dapo (clip-higher, overlong filter) | dr_grpo (no length/std normalisation) | "
                            "gspo (sequence-level ratio) | rloo (leave-one-out baseline) | ppo (value model, GAE).")
    lr: float = Field(1e-5, gt=0)
    clip_eps: float | None = Field(None, gt=0, lt=1, description="Lower clip range of the importance ratio "
                                                                  "(null: the loss's default, 0.2; gspo 3e-4).")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip range (null: the loss's default: "
                                                                 "= clip_eps; dapo 0.28; gspo 4e-4).")
    overlong_filter: bool | None = Field(None, description="Leave truncated samples (hit max_tokens) out of the "
                                                           "loss (null: the loss's default: on for dapo).")
    beta: float = Field(0.0, ge=0, description="KL penalty to the starting policy (GRPO family); 0: no reference is loaded.")
    scale_rewards: bool = Field(True, description="grpo/dapo/gspo: divide advantages by the group's std (False: centre only).")
    batch_size: int = Field(16, gt=0, description="Samples per optimizer step (PPO: ppo_mini_batch_size).")
    epochs: int = Field(1, ge=0, description="Passes over the iteration's buffer (PPO: ppo_epochs); 0: no update "
                                             "(rollout and eval only).")
    grad_clip: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup of the iteration's update (the training loop's schedule).")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine floor as a fraction of lr; 1: a constant lr.")
    fine_tune_type: Literal["full", "lora", "dora"] = "full"
    lora: LoRAConfig = LoRAConfig()
    # PPO only
    kl_coef: float = Field(0.05, ge=0, description="PPO: per-token KL penalty to the reference in the reward "
                                                   "(the starting value when kl_target is set).")
    kl_target: float | None = Field(None, gt=0, description="PPO: adapt kl_coef towards this KL per iteration "
                                                            "(Ziegler et al.); null: fixed kl_coef.")
    kl_horizon: float = Field(10000, gt=0, description="PPO: the adaptive KL controller's horizon (samples).")
    vf_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss.")
    critic_lr: float | None = Field(None, gt=0, description="PPO: the critic's learning rate (null: lr).")
    cliprange_value: float = Field(0.2, gt=0, description="PPO: clip range of the value update.")
    gamma: float = Field(1.0, gt=0, le=1, description="PPO: discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        """The training loop's settings for an update of `steps` steps (AdamW, betas 0.9 / 0.999)."""
        return TrainConfig(steps=max(steps, 1), batch_size=self.batch_size, lr=self.lr, warmup_steps=min(self.warmup_steps, max(steps, 1)),
                           min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, beta2=0.999,
                           grad_clip=self.grad_clip, eval_every=0, save_every=max(steps // 4, 1), keep_last=1,
                           log_every=1, seed=seed, compile=False, fine_tune_type=self.fine_tune_type, lora=self.lora)


class RewardSpec(_Strict):
    """One term of the reward: `weight` x a reward function's value for (prompt, completion, row).

    `name`: a built-in (mlxcore/rl/rewards.py: numeric_match, exact_match, gsm8k_format, format,
    overlong, length, repetition), a function of `rewards_file`, `judge` (the LLM judge) or
    `reward_model` (the learned reward model's score). `args`: keyword arguments for it."""

    name: str = Field(min_length=1)
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)


JUDGE_TEMPLATE = ("Rate the assistant's answer to the user's request on a scale of 0 to {max_score}, "
                  "where {max_score} is a fully correct, helpful answer.\n\n"
                  "Request:\n{prompt}\n\n{reference}Answer:\n{completion}\n\n"
                  "Reply with the score only, as a number.")


class JudgeConfig(_Strict):
    """An LLM judge (reward `judge`): the teacher client (Ollama or OpenAI-compatible, with its
    retries and failure budget) asked for a score; the reward is score / max_score (0..1)."""

    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(temperature=0.0, max_tokens=16))
    template: str = Field(JUDGE_TEMPLATE, description="Placeholders: {prompt}, {completion}, {reference} (the "
                                                       "row's `answer`, as 'Reference answer: ...', or empty), {max_score}.")
    max_score: float = Field(10.0, gt=0)
    attempts: int = Field(2, ge=1, description="Asks per completion when the reply holds no score in range.")


class RLDataConfig(_Strict):
    """How rows of `train` / `test` become prompts (and the reference fields rewards see)."""

    format: Literal["auto", "gsm8k", "prompt", "chat"] = Field(
        "auto", description="gsm8k: question + answer ('... #### n'); prompt: a `prompt` column (text or messages) "
                            "plus reference columns; chat: SFT rows (messages/conversations, instruction/output, "
                            "prompt/completion), the last assistant turn is the reference `answer`; auto: by the row.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our field <- your column, e.g. "
                                                                     "{prompt: question, answer: solution}.")


class RLConfig(_Run, _Tracked):
    """RL on any prompt set: every flow run is one iteration (rollout -> update -> eval) continuing the last."""

    name: str = Field("rl", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="State and iterations go to <out_dir>/<name>/.")
    policy: str = Field(description="The starting model: a local model dir (ours, Hugging Face or mlx-lm).")
    train: list[str] = Field(["gsm8k:train"], min_length=1, description="Specs of the prompts to train on.")
    test: list[str] = Field(["gsm8k:test"], min_length=1, description="Specs of the held-out prompts.")
    data: RLDataConfig = RLDataConfig()
    max_download_mb: float = Field(2048, gt=0)
    system_prompt: str | None = Field(
        "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
        description="System message of every prompt; null: none.")
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric_match")],
                                      description="The reward: the weighted sum of these terms.")
    rewards_file: str | None = Field(None, description="A Python file whose functions are reward names "
                                                       "(fn(prompt, completion, **row) -> float, sync or async).")
    judge: JudgeConfig | None = Field(None, description="The LLM judge for a `judge` reward term.")
    reward_model: str | None = Field(None, description="A reward model dir (the reward-model flow's) for a "
                                                       "`reward_model` term; PPO's critic starts from it.")
    warmup: TrainConfig | None = Field(None, description="SFT on the train split's reference answers before the "
                                                         "first iteration; null: none.")
    rollout: RolloutConfig = RolloutConfig()
    update: RLUpdateConfig = RLUpdateConfig()
    iterations: int = Field(100, gt=0, description="Stop after this many iterations (later runs do nothing).")
    eval_prompts: int = Field(200, ge=0, description="Held-out prompts answered greedily and scored after every iteration.")
    eval_max_tokens: int = Field(256, gt=0)
    seed: int = 0
    bench: BenchConfig | None = Field(None, description="After each iteration: the new policy vs `targets` on the "
                                                        "bench suites; null: skip.")
    schedule_minutes: float | None = Field(None, gt=0, description="Deployments only: start an iteration this often "
                                                                     "(never two at once).")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")
    promotion: PromotionConfig = Field(PromotionConfig(), description="Champion / challenger: when an iteration's "
                                                                      "policy becomes <run>/model.")

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        names = [r.name for r in self.rewards]
        if not names:
            raise ValueError("rewards: name at least one reward term")
        if "judge" in names and self.judge is None:
            raise ValueError("rewards: a `judge` term needs the `judge:` section (the judge's teacher)")
        if "reward_model" in names and self.reward_model is None:
            raise ValueError("rewards: a `reward_model` term needs `reward_model:` (a reward model dir)")
        if self.update.loss == "ppo" and self.update.fine_tune_type != "full":
            raise ValueError("update.loss ppo trains full weights (policy and critic): set update.fine_tune_type full")
        return self

    def check_policy(self) -> None:
        """The policy must exist when a run starts (a deployment may name it before it does)."""
        if not is_model_dir(self.policy, adapters=False):
            raise ConfigError(f"policy: {self.policy!r} is not a local model dir (no config.json); "
                              "set policy=/path/to/model")


# ---------------------------------------------------------------- loading YAML with good errors


def _node_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along `loc` (a pydantic error location)."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(err: ValidationError, source: str, root: yaml.Node | None, overrides: list[str] = (),
                   label: str = "--set") -> str:
    """One line per error: where it came from (the `--set` that set the key, else the file's line), the key, why."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        setter = next((item for item in reversed(overrides)
                       if _startswith(key, item.partition("=")[0]) or _startswith(item.partition("=")[0], key)), None)
        if setter is not None:
            where = f"{label} {setter}"
        else:
            line = _node_line(root, loc)
            where = f"{source}:{line}" if line else source
        lines.append(f"{where}: {key}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _startswith(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def spec(value: Any) -> Any:
    """What was chosen in a config, as plain data: validating it gives the config back.

    A nested config is always carried (its own choices may differ from its class's defaults, e.g.
    `pretrain: TrainConfig(steps=500)`); a plain field only where it was set. So a key nobody set
    keeps its default after any change elsewhere, and a model's preset fills only the shapes
    nobody chose (see `ModelConfig`)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if field.exclude:
                continue
            if name in value.model_fields_set or _has_config(item):
                out[name] = spec(item)
        return out
    if isinstance(value, (list, tuple)):
        return [spec(v) for v in value]
    if isinstance(value, dict):
        return {k: spec(v) for k, v in value.items()}
    return to_jsonable_python(value)


def _has_config(value: Any) -> bool:
    return isinstance(value, BaseModel) or (isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value))


def defaults(cls: type[BaseModel]) -> dict:
    """`spec` of a config class's defaults (its required fields left out)."""
    out = {}
    for name, field in cls.model_fields.items():
        if not field.is_required() and not field.exclude:
            value = field.get_default(call_default_factory=True)
            if _has_config(value):  # a plain default is what validation gives anyway
                out[name] = spec(value)
    return out


def merge(base: dict, layer: dict) -> dict:
    """`layer` over `base`: sections merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in layer.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _section_class(annotation) -> type[BaseModel] | None:
    """The config class of a field typed `Section` or `Section | None`."""
    for t in typing.get_args(annotation) or (annotation,):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def fill_sections(cls: type[BaseModel], data: dict) -> dict:
    """A section that a YAML or an override brings where the default is none (e.g. `preference:`)
    starts from its class's defaults, the same as a section that was there: the one rule."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        sub, value = _section_class(field.annotation), out.get(name)
        if sub is not None and isinstance(value, dict):
            out[name] = fill_sections(sub, merge(defaults(sub), value))
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sft.lr=1e-4")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type[BaseModel] = PipelineConfig):
    """Build `cls` from a YAML file (optional) plus `KEY=VALUE` overrides."""
    root, data, source = None, {}, "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is skipped
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raw = Path(path).read_bytes()
            line = raw.count(b"\n", 0, e.start) + 1
            col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col})") from None
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}:1: expected a mapping of settings, got {type(data).__name__}")
    data = fill_sections(cls, apply_overrides(merge(defaults(cls), data), list(overrides)))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, root, list(overrides))) from None


def with_overrides(config: BaseModel, overrides: list[str]) -> BaseModel:
    """`config` with `KEY=VALUE` overrides applied (a flow parameter's `--set`); errors name the key."""
    if not overrides:
        return config
    data = fill_sections(type(config), apply_overrides(spec(config), list(overrides)))
    try:
        return type(config).model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "<config>", None, list(overrides), "overrides:")) from None


# ----------------------------------------------------------------- vision-language (README "Vision-language")
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
