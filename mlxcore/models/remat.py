"""Gradient checkpointing: keep only every N-th layer's input, recompute the rest in backward.

The decoder layers are cut into segments of `every` consecutive layers. A segment runs as one
`mx.checkpoint`ed function, so the backward pass stores just the segment's input and
recomputes the activations inside it: activation memory drops from all L layers to L/N
segment inputs plus one segment's activations, for about one extra forward pass of compute.
`every=1` is mlx-lm's per-layer checkpointing; `every ~ sqrt(L)` is the classic memory optimum.

The segment's first layer is given a call that runs the whole segment, and the other layers of
the segment pass their input through; this is done by swapping each instance's class for a
subclass, so parameter names, saving and loading are untouched. The layers' trainable
parameters are explicit inputs of the checkpointed function, because a recomputation only
differentiates with respect to its inputs. A packed batch's segment ids (`segments`) are read when
the graph is built; the recomputation happens after the forward's context has closed, so it
re-enters the forward's.
"""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from mlxcore.models import segments


def _segment_call(segment: list[nn.Module], base_calls: list):
    def run(params, x, *args, **kwargs):
        for layer, call, p in zip(segment, base_calls, params):
            layer.update(p)
            x = call(layer, x, *args, **kwargs)
        return x

    checkpointed = mx.checkpoint(run)

    def call(self, x, *args, **kwargs):
        outer = [layer.trainable_parameters() for layer in segment]
        state = segments.current()
        if state is None:
            out = checkpointed(outer, x, *args, **kwargs)
        else:  # a packed batch: the backward's recomputation must see the same rows

            def run_packed(*a, **k):
                with segments.restored(state):
                    return run(*a, **k)

            out = mx.checkpoint(run_packed)(outer, x, *args, **kwargs)
        for layer, p in zip(segment, outer):  # leave the outer (traced) params in place
            layer.update(p)
        return out

    return call


def _passthrough(self, x, *args, **kwargs):
    return x


def _swap_call(layer: nn.Module, call, tag: str) -> None:
    base = type(layer)
    layer.__class__ = type(f"{base.__name__}{tag}", (base,), {"__call__": call, "_remat_base": base})


def checkpoint_layers(model: nn.Module, every: int) -> int:
    """Checkpoint `model.layers` in segments of `every` layers; returns the number of segments."""
    if every <= 0:
        return 0
    layers = list(model.layers)
    if any(hasattr(type(layer), "_remat_base") for layer in layers):
        raise ValueError("gradient checkpointing is already applied to this model")
    segments = 0
    for start in range(0, len(layers), every):
        segment = layers[start : start + every]
        base_calls = [type(layer).__call__ for layer in segment]
        _swap_call(segment[0], _segment_call(segment, base_calls), "Checkpointed")
        for layer in segment[1:]:
            _swap_call(layer, _passthrough, "InSegment")
        segments += 1
    return segments


def remove(model: nn.Module) -> None:
    """Undo `checkpoint_layers` (e.g. before generating with a KV cache)."""
    for layer in model.layers:
        base = getattr(type(layer), "_remat_base", None)
        if base is not None:
            layer.__class__ = base
