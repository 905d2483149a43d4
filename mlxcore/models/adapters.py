"""What trains: every weight, or LoRA / DoRA adapters on a frozen (optionally quantized) base.

Adapters are mlx-lm's own layers (`linear_to_lora_layers`, `LoRALinear`, `DoRALinear`), so an
adapter checkpoint is an mlx-lm adapter dir:

  adapters.safetensors   the trainable weights only (lora_a, lora_b, and DoRA's m)
  adapter_config.json    mlx-lm's keys (fine_tune_type, num_layers, lora_parameters) plus
                         ours: base_model (path), base_digest, quantize ({bits, group_size})

`mlx_lm.load(base, adapter_path=dir)` opens it; `mlxcore.models.checkpoint.load(dir)` rebuilds exactly the
trained model (base, then the same quantization, then the adapters); `checkpoint.fuse()` merges the
adapters into a plain checkpoint any tool can read.

QLoRA quantizes the base on load (`nn.quantize`, affine, `bits` and `group_size` from the
config) rather than requiring a pre-quantized copy; quantization is deterministic, so the base
that resumes or evaluates an adapter is bit-identical to the one it was trained on. A base
that is already quantized (an mlx-community 4-bit dir) is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

from mlxcore.config import LoRAConfig, QuantizeConfig, TrainConfig
from mlxcore.models.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir  # noqa: F401  (re-exported)
from mlxcore.models.model import load as load_model



_ADAPTABLE = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def resolve_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """Module paths inside a decoder layer for `keys`; `q_proj` matches `self_attn.q_proj`.

    In a mixture of experts the experts' stacked projections (`mlp.switch_mlp.gate_proj`, mlx-lm's
    SwitchLinear: LoRASwitchLinear adapts every expert) are what `mlp.gate_proj` (and `gate_proj`)
    name; the router is `mlp.gate`."""
    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, _ADAPTABLE)]
    resolved = []
    for key in keys:
        hits = [n for n in names if n == key or n.endswith("." + key) or n == key.replace("mlp.", "mlp.switch_mlp.", 1)]
        if not hits:
            raise ValueError(f"lora.target_modules: {key!r} matches no linear layer; a layer has {', '.join(sorted(names))}")
        resolved += [h for h in hits if h not in resolved]
    return resolved


def quantize_base(model: nn.Module, q: QuantizeConfig) -> None:
    """Quantize every linear layer (and the embedding) whose input width the group size divides."""

    def eligible(_path, module):
        if not hasattr(module, "to_quantized") or isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return False
        return module.weight.shape[-1] % q.group_size == 0

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=eligible)


# ------------------------------------------------------------- quantized matmuls on the CPU
# MLX's CPU backend has no fast quantized matmul: a 4-bit [1024,768]x[768,2048] product took
# 1.6 s here, the same product through `mx.dequantize` + the BLAS matmul 31 ms. On the CPU a
# frozen quantized layer therefore dequantizes its weight on the fly and multiplies with BLAS;
# the backward pass dequantizes again instead of keeping the full-precision weight, so only the
# packed 4/8-bit weights stay resident (QLoRA's memory saving holds). GPUs keep mlx's kernels.


def _dequantized(module) -> mx.array:
    return mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits, module.mode)


def _frozen_product(module, x: mx.array) -> mx.array:
    """x @ dequantize(W).T with a gradient for x only (the quantized weight is frozen)."""

    @mx.custom_function
    def product(x):
        return x @ _dequantized(module).astype(x.dtype).T

    @product.vjp
    def product_vjp(_primals, cotangent, _output):
        return (cotangent @ _dequantized(module).astype(cotangent.dtype),)

    return product(x)


class _CPUQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        y = _frozen_product(self, x)
        return y + self["bias"] if "bias" in self else y


class _CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        if mx.default_device() != mx.cpu:
            return super().as_linear(x)
        return _frozen_product(self, x)


def use_cpu_quantized_matmuls(model: nn.Module) -> None:
    """Give the model's quantized layers the dequantize + BLAS path on the CPU (see above)."""
    swaps = {nn.QuantizedLinear: _CPUQuantizedLinear, nn.QuantizedEmbedding: _CPUQuantizedEmbedding}
    for _, m in model.named_modules():
        if type(m) in swaps and getattr(m, "mode", "affine") == "affine":
            m.__class__ = swaps[type(m)]


