"""Mixtures of experts: mlx-lm's qwen3_moe model, its router's load-balancing loss and statistics,
and the Hugging Face weight layout of its experts.

The model is mlx-lm's `qwen3_moe` as it is (`ModelConfig.num_experts` > 0 makes `hf_config` write
one): each layer's MLP is a `Qwen3MoeSparseMoeBlock` whose `gate` (a linear layer) gives the router
logits and whose `switch_mlp` (a `SwitchGLU`) holds the experts stacked, `[E, out, in]` per projection.

Router logits, without forking the model: `attach(model)` swaps the class of every MoE block's
`gate` for a subclass that, inside `recording()`, also appends its output to the recording (the
same class-swap `remat.py` uses, so parameter names, saving and loading do not change; outside a
recording it is the plain layer). If the gate is later wrapped (a LoRA on the router), `attach`
moves the recording to the outermost module, so the logits are always the ones the block routes with.

`router_loss(model, objective, coef)` wraps any training objective `(model, *arrays) -> (loss_sum, n[,
aux])`: it runs the objective inside a recording, then adds `coef * n * aux_loss` to the
differentiated loss sum (so after the trainer divides by the step's tokens the penalty is
`coef * aux_loss`) and reports the router's statistics as sums the trainer turns into token means:

  router_aux_loss     E * sum_e f_e * P_e over all MoE layers' tokens together, f_e the share of
                      top-k assignments to expert e (summing to k), P_e the mean routing probability:
                      transformers' `load_balancing_loss_func` (Switch Transformer, Qwen3-MoE); its
                      minimum, k, is a perfectly uniform router
  router_entropy      mean entropy (nats) of a token's routing distribution, at most log(E)
  expert_usage_<e>    share of the routed assignments that went to expert e (they sum to 1)
  expert_usage_max / expert_usage_min / expert_usage_cv   their max, min, coefficient of variation

The tokens counted are those whose loss counts (the objective's `router_weights(*arrays)`, e.g.
the CE loss's mask; an objective without it: every position). Every trainer (pretrain, SFT,
preference, RL) goes through `mlxcore.train.step.Stepper`, which applies this wrapper to a MoE
model; held-out losses (`mean_loss`) stay the plain objective.

Checkpoints keep Hugging Face's layout (`mlp.experts.<e>.<proj>.weight`, what transformers'
Qwen3MoeForCausalLM reads): `to_hf_layout` splits the stacked experts when saving; mlx-lm's
`sanitize` (run by `mlx_lm.load` / `mlxcore.models.model.load`) stacks them again on load, and
`from_hf_layout` (the same, for `checkpoint.restore` on resume and reward models) bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("mlxcore_router_logits", default=None)
_STACKED = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_PER_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ------------------------------------------------------------------ the weight layout on disk


def to_hf_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Stacked experts `<layer>.mlp.switch_mlp.<proj>.weight [E, out, in]` as Hugging Face's
    `<layer>.mlp.experts.<e>.<proj>.weight [out, in]`; anything else (a dense model) is unchanged.
    Quantized experts (with `scales`) stay stacked: mlx-lm's own quantized layout."""
    out = {}
    for key, value in weights.items():
        m = _STACKED.match(key)
        if m is None or value.ndim != 3 or f"{m.group(1)}.switch_mlp.{m.group(2)}.scales" in weights:
            out[key] = value
            continue
        for e in range(value.shape[0]):
            out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = value[e]
    return out


