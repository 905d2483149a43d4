"""Packed sequences in mlx-lm's decoders: each row attends only to itself, positions restart per row.

A packed batch carries segment ids `[B, T]` (int32) beside its tokens: a run of equal ids is one
row (the padding after the last row is a run of its own). Inside `packed(segments)`, a llama /
qwen2 / qwen3 model of mlx-lm computes every row exactly as it would alone:

- attention is causal within the row's run only (block-diagonal causal). mlx-lm's layers call
  `scaled_dot_product_attention` by name; `mlxcore.kernels.patch` rebinds it to a wrapper that,
  in this context, calls `attention` below: the fused CPU kernel with the segment ids on Linux
  CPU, `mx.fast.scaled_dot_product_attention` with the equivalent boolean mask elsewhere (Metal,
  CUDA, kernels off).
- RoPE positions restart at 0 in every run. mlx-lm rotates with `self.rope(x)` (an offset-based
  rope: positions `offset + t`), so `enable(model)` gives each attention's rope instance a
  subclass whose call, in this context, lays the `[B, H, T, D]` input out as `B*T` one-token
  sequences and passes the per-token positions as the vector of per-sequence offsets
  (`mx.fast.rope`'s; on the Linux CPU `kernels.rope` takes them too, through `FastRoPE`). The
  rope's own call and frequencies do the work, so a packed token is rotated exactly as at that
  position of its unpacked row (tests compare bit for bit).

Both hooks read a context variable while the graph is built (also under `mx.compile`);
`remat` re-enters the forward's context when a checkpointed segment is recomputed. Instance
class swaps keep parameter names, checkpoints and LoRA untouched; outside the context the model
is unchanged (generation with a KV cache included).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from mlxcore import kernels

# Ropes whose call is `mx.fast.rope(..., offset=offset)` with nothing that depends on the
# sequence length (mlx-lm's DynamicNTKScalingRoPE does: refused).
POSITION_ONLY_ROPES = ("RoPE", "Llama3RoPE", "YarnRoPE", "SuScaledRoPE", "ProportionalRoPE")


@dataclass(frozen=True)
class Packing:
    segments: mx.array  # [B, T] int32 segment ids
    positions: mx.array  # [B, T] int32 position of each token within its row


_current: contextvars.ContextVar[Packing | None] = contextvars.ContextVar("mlxflow_packing", default=None)


def positions(segments: mx.array) -> mx.array:
    """Each token's index within its run of equal segment ids: 0, 1, ... restarting per run."""
    return mx.arange(segments.shape[-1], dtype=mx.int32) - kernels.segment_starts(segments)


def current() -> Packing | None:
    """The packing of the forward pass being built, or None (a plain batch)."""
    return _current.get()


@contextlib.contextmanager
def packed(segments: mx.array | None):
    """Model calls inside see rows separated by `segments` [B, T] (None: a plain batch)."""
    state = None
    if segments is not None:
        if segments.ndim != 2:
            raise ValueError(f"segment ids must be [batch, seq_len], got shape {segments.shape}")
        segments = segments.astype(mx.int32)
        state = Packing(segments, positions(segments))
    token = _current.set(state)
    try:
        yield state
    finally:
        _current.reset(token)


@contextlib.contextmanager
def restored(state: Packing | None):
    """Re-enter a captured packing (a recomputation after the forward's context has closed)."""
    token = _current.set(state)
    try:
        yield state
    finally:
        _current.reset(token)


def _rope_call(self, x, offset=0):
    base = type(self)._packed_base
    state = current()
    if state is None:
        return base.__call__(self, x, offset)
    if not isinstance(offset, int) or offset != 0:
        raise ValueError("packed sequences are computed without a KV cache (rope offset must be 0)")
    B, H, T, D = x.shape
    if tuple(state.positions.shape) != (B, T):
        raise ValueError(f"rope input {x.shape} does not match the packed batch's segment ids {state.positions.shape}")
    flat = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)  # one sequence per token
    out = base.__call__(self, flat, state.positions.reshape(-1))
    return out.reshape(B, T, H, D).transpose(0, 2, 1, 3)


def enable(model: nn.Module) -> int:
    """Give every attention rope of `model` the per-token-position call; returns how many ropes.

    Idempotent. Raises ValueError when the model has no rope or one whose result depends on the
    sequence length (its per-token form would differ)."""
    found = 0
    for _, module in model.named_modules():
        rope = module.get("rope") if isinstance(module, dict) else None
        if not isinstance(rope, nn.Module):
            continue
        base = getattr(type(rope), "_packed_base", None)
        if base is None:
            base = type(rope)
            if base.__name__ not in POSITION_ONLY_ROPES and not getattr(base, "_position_only", False):
                raise ValueError(f"packing: {base.__name__} positions depend on the sequence length; "
                                 f"supported ropes: {', '.join(POSITION_ONLY_ROPES)}")
            rope.__class__ = type(f"{base.__name__}Packed", (base,), {"__call__": _rope_call, "_packed_base": base})
        found += 1
    if not found:
        raise ValueError(f"packing: {type(model).__name__} has no attention rope to restart per row "
                         "(supported: mlx-lm llama, qwen2, qwen3)")
    return found


def attention(queries, keys, values, scale, mask, cache=None, sinks=None) -> mx.array:
    """Block-diagonal causal attention for the current packing (mlx-lm's sdpa arguments)."""
    state = current()
    plain = mask is None or (isinstance(mask, str) and mask == "causal")
    if state is None or cache is not None or sinks is not None or not plain:
        raise ValueError("packed sequences need plain causal attention: no KV cache, attention sinks or "
                         "sliding-window mask")
    B, _, T, _ = queries.shape
    if tuple(state.segments.shape) != (B, T) or keys.shape[2] != T:
        raise ValueError(f"attention over {queries.shape} / {keys.shape} does not match the packed "
                         f"batch's segment ids {state.segments.shape}")
    return kernels.attention(queries, keys, values, scale, causal=True, segments=state.segments)