# ------------------------------------------- quantized kernels checked on an accelerator
# On an H100 with MLX-CUDA 0.32.4 the 8-bit (group 64) QuantizedEmbedding(96, 64) used as the
# output head gave values unrelated to its own dequantized weights, with NaNs
# (tests/mlxcore/test_gpu_subset.py), and QLoRA-8 on that model did not learn; 4 bits / group 32
# were right. So before training on a GPU every distinct quantized layer shape is checked once:
# the device's product and its transposed product (the backward's) against the CPU's product
# with the CPU-dequantized weight. A shape whose kernel is wrong here keeps its base weight
# dense (dequantized on the CPU, frozen, in the quantized layer's dtype), and the log says which
# layers and by how much. `MLXFLOW_QUANT_CHECK=off` skips the check. The CPU path above needs no check.
# What is checked is what a run uses: decoding's product of one row (MLX's matrix-vector kernel,
# built ahead of time) and training's forward and backward over a batch of 512 rows. MLX-CUDA
# JIT-compiles its matrix kernels by tile (by the output width on sm90; by the rows, clamped to
# 16-64, elsewhere), so any training batch of over 32 tokens runs the kernels checked at 512, and
# the check compiles nothing training would not. A check at 8 rows as well (until 2026-12-07)
# compiled a kernel per direction that no training step uses, about 20 s each on a cold cache.

log = logging.getLogger(__name__)
CHECK_ROWS = (1, 512)  # decoding's one row (forward only) and a training batch (forward and backward)
CHECK_RTOL = 2e-2


def _quantized_error(module, dense_cpu: mx.array) -> float:
    """The device's quantized products' largest error relative to the CPU's (inf where NaN)."""
    rng = mx.random.key(0)
    dtype = module.scales.dtype
    worst = 0.0
    for rows in CHECK_ROWS:
        k1, k2, rng = mx.random.split(rng, 3)
        products = [(mx.random.normal((rows, dense_cpu.shape[1]), key=k1).astype(dtype), True, dense_cpu.T)]
        if rows > 1:  # the backward's product: training only
            products.append((mx.random.normal((rows, dense_cpu.shape[0]), key=k2).astype(dtype), False, dense_cpu))
        for x, transpose, w in products:
            got = mx.quantized_matmul(x, module.weight, module.scales, module.biases, transpose=transpose,
                                      group_size=module.group_size, bits=module.bits, mode=module.mode)
            want = mx.matmul(x.astype(mx.float32), w, stream=mx.cpu)
            err = (mx.abs(got.astype(mx.float32) - want).max() / mx.maximum(mx.abs(want).max(), 1e-30)).item()
            worst = max(worst, err if err == err else float("inf"))  # NaN -> inf
    return worst


def check_quantized_kernels(model: nn.Module, on_cpu: bool = False) -> dict[str, float]:
    """On a non-CPU device (or anywhere with `on_cpu`), replace quantized layers whose kernels are
    wrong (see above) by dense frozen ones; returns {layer path: relative error} of those replaced."""
    if (mx.default_device() == mx.cpu and not on_cpu) or os.environ.get("MLXFLOW_QUANT_CHECK", "on") == "off":
        return {}
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and getattr(m, "mode", "affine") == "affine"]
    verdict: dict[tuple, float] = {}
    bad: dict[str, float] = {}
    replace = []
    for name, m in layers:
        dense = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, m.mode, stream=mx.cpu).astype(mx.float32)
        key = (type(m).__name__, tuple(dense.shape), m.bits, m.group_size, str(m.scales.dtype))
        if key not in verdict:
            verdict[key] = _quantized_error(m, dense)
        if verdict[key] <= CHECK_RTOL:
            continue
        bad[name] = verdict[key]
        dtype = m.scales.dtype
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(*dense.shape)
        else:
            new = nn.Linear(dense.shape[1], dense.shape[0], bias="bias" in m)
            if "bias" in m:
                new.bias = m.bias
        new.weight = dense.astype(dtype)
        new.freeze()
        replace.append((name, new))
    if replace:
        model.update_modules(tree_unflatten(replace))
        shapes = sorted({f"{k[0]} {k[1][0]}x{k[1][1]} {k[2]}-bit group {k[3]} ({v:.2g})"
                         for k, v in verdict.items() if v > CHECK_RTOL})
        log.warning("this device's quantized kernels are wrong for %s: %d layer(s) keep a dense frozen base weight "
                    "instead (%s)", "; ".join(shapes), len(replace), ", ".join(sorted(n for n, _ in replace)))
    return bad


