"""Any checkpoint we write as one GGUF file that llama.cpp loads and runs like the MLX model.

    export_gguf(model_dir, out_path, qtype="f16", *, name=None, on_progress=None) -> dict

`model_dir` is a checkpoint / model dir (llama, qwen2, qwen3 or qwen3_moe), or an adapter dir (LoRA/DoRA,
fused in memory; QLoRA: the quantized base is dequantized first), so the quantizer always starts
from full precision. Tensors, per llama.cpp's names:

  token_embd, output_norm, output (absent when embeddings are tied: llama.cpp then ties),
  blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm,
         ffn_norm, ffn_gate, ffn_up, ffn_down} (+ .bias where the checkpoint has one)

1-D tensors (norms, biases) stay float32. 2-D weights are float16 ("f16") or q8_0 / q4_0 when
their rows are a multiple of the 32-wide block, else float16 (listed in the result's
`f16_fallback`). llama's q/k rows are permuted from Hugging Face's rotate-half RoPE layout
(mlx-lm's `traditional=False`) to llama.cpp's interleaved pairs, as llama.cpp's own converter
does; qwen2/qwen3 run NEOX RoPE in llama.cpp and are written as they are.

The vocabulary is the tokenizer's exact byte-level BPE (see vocab.py). The file is written
beside `out_path` under a temp name and renamed into place: a failed export leaves no temp
file and an existing `out_path` untouched.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mlxcore.export import vocab as vocab_mod
from mlxcore.io import fsync_dir, tmp_path, writing

QTYPES = ("f16", "q8_0", "q4_0")
# config model_type -> llama.cpp architecture
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # a mixture of experts (qwen3_moe): the router, and the experts stacked [E, out, in] as llama.cpp keeps them
    "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for an mlx-lm parameter name (ValueError for one it has no place for)."""
    if m := _LAYER_NAME.match(name):
        layer, module, leaf = m.groups()
        if module in _LAYER:
            return f"blk.{layer}.{_LAYER[module]}.{leaf}"
    else:
        module, _, leaf = name.rpartition(".")
        if module in _GLOBAL and leaf in ("weight", "bias"):
            return f"{_GLOBAL[module]}.{leaf}"
    raise ValueError(f"parameter {name!r} has no llama.cpp tensor; this checkpoint cannot be exported as GGUF")


def rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows (or bias) from rotate-half order (pairs i, i+d/2 of each head) to interleaved (2i, 2i+1)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_full_precision(model_dir: Path):
    """(float32 numpy weights by mlx-lm name, config): adapters fused, quantized layers dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxcore.models import adapters, checkpoint

    model, config = checkpoint.load(model_dir)
    model = adapters.fuse_model(model)  # merges LoRA/DoRA and dequantizes (QLoRA base, 4-bit dirs)
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    return weights, config


def _tokenizer_dir(model_dir: Path) -> Path:
    from mlxcore.models.layout import is_adapter_dir

    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file():
        return model_dir
    if is_adapter_dir(model_dir):  # adapter checkpoints normally carry the tokenizer; else the base's
        import json

        base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model")
        if base and Path(base).is_dir():
            return Path(base)
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json (GGUF export needs the tokenizer)")


def _hparams(config: dict, arch: str, weights: dict) -> dict:
    if "model.embed_tokens.weight" not in weights:
        raise ValueError("no model.embed_tokens.weight: not an mlx-lm llama/qwen2/qwen3 layout")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {config['rope_scaling']!r} is not supported by the GGUF export")
    if config.get("rope_traditional"):
        raise ValueError("rope_traditional=True checkpoints are not supported by the GGUF export")
    return {
        "context_length": config.get("max_position_embeddings", 2048),
        "embedding_length": hidden,
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": heads,
        "head_count_kv": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "explicit_head_dim": head_dim != hidden // heads or arch in ("qwen3", "qwen3moe"),
        "rms_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": config.get("rope_theta", 10000.0),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
    } | (_moe_hparams(config) if arch == "qwen3moe" else {})


def _moe_hparams(config: dict) -> dict:
    """llama.cpp's qwen3moe: every layer sparse, softmax routing, top-k weights renormalised."""
    if not config.get("norm_topk_prob", False):
        raise ValueError("norm_topk_prob=false: llama.cpp's qwen3moe renormalises the top-k routing weights; "
                         "this checkpoint cannot be exported as GGUF")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("dense layers in a qwen3_moe (mlp_only_layers / decoder_sparse_step) are not supported "
                         "by the GGUF export")
    return {"expert_count": config["num_experts"], "expert_used_count": config["num_experts_per_tok"],
            "expert_feed_forward_length": config["moe_intermediate_size"]}


