"""Route mlx-lm's decoder layers through `mlxcore.kernels` while training on the CPU.

mlx-lm's model files call two module-level functions per layer: `scaled_dot_product_attention`
(from `models.base`) and `swiglu` (from `models.activations`), bound by name into each model
module (`mlx_lm.models.llama`, `...qwen3`, ...). `use_fast_kernels(model)` rebinds those two
names in the module that defines `model`'s class to wrappers that take the fast CPU kernel
when it applies (CPU default device, no KV cache, causal or no mask, no attention sinks) and
call mlx-lm's original otherwise, so generation with a cache, GPUs and Metal are unchanged.
The arithmetic is the same function; tests hold the results to float32 rounding.
"""

from __future__ import annotations

import sys

import mlx.nn as nn

from mlxcore import kernels

_PATCHED: dict[str, tuple] = {}


def _wrap_attention(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        if cache is None and sinks is None and plain_mask and kernels.available():
            return kernels.attention(queries, keys, values, scale, causal=mask is not None)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


def _wrap_swiglu(original):
    def swiglu(gate, x):
        return kernels.swiglu(gate, x) if kernels.available() else original(gate, x)

    return swiglu


def use_fast_kernels(model: nn.Module) -> bool:
    """Patch the model's mlx-lm module (once per process); True if anything was patched."""
    name = type(model).__module__
    module = sys.modules.get(name)
    if module is None or name in _PATCHED or not name.startswith("mlx_lm.models."):
        return name in _PATCHED
    originals = (getattr(module, "scaled_dot_product_attention", None), getattr(module, "swiglu", None))
    if originals[0] is not None:
        module.scaled_dot_product_attention = _wrap_attention(originals[0])
    if originals[1] is not None:
        module.swiglu = _wrap_swiglu(originals[1])
    _PATCHED[name] = originals
    return any(o is not None for o in originals)


def restore_all() -> None:
    """Put mlx-lm's own functions back (tests compare both paths)."""
    for name, (attention, swiglu) in _PATCHED.items():
        module = sys.modules[name]
        if attention is not None:
            module.scaled_dot_product_attention = attention
        if swiglu is not None:
            module.swiglu = swiglu
    _PATCHED.clear()
