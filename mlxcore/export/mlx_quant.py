"""Any checkpoint as a 4- or 8-bit MLX model in the layout `mlx_lm.load` reads.

    export_mlx_quantized(model_dir, out_dir, bits=4, group_size=64, *, overwrite=False) -> dict

`model_dir` is whatever mlxcore reads (`checkpoint.load`): a full checkpoint, a local Hugging Face /
mlx-lm model dir, an adapter dir (LoRA/DoRA: the adapters are fused into the base first; QLoRA:
its quantized base is dequantized and the adapters fused) or an already quantized model (e.g. an
mlx-community 4-bit dir: dequantized first, so the new bits/group size apply to every layer, not
stacked on the old rounding).

Quantization is mlx-lm's own (`mlx_lm.utils.quantize_model`: affine, per group of `group_size`
input columns, a scale and bias per group). Like `mlx_lm convert -q` it quantizes every linear
layer and the embedding whose input width `group_size` divides (a model's own `quant_predicate`,
where it has one, is honoured); the others stay in their float dtype and are listed in the
result's `kept_float`.

`out_dir` gets, atomically (`mlxcore.io.atomic_dir`: complete or absent):

  config.json                   the model's config + `quantization` (and `quantization_config`):
                                {"group_size", "bits", "mode": "affine"}
  model.safetensors             packed weights, scales and biases (mlx-lm's `save_model`; larger
                                models are sharded model-0000N-of-0000M.safetensors)
  model.safetensors.index.json  mlx-lm's weight map
  tokenizer files, generation_config.json when the source has one
  manifest.json                 kind "checkpoint" (the digest downstream cache keys use)

The result: {"path", "bits", "group_size", "source" (full | adapters | quantized), "quantized_layers",
"kept_float", "bits_per_weight", "bytes", "seconds"}.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.nn as nn

from mlxcore.data.tokenizer import copy_files
from mlxcore.io import atomic_dir, write_manifest
from mlxcore.models.layout import ADAPTER_CONFIG, is_adapter_dir, is_model_dir

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
GROUP_SIZES = (32, 64, 128)


def _check(bits, group_size) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r}: MLX quantizes to {', '.join(map(str, BITS))} bits (4 or 8 are the usual)")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r}: MLX quantizes in groups of {', '.join(map(str, GROUP_SIZES))} "
                         "input columns")


def _tokenizer_source(model_dir: Path) -> Path:
    if any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return model_dir
    if is_adapter_dir(model_dir):
        base = json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model")
        if base and Path(base).is_dir():
            return Path(base)
    raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "mlx_lm.load needs them beside the weights")


def _is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "bits") and hasattr(m, "scales") for _, m in model.named_modules())


def export_mlx_quantized(model_dir, out_dir, bits: int = 4, group_size: int = 64, *, overwrite: bool = False) -> dict:
    """Quantize `model_dir` to `bits` (groups of `group_size`) into `out_dir`; see the module doc."""
    from mlx_lm.utils import compute_bits_per_weight, quantize_model, save_config, save_model

    from mlxcore.models import adapters, checkpoint

    _check(bits, group_size)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a model dir (no config.json or adapter_config.json)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (overwrite=True replaces it)")
    tokenizer_dir = _tokenizer_source(model_dir)
    started = time.perf_counter()

    model, config = checkpoint.load(model_dir)
    source = "adapters" if is_adapter_dir(model_dir) else "quantized" if _is_quantized(model) else "full"
    model = adapters.fuse_model(model)  # merges adapters, dequantizes every quantized layer
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}

    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints an [INFO] line
        model, qconfig = quantize_model(model, config, group_size, bits)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    kept = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
                  and not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    if not quantized:
        raise ValueError(f"{model_dir}: no layer's input width is a multiple of group_size={group_size}; "
                         f"nothing would be quantized (try {min(GROUP_SIZES)})")
    bpw = float(compute_bits_per_weight(model))

    with atomic_dir(out_dir, replace=overwrite) as tmp:
        save_model(tmp, model)
        save_config(dict(qconfig), tmp / "config.json")
        copy_files(tokenizer_dir, tmp)  # the tokenizer files and generation_config.json
        nbytes = sum(p.stat().st_size for p in tmp.glob("model*.safetensors"))
        write_manifest(tmp, "checkpoint", {"quantized_from": str(model_dir.resolve()), "source": source,
                                           "quantization": qconfig["quantization"]})
    return {"path": str(out_dir), "bits": bits, "group_size": group_size, "source": source,
            "quantized_layers": len(quantized), "kept_float": kept, "bits_per_weight": round(bpw, 3),
            "bytes": nbytes, "seconds": round(time.perf_counter() - started, 2)}