class _AutocastLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear computing its low-rank branch in the input's dtype.

    The adapter weights stay float32, but `x @ lora_a` with a bf16 `x` would promote `x` to a
    float32 copy that backward keeps, for each of the 7 adapted projections of every layer: in
    a bf16 model that made QLoRA use more activation memory than full fine-tuning (measured on
    an H200). Casting the small adapter matrices instead keeps the branch in bf16; gradients
    still reach the float32 weights. With float32 inputs nothing changes.
    """

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)


def _autocast_adapters(model: nn.Module) -> None:
    for _, m in model.named_modules():
        if type(m) is LoRALinear:
            m.__class__ = _AutocastLoRALinear


def lora_parameters(lora: LoRAConfig, model: nn.Module) -> dict:
    """mlx-lm's `lora_parameters` dict (its adapter_config.json names)."""
    return {"rank": lora.rank, "scale": lora.resolved_scale, "dropout": lora.dropout,
            "keys": resolve_keys(model, lora.target_modules)}


def prepare(model: nn.Module, cfg: TrainConfig) -> dict | None:
    """Set up `model` for `cfg.fine_tune_type`; returns the adapter config (None when full).

    full: every parameter trains. lora/dora: the base is frozen (and quantized for QLoRA),
    then the chosen linear layers of the last `num_layers` decoder layers get adapters.
    """
    if cfg.fine_tune_type == "full":
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
            raise ValueError("this model is quantized: full fine-tuning cannot train it; use fine_tune_type lora or dora")
        return None
    model.freeze()
    if cfg.quantize is not None:
        quantize_base(model, cfg.quantize)
    use_cpu_quantized_matmuls(model)
    check_quantized_kernels(model)
    params = lora_parameters(cfg.lora, model)
    _check_dora(model, params["keys"], cfg.fine_tune_type)
    linear_to_lora_layers(model, cfg.lora.num_layers, params, use_dora=cfg.fine_tune_type == "dora")
    _autocast_adapters(model)
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.lora.num_layers,
        "lora_parameters": params,
        "quantize": cfg.quantize.model_dump() if cfg.quantize else None,
    }


def _check_dora(model: nn.Module, keys: list[str], fine_tune_type: str) -> None:
    """mlx-lm has no DoRA for a mixture of experts' SwitchLinear: say so before it fails inside."""
    if fine_tune_type != "dora":
        return
    modules = dict(model.layers[0].named_modules())
    experts = [k for k in keys if isinstance(modules.get(k), (SwitchLinear, QuantizedSwitchLinear))]
    if experts:
        raise ValueError(f"train.fine_tune_type dora: mlx-lm has no DoRA for experts ({', '.join(experts)}); "
                         "use fine_tune_type lora, or leave the experts out of lora.target_modules "
                         "(e.g. [q_proj, k_proj, v_proj, o_proj])")


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(sorted(tree_flatten(model.trainable_parameters())))


def num_trainable(model: nn.Module) -> int:
    return sum(v.size for v in trainable_weights(model).values())


def apply(model: nn.Module, adapter_config: dict) -> nn.Module:
    """Rebuild the adapted model from its adapter config (base already loaded into `model`)."""
    model.freeze()
    if adapter_config.get("quantize"):
        quantize_base(model, QuantizeConfig(**adapter_config["quantize"]))
    use_cpu_quantized_matmuls(model)
    check_quantized_kernels(model)
    linear_to_lora_layers(model, adapter_config["num_layers"], adapter_config["lora_parameters"],
                          use_dora=adapter_config["fine_tune_type"] == "dora")
    _autocast_adapters(model)
    return model


def load(adapter_dir: str | Path) -> tuple[nn.Module, dict]:
    """(base + adapters, the base's config) for an adapter dir, exactly as it was trained."""
    adapter_dir = Path(adapter_dir)
    acfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = acfg.get("base_model")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_CONFIG}: base_model {base!r} is not a directory here")
    from mlxcore.vlm import mlxvlm  # (lazy: mlxcore.vlm imports this module)

    if mlxvlm.is_mlxvlm_dir(base):  # an mlx-vlm base: its keys are full module paths (mlx-vlm's format)
        model, config = mlxvlm.load(base)
        acfg = mlxvlm.mlx_lm_adapter_config(acfg)
    else:
        model, config = load_model(base)
    apply(model, acfg)
    model.load_weights(str(adapter_dir / ADAPTER_WEIGHTS), strict=False)
    missing = set(trainable_weights(model)) - set(mx.load(str(adapter_dir / ADAPTER_WEIGHTS)))
    if missing:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: no weights for {sorted(missing)[:3]}")
    mx.eval(model.parameters())
    return model, config


def fuse_model(model: nn.Module) -> nn.Module:
    """Merge every adapter into its linear layer and dequantize: a plain full-precision model."""
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    model.unfreeze()
    return model
