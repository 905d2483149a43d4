"""Route mlx-lm's decoder layers through `mlxcore.kernels` while training on the CPU.

mlx-lm's model files call two module-level functions per layer: `scaled_dot_product_attention`
(from `models.base`) and `swiglu` (from `models.activations`), bound by name into each model
module (`mlx_lm.models.llama`, `...qwen3`, ...). `use_fast_kernels(model)` rebinds those two
names in the module that defines `model`'s class to wrappers that take the fast CPU kernel
when it applies (CPU default device, no KV cache, causal or no mask, no attention sinks; on
CUDA, unless `MLXFLOW_CUDA_LAYERS` leaves `attention` out, the same calls in bfloat16 / float16 with as many keys as
queries take `cuda_attention`, cuDNN with a top-left causal mask) and call mlx-lm's original
otherwise, so generation with a cache and Metal are unchanged;
`swiglu` elsewhere is mlx-lm's fused forward, with `kernels.lean_swiglu`'s backward (saves less; on CUDA `cuda_swiglu`)
unless `MLXFLOW_LEAN=off`. It also swaps the model's mlx.nn `RMSNorm`, `RoPE` and `Linear`
layers for `FastRMSNorm`, `FastRoPE` (the CPU kernels; on CUDA `cuda_rope`) and `FastLinear` (on
CUDA, `kernels.lean_linear`: the weight gradient in the weight's layout; `MLXFLOW_LEAN_LINEAR`),
and gives any module whose `q_proj` / `k_proj` / `v_proj` or `gate_proj` / `up_proj` are
`nn.Linear` layers a `Grouped...` subclass that computes them together (`kernels.projections`,
where `lean_linear` runs: one input gradient, summed in the products' epilogues), and llama / qwen2 /
qwen3 / qwen3_moe decoder layers a `Residual...` class whose residual adds run with the norm after
each (`kernels.add_rms_norm`: on CUDA one kernel each way, no add left between layers).
The arithmetic is the same function; tests hold the results to float32 rounding.
Inside `mlxcore.models.segments.packed(...)` (packed SFT batches) the attention wrapper computes
attention within each packed row instead, on every device; `use_segments(model)` sets that up.

This rebinds mlx-lm internals, so an upstream rename would only make training slower. Hence:
`use_fast_kernels` warns (`KernelPatchWarning`) when a module in `EXPECTED` lacks a name it
should bind, or when an original's parameters are not the ones the wrapper passes on (that
name is then left alone), and tests/kernels/test_patch.py checks, for llama / qwen2 / qwen3 /
qwen3_moe, the names, the signatures, that every layer reaches the fused kernels and that the outputs
match (a qwen3_moe's experts call `swiglu` in `mlx_lm.models.switch_layers`, patched beside it:
`COMPANIONS`). pyproject.toml caps mlx-lm below the next minor version for the same reason.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
import weakref

import mlx.core as mx
import mlx.nn as nn

from mlxcore import kernels
from mlxcore.kernels import cuda_attention
from mlxcore.models import segments

ATTENTION, SWIGLU = "scaled_dot_product_attention", "swiglu"
# The parameters each wrapper takes and passes on: those of mlx_lm.models.base /.activations.
PARAMETERS = {ATTENTION: ("queries", "keys", "values", "cache", "scale", "mask", "sinks"),
              SWIGLU: ("gate", "x")}
# mlx-lm model modules whose layers call both names (the families trained here; checked by tests).
EXPECTED = {f"mlx_lm.models.{arch}": (ATTENTION, SWIGLU) for arch in ("llama", "qwen2", "qwen3", "qwen3_moe")}
# Modules a model module's layers call into: a mixture of experts' SwitchGLU calls `swiglu` in switch_layers.
EXPECTED["mlx_lm.models.switch_layers"] = (SWIGLU,)
COMPANIONS = {"mlx_lm.models.qwen3_moe": ("mlx_lm.models.switch_layers",)}

_PATCHED: dict[str, tuple] = {}


class KernelPatchWarning(UserWarning):
    """mlx-lm's internals are not what `use_fast_kernels` expects: training runs without them."""