def from_hf_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The inverse of `to_hf_layout`: per-expert weights stacked again, in expert order, bit for bit
    (what mlx-lm's qwen3_moe `sanitize` does on `mlx_lm.load`, for any module tree: a reward model too)."""
    out, experts = {}, {}
    for key, value in weights.items():
        m = _PER_EXPERT.match(key)
        if m is None:
            out[key] = value
        else:
            experts.setdefault(f"{m.group(1)}.switch_mlp.{m.group(3)}.weight", {})[int(m.group(2))] = value
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{key}: experts {sorted(by_index)} are not 0..{len(by_index) - 1}")
        out[key] = mx.stack([by_index[e] for e in range(len(by_index))])
    return out


# ------------------------------------------------------------------ recording the router's logits


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks (mlx-lm's sparse MoE blocks: a `gate` router and `switch_mlp` experts)."""
    return [m for _, m in model.named_modules() if hasattr(m, "switch_mlp") and isinstance(getattr(m, "gate", None), nn.Module)]


def is_moe(model: nn.Module) -> bool:
    return bool(blocks(model))


def _top_k(block: nn.Module) -> int:
    k = getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok", None)
    if not k:
        raise ValueError(f"{type(block).__name__}: cannot tell how many experts a token is routed to")
    return int(k)


_CLASSES: dict[type, type] = {}


def _recording_class(base: type) -> type:
    if base not in _CLASSES:

        def __call__(self, x, *args, **kwargs):
            y = base.__call__(self, x, *args, **kwargs)
            record = _RECORDING.get()
            if record is not None:
                record.append((y, self._router_top_k))
            return y

        _CLASSES[base] = type(f"Recording{base.__name__}", (base,), {"__call__": __call__, "_router_base": base})
    return _CLASSES[base]


def attach(model: nn.Module) -> int:
    """Make every MoE block's router (its outermost `gate` module) record inside `recording()`;
    idempotent and cheap. Returns the number of MoE blocks."""
    found = blocks(model)
    for block in found:
        gate = block.gate
        for _, inner in gate.named_modules():  # a gate wrapped since (LoRA): only the outer one records
            if inner is not gate and hasattr(type(inner), "_router_base"):
                inner.__class__ = type(inner)._router_base
        if not hasattr(type(gate), "_router_base"):
            gate.__class__ = _recording_class(type(gate))
        gate._router_top_k = _top_k(block)
    return len(found)


@contextlib.contextmanager
def recording():
    """Inside: every attached router appends `(logits, top_k)` to the yielded list, per call."""
    record: list = []
    token = _RECORDING.set(record)
    try:
        yield record
    finally:
        _RECORDING.reset(token)


# ------------------------------------------------------------------ the load-balancing loss and statistics


def router_stats(record: list, weights: mx.array | None = None) -> dict[str, mx.array]:
    """The aux loss (differentiable) and the usage statistics of a recording (see the module doc).

    `weights`: per-position weights of the batch (`[B, T]` or flat); a recorded call whose position
    count differs (another forward in the objective) counts every position."""
    probs, picks, ws = [], [], []
    num_experts = record[0][0].shape[-1]
    for logits, k in record:
        p = mx.softmax(logits.reshape(-1, num_experts).astype(mx.float32), axis=-1, precise=True)
        top = mx.argpartition(mx.stop_gradient(p), kth=-k, axis=-1)[:, -k:]
        chosen = (top[..., None] == mx.arange(num_experts)).sum(axis=1).astype(p.dtype)  # [N, E] 0/1
        w = weights.reshape(-1).astype(mx.float32) if weights is not None and weights.size == p.shape[0] else None
        w = (w > 0).astype(mx.float32) if w is not None else mx.ones((p.shape[0],), dtype=mx.float32)
        probs.append(p), picks.append(mx.stop_gradient(chosen)), ws.append(w)
    p, chosen, w = mx.concatenate(probs), mx.concatenate(picks), mx.concatenate(ws)[:, None]
    total = mx.maximum(w.sum(), 1.0)
    tokens_per_expert = (chosen * w).sum(axis=0) / total  # f_e: sums to k
    prob_per_expert = (p * w).sum(axis=0) / total  # P_e
    aux = num_experts * (tokens_per_expert * prob_per_expert).sum()
    q = mx.stop_gradient(p)
    entropy = (-(q * mx.log(mx.maximum(q, 1e-30))).sum(axis=-1, keepdims=True) * w).sum() / total
    usage = mx.stop_gradient(tokens_per_expert / mx.maximum(tokens_per_expert.sum(), 1e-30))
    mean = usage.mean()
    stats = {"router_aux_loss": aux, "router_entropy": entropy, "expert_usage_max": usage.max(),
             "expert_usage_min": usage.min(), "expert_usage_cv": mx.sqrt(((usage - mean) ** 2).mean()) / mean}
    stats.update({f"expert_usage_{e}": usage[e] for e in range(num_experts)})
    return stats


def router_loss(objective, coef: float):
    """`objective` plus the routers' load-balancing loss (weight `coef`) and their statistics, for
    `nn.value_and_grad`: `(model, *arrays) -> (loss_sum + coef * n * aux, n, reported sums)`."""
    weights_of = getattr(objective, "router_weights", None)

    def loss(model: nn.Module, *arrays):
        if any(hasattr(type(layer), "_remat_base") for layer in getattr(model, "layers", [])):
            raise ValueError("train.grad_checkpoint: a mixture of experts trains without gradient checkpointing "
                             "(the router's logits cannot leave a recomputed segment); set it to 0")
        attach(model)
        with recording() as record:
            out = objective(model, *arrays)
        loss_sum, n, aux = (*out, {})[:3]
        if not record:
            return loss_sum, n, aux
        stats = router_stats(record, weights_of(*arrays) if weights_of is not None else None)
        if coef:
            loss_sum = loss_sum + coef * n * stats["router_aux_loss"]
        return loss_sum, n, {**aux, **{k: v * mx.stop_gradient(n) for k, v in stats.items()}}

    return loss
