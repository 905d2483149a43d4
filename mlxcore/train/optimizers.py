"""Optimizers and the learning-rate schedule a `TrainConfig` asks for (all from mlx.optimizers).

- adamw: decoupled weight decay. With `optimizer_state_dtype: float32` (default) the moments
  and the update arithmetic are float32 whatever the parameter dtype, so bf16 training does not
  lose small updates to rounding; `param` keeps mlx's behaviour (moments in the parameter dtype,
  half the state memory for bf16).
- adafactor: factored second moments (O(rows + cols) state per matrix), no first moment, the
  configured schedule instead of Adafactor's relative step size.
- lion: sign of an interpolated momentum; typically wants a 3-10x smaller lr than AdamW.
- muon: Muon (momentum + Newton-Schulz orthogonalisation) on the decoder's hidden weight
  matrices at `muon_lr`, AdamW on everything else (embeddings, output head, norms), as the
  Muon authors recommend: orthogonalising an embedding table has no meaning.

Every schedule is linear warmup to `lr` then cosine decay to `min_lr_ratio * lr`.
"""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim

from mlxcore.config import TrainConfig


def lr_schedule(cfg: TrainConfig, peak: float | None = None):
    peak = cfg.lr if peak is None else peak
    floor = peak * cfg.min_lr_ratio
    decay = optim.cosine_decay(peak, max(1, cfg.steps - cfg.warmup_steps), floor)
    if cfg.warmup_steps == 0:
        return decay
    # step s < warmup trains at lr * (s + 1) / warmup: the last warmup step reaches lr
    warmup = optim.linear_schedule(peak / cfg.warmup_steps, peak, max(cfg.warmup_steps - 1, 1))
    return optim.join_schedules([warmup, decay], [cfg.warmup_steps])


class AdamWFloat32State(optim.AdamW):
    """AdamW whose moments and update are computed in float32, cast back to the parameter dtype."""

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["m"] = mx.zeros(parameter.shape, dtype=mx.float32)
        state["v"] = mx.zeros(parameter.shape, dtype=mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.dtype == mx.float32:
            return super().apply_single(gradient, parameter, state)
        updated = super().apply_single(gradient.astype(mx.float32), parameter.astype(mx.float32), state)
        return updated.astype(parameter.dtype)


def _adamw(cfg: TrainConfig, schedule) -> optim.Optimizer:
    cls = AdamWFloat32State if cfg.optimizer_state_dtype == "float32" else optim.AdamW
    return cls(schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


def is_muon_param(path: str, weight: mx.array) -> bool:
    """Hidden matrices of the decoder layers; not embeddings, the head, norms or adapters' vectors."""
    return weight.ndim >= 2 and ".layers." in f".{path}" and "embed" not in path


def build(cfg: TrainConfig) -> optim.Optimizer:
    schedule = lr_schedule(cfg)
    if cfg.optimizer == "adamw":
        return _adamw(cfg, schedule)
    if cfg.optimizer == "adafactor":
        return optim.Adafactor(schedule, relative_step=False, scale_parameter=False,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        return optim.Lion(schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        muon = optim.Muon(lr_schedule(cfg, cfg.muon_lr), momentum=0.95, weight_decay=cfg.weight_decay)
        return optim.MultiOptimizer([muon, _adamw(cfg, schedule)], [is_muon_param])
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def current_lr(optimizer: optim.Optimizer) -> float:
    """The learning rate of the step just taken (the AdamW part's for multi-optimizers)."""
    if isinstance(optimizer, optim.MultiOptimizer):
        optimizer = optimizer.optimizers[-1]
    return optimizer.learning_rate.item()