def _plan(weights: dict, hp: dict, arch: str, qtype: str):
    """[(gguf name, float32 array, GGMLQuantizationType)] in llama.cpp's order, and the f16 fallbacks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    target = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    plan, fallback = [], []
    for name, w in sorted(weights.items(), key=lambda kv: _order(kv[0])):
        out = gguf_name(name)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = rope_interleave(w, hp["head_count"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = rope_interleave(w, hp["head_count_kv"])
        if w.ndim == 1 or out.endswith("ffn_gate_inp.weight"):  # a MoE router stays exact (as llama.cpp's converter)
            t = Q.F32
        elif target == Q.F16 or w.shape[-1] % GGML_QUANT_SIZES[target][0] == 0:
            t = target
        else:
            t = Q.F16
            fallback.append(out)
        plan.append((out, w, t))
    return plan, fallback


def _order(name: str) -> tuple:
    m = _LAYER_NAME.match(name)
    first = {"model.embed_tokens.weight": -2}
    return (int(m[1]), name) if m else (first.get(name, 1 << 30), name)


def _encode(w: np.ndarray, t, name: str) -> np.ndarray:
    from gguf.quants import quantize

    data = quantize(w, t)
    if data.dtype == np.float16 and not np.isfinite(data).all():
        raise ValueError(f"{name}: values beyond float16's range (max |w| = {np.abs(w).max():.3g}) cannot be written as f16")
    return data


def export_gguf(model_dir: str | Path, out_path: str | Path, qtype: str = "f16", *, name: str | None = None,
                on_progress: Callable[[int, int], None] | None = None, _pre_override: str | None = None) -> dict:
    """Write `model_dir` (checkpoint, model dir or adapter dir) as a GGUF at `out_path`.

    qtype: "f16", "q8_0" or "q4_0" (QTYPES). on_progress(done, total) is called per tensor
    written (first with done=0). `_pre_override` writes another `tokenizer.ggml.pre` name
    (tests only: it proves the tokenizer-parity check can fail).

    Returns {"path", "qtype", "bytes" (file size), "arch", "n_params" (elements written), "pre"
    (llama.cpp pre-tokenizer), "seconds", "f16_fallback" (2-D tensors left f16 under q8_0/q4_0
    because their rows are not a multiple of 32), "tied" (no output.weight)}.
    """
    import gguf

    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r}: choose one of {', '.join(QTYPES)}")
    start = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    weights, config = _load_full_precision(model_dir)
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"{model_dir}: model_type {model_type!r} cannot be exported (supported: {', '.join(ARCHS)})")
    arch = ARCHS[model_type]
    hp = _hparams(config, arch, weights)
    vocab = vocab_mod.read_vocab(_tokenizer_dir(model_dir), hp["vocab_size"])
    if _pre_override is not None:
        vocab.pre = _pre_override
    plan, fallback = _plan(weights, hp, arch, qtype)
    del weights

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name or model_dir.resolve().name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    if hp["explicit_head_dim"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_vocab_size(hp["vocab_size"])
    if "expert_count" in hp:
        w.add_expert_count(hp["expert_count"])
        w.add_expert_used_count(hp["expert_used_count"])
        w.add_expert_feed_forward_length(hp["expert_feed_forward_length"])
    vocab_mod.add_to(w, vocab)
    for out, arr, t in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor_info(out, arr.shape, np.dtype(np.float32), arr.size // block * type_size, raw_dtype=t)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(out_path)
    total = len(plan)
    try:
        with writing(out_path):
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            if on_progress:
                on_progress(0, total)
            for done, (out, arr, t) in enumerate(plan, 1):
                w.write_tensor_data(_encode(arr, t, out))
                if on_progress:
                    on_progress(done, total)
            w.flush()
            os.fsync(w.fout[0].fileno())
            w.close()
            os.replace(tmp, out_path)
            fsync_dir(out_path.parent)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_path), "qtype": qtype, "bytes": out_path.stat().st_size, "arch": arch,
            "n_params": sum(arr.size for _, arr, _ in plan), "pre": vocab.pre,
            "seconds": round(time.perf_counter() - start, 3), "f16_fallback": fallback,
            "tied": not any(out == "output.weight" for out, _, _ in plan)}