def _wrap_attention(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if segments.current() is not None:  # a packed batch: each row attends to itself only
            return segments.attention(queries, keys, values, scale, mask, cache, sinks)
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        causal = mask is not None
        if cache is None and sinks is None and plain_mask and (
                kernels.available() or cuda_attention.applies(queries, keys, values, causal)):
            return kernels.attention(queries, keys, values, scale, causal=causal)  # routes to either
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


def _wrap_swiglu(original):
    def swiglu(gate, x):
        return kernels.swiglu(gate, x)  # the CPU kernel, else mlx-lm's forward (lean backward on the CPU)

    return swiglu


def _parameters(fn) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # not introspectable: trust the name
        return None


def _original(module, attr: str):
    """`module.attr` if the wrapper can stand in for it, else None (with a warning if unexpected)."""
    fn = getattr(module, attr, None)
    if fn is None:
        if attr in EXPECTED.get(module.__name__, ()):
            warnings.warn(f"{module.__name__} no longer binds {attr!r} (mlx-lm {_mlx_lm_version()}): "
                          f"its layers run without the fused CPU kernel, so training is slower. "
                          "mlxcore/kernels/patch.py needs updating for this mlx-lm.",
                          KernelPatchWarning, stacklevel=3)
        return None
    params = _parameters(fn)
    if params is not None and params != PARAMETERS[attr]:
        warnings.warn(f"{module.__name__}.{attr} takes {params}, the fused-kernel wrapper expects "
                      f"{PARAMETERS[attr]} (mlx-lm {_mlx_lm_version()}): left unpatched, so training "
                      "is slower. mlxcore/kernels/patch.py needs updating for this mlx-lm.",
                      KernelPatchWarning, stacklevel=3)
        return None
    return fn


def _mlx_lm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "?"


def _model_module(model: nn.Module) -> str:
    name = type(model).__module__
    if not name.startswith("mlx_lm.models.") and hasattr(model, "model"):  # a wrapper (a reward model's decoder)
        name = type(model.model).__module__
    return name


def use_fast_kernels(model: nn.Module) -> bool:
    """Patch the model's mlx-lm module (once per process); True if anything was patched.

    Warns (`KernelPatchWarning`) when a module of `EXPECTED` lacks a name, or a name's
    signature is not mlx-lm's as the wrappers know it.
    """
    name = _model_module(model)
    patched = _patch_module(name)
    for companion in COMPANIONS.get(name, ()):
        _patch_module(companion)
    _SWAPPED[:] = [(ref, cls) for ref, cls in _SWAPPED if ref() is not None]  # models since freed
    for _, m in model.named_modules():  # any architecture's mlx.nn layers, and its projection groups
        original = type(m)
        fast = _FAST_LAYERS.get(original)
        if fast is None and (names := _group_of(m)) is not None:
            fast = _grouped_class(original, names)
        if fast is None and f"{original.__module__}.{original.__qualname__}" in RESIDUAL_BLOCKS:
            fast = _residual_class(original)
        if fast is not None:
            m.__class__ = fast
            _SWAPPED.append((weakref.ref(m), original))
    _link_next_norms(model)
    return patched


_SWAPPED: list = []  # (weak reference, original class) of each layer given a class here (restore_all undoes it)


class FastRMSNorm(nn.RMSNorm):
    """mlx.nn.RMSNorm through `kernels.rms_norm`: the CPU kernel for float32, MLX's op elsewhere.
    Called on the very array a `Residual...` layer before it returned, it returns the norm that
    layer computed with the sum (`kernels.add_rms_norm`)."""

    def __call__(self, x):
        done = getattr(_NORM_INPUTS, "by_norm", None)
        if done and (hit := done.pop(id(self), None)) is not None and hit[0] is x and hit[2] is self["weight"]:
            return hit[1]  # (the weight checked too: gradient checkpointing rebinds it between layers)
        return kernels.rms_norm(x, self["weight"], self.eps)


class FastRoPE(nn.RoPE):
    """mlx.nn.RoPE through `kernels.rope`: the CPU kernel for mlx-lm's default float32 RoPE (int
    offsets, and the per-token offsets of a packed batch, so packed rows rotate exactly as
    unpacked ones), MLX's op elsewhere."""

    _position_only = True  # positions only, nothing length-dependent (mlxcore.models.segments)

    def __call__(self, x, offset=0):
        return kernels.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                            offset=offset)


def _trained(layer: nn.Module) -> bool:
    """Whether the layer's weight is trained (not frozen: LoRA's base), so its gradient is wanted."""
    return "weight" not in layer._no_grad


class FastLinear(nn.Linear):
    """mlx.nn.Linear without a bias through `kernels.linear`: on CUDA a backward whose weight
    gradient comes out in the weight's layout (`kernels.lean_linear`), MLX's product elsewhere.
    With a bias, mlx.nn's `addmm`."""

    def __call__(self, x):
        done = getattr(_GROUP_OUTPUTS, "by_layer", None)
        if done and (hit := done.get(id(self))) is not None and hit[0] is x:
            return hit[1]  # computed with its group's other projections of the same x
        if "bias" in self:
            return super().__call__(x)
        return kernels.linear(x, self["weight"], trained=_trained(self))


# Layers whose bias-free projections of one input are computed together (`kernels.projections`:
# one input gradient, summed in the products' epilogues): attention's q / k / v, the MLP's gate / up.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_OUTPUTS = threading.local()  # by_layer: id(FastLinear) -> (x, x @ w.T) while its parent runs
_GROUPED: dict = {}  # (mlx-lm class, names) -> its subclass that computes the group together


def _groupable(x, layers) -> bool:
    return (all(type(layer) is FastLinear and "bias" not in layer for layer in layers)
            and all(layer["weight"].shape[-1] == x.shape[-1] for layer in layers))


def _grouped_class(cls: type, names: tuple[str, ...]) -> type:
    """`cls` whose call first computes the projections `names` of its input together and has
    each of those layers return its share when its parent calls it on that same input (any
    other input, as in cross-attention, is computed as before). Whatever `cls` does with the
    projections is its own code, so this holds for every family whose layers are named so."""
    if (cls, names) not in _GROUPED:
        def __call__(self, *args, **kwargs):
            x = args[0] if args else None
            if not (isinstance(x, mx.array) and x.size >= kernels.LEAN_MIN_ELEMENTS):  # decoding: at once
                return cls.__call__(self, *args, **kwargs)
            layers = [self[name] for name in names]
            if not (_groupable(x, layers) and kernels.projections_on(x)):  # the CPU: as before
                return cls.__call__(self, *args, **kwargs)
            outs = kernels.projections(x, [layer["weight"] for layer in layers], trained=all(map(_trained, layers)))
            by_layer = _GROUP_OUTPUTS.__dict__.setdefault("by_layer", {})
            by_layer.update({id(layer): (x, y) for layer, y in zip(layers, outs)})
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                for layer in layers:
                    by_layer.pop(id(layer), None)

        _GROUPED[(cls, names)] = type(f"Grouped{cls.__name__}", (cls,),
                                      {"__call__": __call__, "__module__": cls.__module__, "_mlxflow_group": names})
    return _GROUPED[(cls, names)]


# Pre-norm decoder layers whose call is mlx-lm's `r = self_attn(input_layernorm(x), mask, cache);
# h = x + r; out = h + mlp(post_attention_layernorm(h))` (tests hold each to its mlx-lm original).
RESIDUAL_BLOCKS = ("mlx_lm.models.llama.TransformerBlock", "mlx_lm.models.qwen2.TransformerBlock",
                   "mlx_lm.models.qwen3.TransformerBlock", "mlx_lm.models.qwen3_moe.Qwen3MoeDecoderLayer")
_NORM_INPUTS = threading.local()  # by_norm: id(FastRMSNorm) -> (its input, its output, its weight), set by the layer before it
_RESIDUAL: dict = {}  # mlx-lm class -> its Residual subclass


def _fusable_norm(norm) -> bool:
    return type(norm) is FastRMSNorm and norm["weight"].ndim == 1


def _residual_class(cls: type) -> type:
    """`cls` whose residual adds are computed with the norm after each (`kernels.add_rms_norm`):
    `x + attn` with `post_attention_layernorm`, and `h + mlp` with the next layer's
    `input_layernorm` (or the model's final norm), handed to that norm by `_NORM_INPUTS` (it
    takes it only when called on this very output). Decoding (a cache) and inputs the kernels
    do not take run `cls`'s own call."""
    if cls not in _RESIDUAL:
        def __call__(self, x, mask=None, cache=None):
            post = self.post_attention_layernorm
            if not (cache is None and isinstance(x, mx.array) and _fusable_norm(post)
                    and kernels.add_rms_norm_on(x, post["weight"])):
                return cls.__call__(self, x, mask, cache)
            r = self.self_attn(self.input_layernorm(x), mask, cache)
            h, y = kernels.add_rms_norm(x, r, post["weight"], post.eps)
            r = self.mlp(y)
            link = self.__dict__.get("_mlxflow_next_norm")
            nxt = link() if link is not None else None
            if nxt is None or not _fusable_norm(nxt):
                return h + r
            out, normed = kernels.add_rms_norm(h, r, nxt["weight"], nxt.eps)
            _NORM_INPUTS.__dict__.setdefault("by_norm", {})[id(nxt)] = (out, normed, nxt["weight"])
            return out

        _RESIDUAL[cls] = type(f"Residual{cls.__name__}", (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _RESIDUAL[cls]


def _link_next_norms(model: nn.Module) -> None:
    """Tell each Residual layer of a `layers` list the norm applied to its output: the next
    layer's `input_layernorm`, or the last layer's sibling `norm` (mlx-lm's models)."""
    for _, m in model.named_modules():
        layers, final = m.get("layers") if isinstance(m, dict) else None, m.get("norm") if isinstance(m, dict) else None
        if not isinstance(layers, list):
            continue
        for i, layer in enumerate(layers):
            if isinstance(layer, tuple(_RESIDUAL.values())):
                nxt = layers[i + 1].get("input_layernorm") if i + 1 < len(layers) else final
                object.__setattr__(layer, "_mlxflow_next_norm", weakref.ref(nxt) if isinstance(nxt, nn.Module) else None)


def _group_of(module) -> tuple[str, ...] | None:
    """The first of `GROUPS` whose layers are all `nn.Linear` children of `module`, if it has no group yet."""
    if getattr(type(module), "_mlxflow_group", None) is not None:
        return None
    for names in GROUPS:
        if all(isinstance(module.get(name), nn.Linear) for name in names):
            return names
    return None


# The mlx.nn layers use_fast_kernels swaps (exact classes; subclasses such as mlx-lm's scaled
# ropes keep theirs). MLXFLOW_FAST_NORM=off keeps MLX's ops for the norms and ropes.
_FAST_LAYERS = ({nn.RMSNorm: FastRMSNorm, nn.RoPE: FastRoPE}
                if os.environ.get("MLXFLOW_FAST_NORM", "on").strip().lower() != "off" else {})
_FAST_LAYERS[nn.Linear] = FastLinear


def _patch_module(name: str) -> bool:
    module = sys.modules.get(name)
    if module is None or name in _PATCHED or not name.startswith("mlx_lm.models."):
        return name in _PATCHED
    originals = (_original(module, ATTENTION), _original(module, SWIGLU))
    if originals[0] is not None:
        setattr(module, ATTENTION, _wrap_attention(originals[0]))
    if originals[1] is not None:
        setattr(module, SWIGLU, _wrap_swiglu(originals[1]))
    _PATCHED[name] = originals
    return any(o is not None for o in originals)


def use_segments(model: nn.Module) -> None:
    """Make `model` compute packed batches row by row (`mlxcore.models.segments`): the attention
    wrapper bound in its mlx-lm module and per-token RoPE positions. Cheap when already done.
    Raises ValueError for a model whose attention the wrapper cannot reach (packing would
    silently mix rows)."""
    use_fast_kernels(model)
    name = _model_module(model)
    if name not in EXPECTED or _PATCHED.get(name, (None,))[0] is None:
        raise ValueError(f"packing needs mlx-lm's attention hook, bound for {', '.join(sorted(k for k, v in EXPECTED.items() if ATTENTION in v))}; "
                         f"{name} is not one of them (or its attention could not be patched)")
    segments.enable(model)


def restore_all() -> None:
    """Put mlx-lm's own functions back (tests compare both paths)."""
    for name, (attention, swiglu) in _PATCHED.items():
        module = sys.modules[name]
        if attention is not None:
            setattr(module, ATTENTION, attention)
        if swiglu is not None:
            setattr(module, SWIGLU, swiglu)
    _PATCHED.clear()
    for ref, original in _SWAPPED:
        if (m := ref()) is not None:
            m.__class__ = original
    _SWAPPED.clear()
