"""PPO with a value model and a learned reward model (InstructGPT's RLHF step), for one iteration's update.

The iteration is the same as GRPO's (rollout -> update -> eval): the rollout stores samples with
their `old_logprobs` and one scalar `reward` each (the learned reward model's score plus any
other rewards, computed elsewhere). This module is the update:

    items, m = prepare_ppo_items(critic, reference, rows, kl_coef=ctl.value)  # host numpy
    ... or all of it, from and to directories:
    m = run_ppo_update(policy_dir, critic_or_reward_dir, reference_dir, rows, out_dir, kl_coef=ctl.value)
    ctl.update(m["kl"], m["samples"])       # AdaptiveKL (Ziegler et al. 2019); ctl.state() -> state file
    # out_dir/model: the new policy (plain model dir); out_dir/critic: the value model (reward-model
    # layout), the next iteration's `critic_or_reward_dir`

Kept from PPO for language models (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019; TRL's PPO
trainer, whose conventions are followed where the papers leave a choice):
- An actor-critic: the policy (the causal LM) and a separate value model of the same shape as the
  reward model (decoder + scalar `score` head, Hugging Face's sequence-classification layout),
  initialised from the learned reward model when there is one (InstructGPT, TRL), else from the
  policy's own weights with a fresh head. The critic's value of "the state before response token
  t" is read at the position that predicts token t (TRL's `values[:, context_length - 1 : -1]`).
- Per-token rewards: r_t = -kl_coef x KL_t at every response token, plus the sample's scalar
  reward added at its last response token. KL_t is the plain log-ratio `old_logp - ref_logp`
  (`kl_estimator="k1"`, InstructGPT's and TRL's default: its sum over the response is the
  sequence KL's unbiased estimate, single tokens may be negative), or Schulman's k3 estimator
  `exp(ref - old) - (ref - old) - 1` (never negative, lower variance, `kl_estimator="k3"`).
- Generalised advantage estimation (Schulman et al. 2016) over the response tokens, with
  gamma = 1 and lambda = 0.95 by default (TRL's), from the critic's values at the update's start
  (the "old" values); returns = advantages + old values. Every sample's episode ends at its last
  response token (no bootstrap past it, also for length-truncated samples: TRL's convention).
  Advantages are whitened over all response tokens of the iteration (mean 0, std 1; optional).
- The clipped surrogate per token, min(ratio x A, clip(ratio, 1 +- clip_range) x A), and the
  clipped value loss 0.5 x max((V - R)^2, (V_old + clip(V - V_old, +-cliprange_value) - R)^2),
  weighted by `vf_coef` (0.1, TRL's), both means over response tokens; `ppo_epochs` passes over
  the iteration's samples in minibatches of `mini_batch_size`.
- The KL coefficient: fixed (`FixedKL`) or adaptive (`AdaptiveKL`, Ziegler et al. 2019 and TRL):
  coef <- coef x (1 + clip(KL / target - 1, -0.2, 0.2) x n / horizon), with KL the iteration's
  mean per-sample KL to the reference and n its number of samples. Its state is a small dict, kept
  in the run's state file between iterations.

Changed, and why:
- The first critic's head starts at zero (`critic_zero_head`, what `iteration.run_update` passes
  for the first iteration), on the reward model's decoder and on the policy's alike: the reward
  model's prefix scores are not values of the final reward, and a fresh random head's values
  (std ~0.2 on the sums' 128-wide model) are noise in every advantage of the first update.
- Reward scale: a learned reward model's logits (here spread ~3.4, margins of 6+) are put on a
  unit scale by the `reward_model` term's `normalize` (its mean and std on the starting policy's
  samples) before they reach PPO, so `kl_coef` and `cliprange_value` mean the same whatever the
  model. TRL's value clip of 0.2 lets a value move at most 0.2 per update towards returns of order
  1; the sums' tests use `cliprange_value: 10` (in effect unclipped) so that the critic can follow
  within their 5 iterations.
- Old log-probs come from the rollout (the rows' `old_logprobs`: a forward pass of the rollout
  weights over the sampled tokens, as in `loop.py`), not from a second forward pass here: the
  ratio is exactly 1 on the first step without recomputing them.
- Reference log-probs and old values are computed once, in batches, before the policy is loaded,
  and the reference is freed before training: only policy + critic (+ AdamW moments) are in memory
  while they train, and no reference model is loaded at all when `kl_coef == 0`.
- The losses go through the project's one training loop (`train.fit`) on an `ActorCritic`
  module: gradient clipping (one global norm over policy and critic), the schedule, checkpoints
  and exact resume come from there. The objective `policy_loss + vf_coef x value_loss` is one
  token-level sum divided by the step's response-token count (not a mean of per-minibatch means),
  so the padding cannot change it. The critic may have its own learning rate (`critic_lr`,
  AdamW on the `value.*` parameters), the policy's by default.
- `approx_kl` (to the rollout policy) is the k3 estimator (ratio - 1) - log ratio (non-negative),
  where TRL reports 0.5 x (log ratio)^2; both are second order in the log-ratio.
- Full fine-tuning of policy and critic (no LoRA here).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxcore.rl.objectives import token_logprobs

OPTIMIZER_STATE = "optimizer.safetensors"
METRICS = ("loss", "policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "grad_norm")


# ---------------------------------------------------------------- the module that trains


class ActorCritic(nn.Module):
    """The policy (a causal LM: `policy(inputs)` -> logits [B, T, V]) and the critic (a
    `RewardModel`-shaped value model: `value(inputs)` -> values [B, T]) trained together.

    Parameters are nested `{"policy": ..., "value": ...}`; `fit()` checkpoints and restores them as
    one module (its `config.json` is `{"policy": ..., "value": ...}`, a training dir only)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def __call__(self, inputs: mx.array) -> tuple[mx.array, mx.array]:
        return self.policy(inputs), self.value(inputs)


def load_critic(critic_or_reward_dir: str | Path | None, policy_dir: str | Path, pad_id: int | None = None,
                seed: int = 0, zero_head: bool = False):
    """(critic, its reward-model config.json): a reward-model-layout dir (a learned reward model, or
    the previous iteration's critic), or with None a fresh head on the policy's own decoder.
    `zero_head`: keep the decoder, start the head at 0 (every value 0): a reward model's scores
    of prefixes are not the values of the final reward (a densely trained one scores a half-written
    answer far below any finished one), and as a critic's first values they would reward stopping."""
    from mlxcore.preference import reward

    if critic_or_reward_dir is None:
        model, config = reward.from_base(policy_dir, pad_id, seed=seed)
    else:
        model, config = reward.load(critic_or_reward_dir)
    if zero_head:  # also the fresh head: its random values (std ~0.2 here) would be noise in every advantage
        model.score.weight = mx.zeros_like(model.score.weight)
    model.train()
    return model, config


def save_critic(out: str | Path, critic: nn.Module, config: dict, tokenizer_dir: str | Path | None = None) -> Path:
    """The critic as a reward-model dir (HF sequence-classification layout, `reward.load` reads it)."""
    from mlxcore.models import checkpoint

    return checkpoint.save_model_dir(out, critic, config, tokenizer_dir=tokenizer_dir)


def save_policy(out: str | Path, policy: nn.Module, config: dict, tokenizer_dir: str | Path | None = None) -> Path:
    """The policy as a plain model dir (`models.generate.load_chat` reads it)."""
    from mlxcore.models import checkpoint

    return checkpoint.save_model_dir(out, policy, config, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------- host side: rewards, GAE, items


def _meta(row: dict) -> dict:
    return row["meta"] if "meta" in row and "prompt_ids" not in row else row


def token_kl(old_logprobs, ref_logprobs, estimator: Literal["k1", "k3"] = "k1") -> np.ndarray:
    """Per-token KL(rollout policy || reference) estimate on the sampled tokens."""
    d = np.asarray(ref_logprobs, dtype=np.float64) - np.asarray(old_logprobs, dtype=np.float64)
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return np.expm1(np.minimum(d, 50.0)) - d
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(score: float, old_logprobs, ref_logprobs, kl_coef: float,
                  kl_estimator: Literal["k1", "k3"] = "k1") -> tuple[np.ndarray, np.ndarray]:
    """(rewards [T], KL terms [T]) of one sample: -kl_coef x KL_t everywhere, + `score` at the last token."""
    kl = token_kl(old_logprobs, ref_logprobs, kl_estimator)
    if kl.size == 0:
        raise ValueError("a sample without response tokens has no token to put its reward on")
    rewards = -kl_coef * kl
    rewards[-1] += score
    return rewards, kl


def gae(rewards, values, gamma: float = 1.0, lam: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [T], returns [T]) of one sample's response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0: the episode ends at the last token),
    A_t = delta_t + gamma lam A_{t+1}, R_t = A_t + V_t."""
    r, v = np.asarray(rewards, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if r.shape != v.shape or r.ndim != 1:
        raise ValueError(f"rewards and values must be [T] of one sample, got {r.shape} and {v.shape}")
    adv = np.zeros_like(r)
    last = 0.0
    for t in range(len(r) - 1, -1, -1):
        next_v = v[t + 1] if t + 1 < len(r) else 0.0
        last = r[t] + gamma * next_v - v[t] + gamma * lam * last
        adv[t] = last
    return adv, adv + v


def whiten(chunks: list[np.ndarray], eps: float = 1e-8) -> list[np.ndarray]:
    """Mean 0, std 1 over all the tokens of all the chunks together (TRL's `masked_whiten`)."""
    flat = np.concatenate(chunks) if chunks else np.zeros(0)
    if flat.size < 2:
        return [c - flat.mean() if flat.size else c for c in chunks]
    mean, std = flat.mean(), flat.std()
    return [(c - mean) / (std + eps) for c in chunks]


def sequence_values(critic, prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int = 0,
                    batch_size: int = 16) -> list[np.ndarray]:
    """The critic's value before each response token (read where that token is predicted), per sample."""
    from mlxcore.rl.loop import per_response

    return per_response(lambda x, _: critic(x), prompt_ids, response_ids, pad, batch_size)


def reference_logprobs(reference, rows: list[dict], pad: int = 0, batch_size: int = 16) -> list[list[float]]:
    """Each sample's response log-probs under the frozen reference, `batch_size` samples per forward."""
    from mlxcore.rl.loop import sequence_logprobs

    rows = [_meta(r) for r in rows]
    return sequence_logprobs(reference, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], pad,
                             batch_size)


def prepare_ppo_items(critic, reference, rows: list[dict], *, kl_coef: float, gamma: float = 1.0,
                      lam: float = 0.95, whiten_advantages: bool = True, kl_estimator: Literal["k1", "k3"] = "k1",
                      pad: int = 0, batch_size: int = 16) -> tuple[list[dict], dict]:
    """(the samples `PPOLoss` trains on, the iteration's metrics) from rollout rows.

    rows: buffer rows or their meta (`prompt_ids`, `response_ids`, `old_logprobs`, `reward`).
    reference: the frozen reference model (its log-probs are computed here, `batch_size` samples
    at a time: free it afterwards), the reference log-probs themselves (one list per row), or None
    when `kl_coef == 0` (no KL term). critic: the value model at the update's start.
    An item is {"prompt_ids", "response_ids", "old_logprobs", "old_values", "advantages",
    "returns"} (per-token lists); rows without response tokens are left out (`skipped`).

    Metrics: `samples`, `skipped`, `mean_score` (the rows' reward), `kl` (per-sample KL to the
    reference summed over the response, mean over samples: what `AdaptiveKL.update` takes),
    `kl_per_token`, `mean_non_score_reward` (the KL penalty, summed per sample), `mean_value`,
    `mean_return`, `mean_advantage` (before whitening), `explained_variance` of the returns by the
    old values, `response_tokens` (mean), `kl_coef`."""
    given = [_meta(r) for r in rows]
    if reference is not None and not isinstance(reference, nn.Module):
        refs = list(reference)
        if len(refs) != len(given):
            raise ValueError(f"{len(given)} rows but {len(refs)} reference log-prob lists")
        refs = [ref for r, ref in zip(given, refs) if len(r["response_ids"]) > 0]
    rows = [r for r in given if len(r["response_ids"]) > 0]
    skipped = len(given) - len(rows)
    if reference is None:
        if kl_coef != 0:
            raise ValueError("kl_coef > 0 needs the reference (a model or its log-probs)")
        refs = [r["old_logprobs"] for r in rows]
    elif isinstance(reference, nn.Module):
        refs = reference_logprobs(reference, rows, pad, batch_size)
    for r, ref in zip(rows, refs):
        if len(ref) != len(r["response_ids"]) or len(r["old_logprobs"]) != len(r["response_ids"]):
            raise ValueError("each row needs one old and one reference log-prob per response token")
    values = sequence_values(critic, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], pad,
                             batch_size) if rows else []
    advs, rets, kls, penalties = [], [], [], []
    for r, ref, v in zip(rows, refs, values):
        rew, kl = token_rewards(float(r["reward"]), r["old_logprobs"], ref, kl_coef, kl_estimator)
        a, ret = gae(rew, v, gamma, lam)
        advs.append(a), rets.append(ret), kls.append(kl), penalties.append(-kl_coef * kl.sum())
    raw_adv = np.concatenate(advs) if advs else np.zeros(0)
    if whiten_advantages:
        advs = whiten(advs)
    items = [{"prompt_ids": list(r["prompt_ids"]), "response_ids": list(r["response_ids"]),
              "old_logprobs": list(map(float, r["old_logprobs"])), "old_values": v.tolist(),
              "advantages": a.tolist(), "returns": ret.tolist()}
             for r, v, a, ret in zip(rows, values, advs, rets)]
    all_v = np.concatenate(values) if values else np.zeros(0)
    all_r = np.concatenate(rets) if rets else np.zeros(0)
    var_r = float(all_r.var()) if all_r.size else 0.0
    n = max(len(rows), 1)
    metrics = {
        "samples": len(rows), "skipped": skipped, "kl_coef": kl_coef,
        "mean_score": float(np.mean([r["reward"] for r in rows])) if rows else None,
        "kl": float(sum(k.sum() for k in kls) / n),
        "kl_per_token": float(np.concatenate(kls).mean()) if kls else 0.0,
        "mean_non_score_reward": float(sum(penalties) / n),
        "mean_value": float(all_v.mean()) if all_v.size else None,
        "mean_return": float(all_r.mean()) if all_r.size else None,
        "mean_advantage": float(raw_adv.mean()) if raw_adv.size else None,
        "explained_variance": (1.0 - float((all_r - all_v).var()) / var_r) if var_r > 0 else None,
        "response_tokens": float(np.mean([len(r["response_ids"]) for r in rows])) if rows else 0.0,
    }
    return items, metrics


# ---------------------------------------------------------------- the objective


def clipped_policy_loss(logp: mx.array, old_logp: mx.array, advantages: mx.array, clip_range: float = 0.2):
    """Per token: (-min(ratio A, clip(ratio) A), clipped-or-not, ratio)."""
    ratio = mx.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return mx.maximum(unclipped, clipped), (clipped > unclipped).astype(mx.float32), ratio


def clipped_value_loss(values: mx.array, old_values: mx.array, returns: mx.array, cliprange_value: float = 0.2):
    """Per token: (0.5 max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2), clipped-or-not)."""
    v_clipped = old_values + mx.clip(values - old_values, -cliprange_value, cliprange_value)
    plain, clipped = mx.square(values - returns), mx.square(v_clipped - returns)
    return 0.5 * mx.maximum(plain, clipped), (clipped > plain).astype(mx.float32)


class PPOLoss:
    """The PPO objective as a loss `train.fit()` takes; batches are lists of `prepare_ppo_items` items.

    `prepare` pads on the host; the call (on an `ActorCritic`) returns (the sum over response
    tokens of policy loss + vf_coef x value loss, their count, sums of `policy_loss`, `value_loss`,
    `clip_fraction`, `value_clip_fraction`, `approx_kl`): `fit` divides by the step's token
    count, so each is a token mean."""

    def __init__(self, clip_range: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, pad: int = 0):
        self.clip_range, self.cliprange_value, self.vf_coef, self.pad = clip_range, cliprange_value, vf_coef, pad

    def tokens(self, batch: list[dict]) -> int:
        return len(batch) * (max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in batch) - 1)

    def prepare(self, batch: list[dict]) -> tuple[np.ndarray, ...]:
        seqs = [r["prompt_ids"] + r["response_ids"] for r in batch]
        width = max(len(s) for s in seqs) - 1
        x = np.full((len(batch), width), self.pad, dtype=np.int32)
        y = np.full((len(batch), width), self.pad, dtype=np.int32)
        old, old_v, adv, ret, mask = (np.zeros((len(batch), width), dtype=np.float32) for _ in range(5))
        for i, (r, s) in enumerate(zip(batch, seqs)):
            x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
            lo, hi = len(r["prompt_ids"]) - 1, len(r["prompt_ids"]) - 1 + len(r["response_ids"])
            old[i, lo:hi], old_v[i, lo:hi] = r["old_logprobs"], r["old_values"]
            adv[i, lo:hi], ret[i, lo:hi], mask[i, lo:hi] = r["advantages"], r["returns"], 1.0
        return x, y, old, old_v, adv, ret, mask

    def __call__(self, model: ActorCritic, x, y, old, old_v, adv, ret, mask):
        logp = token_logprobs(model.policy, x, y)
        values = model.value(x).astype(mx.float32)
        pg, pg_clipped, ratio = clipped_policy_loss(logp, old, adv, self.clip_range)
        vf, vf_clipped = clipped_value_loss(values, old_v, ret, self.cliprange_value)
        log_ratio = logp - old
        approx_kl = mx.exp(log_ratio) - 1.0 - log_ratio
        total = ((pg + self.vf_coef * vf) * mask).sum()
        return total, mask.sum(), {"policy_loss": (pg * mask).sum(), "value_loss": (vf * mask).sum(),
                                   "clip_fraction": (pg_clipped * mask).sum(),
                                   "value_clip_fraction": (vf_clipped * mask).sum(),
                                   "approx_kl": (approx_kl * mask).sum()}


# ---------------------------------------------------------------- the KL coefficient


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state(self) -> dict:
        return {"kind": "fixed", "value": self.value}


class AdaptiveKL:
    """Ziegler et al. 2019's proportional controller (TRL's `AdaptiveKLController`): after an
    iteration whose mean per-sample KL to the reference was `current_kl` over `n_steps` samples,
    coef <- coef x (1 + clip(current_kl / target - 1, -0.2, 0.2) x n_steps / horizon)."""

    def __init__(self, value: float, target: float = 6.0, horizon: int = 10000):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKL needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = float(value), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}


def kl_controller(state: dict) -> FixedKL | AdaptiveKL:
    """The controller a `.state()` dict describes (as read back from the run's state file)."""
    kind = state.get("kind", "fixed")
    if kind == "fixed":
        return FixedKL(state["value"])
    if kind == "adaptive":
        return AdaptiveKL(state["value"], state.get("target", 6.0), state.get("horizon", 10000))
    raise ValueError(f"unknown KL controller kind {kind!r}")


# ---------------------------------------------------------------- one update, from and to directories


def _optimizer(tcfg, critic_lr: float | None):
    """AdamW with the loop's schedule; the critic's parameters (`value.*`) at `critic_lr` if given."""
    import mlx.optimizers as optim

    from mlxcore.train import optimizers

    if critic_lr is None or critic_lr == tcfg.lr:
        return optimizers.build(tcfg)
    critic = optimizers.build(tcfg.model_copy(update={"lr": critic_lr}))
    return optim.MultiOptimizer([critic, optimizers.build(tcfg)], [lambda path, _: path.startswith("value.")])


def _carry_moments(optimizer, model: nn.Module, path: Path | None) -> bool:
    """Load a previous update's AdamW moments (not its step or lr) where they fit this optimizer."""
    from mlx.utils import tree_flatten, tree_unflatten

    if path is None or not path.exists():
        return False
    optimizer.init(model.trainable_parameters())
    flat = dict(tree_flatten(optimizer.state))
    saved = {k: v for k, v in mx.load(str(path)).items() if k.rsplit(".", 1)[-1] not in ("step", "learning_rate")}
    if not set(saved) <= set(flat) or any(flat[k].shape != v.shape for k, v in saved.items()):
        return False  # another layout (e.g. critic_lr switched on): start the moments afresh
    optimizer.state = tree_unflatten(list((flat | saved).items()))
    return True


def run_ppo_update(policy_dir: str | Path, critic_from: str | Path | None, reference_dir: str | Path | None,
                   rows: list[dict], out_dir: str | Path, *, lr: float = 1e-6, critic_lr: float | None = None,
                   ppo_epochs: int = 4, mini_batch_size: int = 8, clip_range: float = 0.2,
                   cliprange_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95,
                   kl_coef: float = 0.05, kl_estimator: Literal["k1", "k3"] = "k1", whiten_advantages: bool = True,
                   grad_clip: float = 1.0, weight_decay: float = 0.0, warmup_steps: int = 0,
                   min_lr_ratio: float = 1.0, grad_checkpoint: int = 0, seed: int = 0,
                   optimizer_from: str | Path | None = None, batch_size: int = 16, critic_zero_head: bool = False,
                   callback=None) -> dict:
    """PPO over `rows` starting from `policy_dir` and the critic `critic_from` (a reward-model
    layout dir: the learned reward model on the first iteration, the previous `out_dir/critic`
    later; None: a fresh head on the policy's decoder), with the KL penalty to `reference_dir`
    (None only with kl_coef 0). Returns the metrics (also in `out_dir/metrics.json`).

    Trains through `train.fit` (`ppo_epochs` x ceil(samples / mini_batch_size) optimizer steps,
    checkpoints and exact resume in `<out_dir>-train/`: a killed update run again resumes), then
    writes, atomically, `out_dir/model` (the policy, a plain model dir), `out_dir/critic` (the
    value model, reward-model layout), `optimizer.safetensors` (AdamW's moments: pass this
    out_dir as the next update's `optimizer_from`), `metrics.json` and an `rl-update` manifest.
    `ppo_epochs=0`: no training, the inputs are written unchanged (the control)."""
    from mlxcore.config import TrainConfig
    from mlxcore.io import atomic_dir, write_json, write_manifest
    from mlxcore.kernels.patch import use_fast_kernels
    from mlxcore.models import checkpoint as ckpt, remat
    from mlxcore.models.model import load
    from mlxcore.rl.loop import SampleBatches
    from mlxcore.train.loop import fit

    out_dir = Path(out_dir)
    settings = dict(lr=lr, critic_lr=critic_lr, ppo_epochs=ppo_epochs, mini_batch_size=mini_batch_size,
                    clip_range=clip_range, cliprange_value=cliprange_value, vf_coef=vf_coef, gamma=gamma, lam=lam,
                    kl_coef=kl_coef, kl_estimator=kl_estimator, whiten_advantages=whiten_advantages,
                    grad_clip=grad_clip, weight_decay=weight_decay, warmup_steps=warmup_steps,
                    min_lr_ratio=min_lr_ratio, seed=seed)
    policy_config = json.loads((Path(policy_dir) / "config.json").read_text())
    pad = policy_config.get("pad_token_id") or 0
    # 1. old values (critic), 2. reference log-probs (then the reference is freed), 3. the policy
    critic, critic_config = load_critic(critic_from, policy_dir, pad, seed, zero_head=critic_zero_head)
    reference = None
    if kl_coef != 0:
        if reference_dir is None:
            raise ValueError("kl_coef > 0 needs reference_dir (the frozen reference policy)")
        reference = load(reference_dir)[0]
        reference.eval()
    items, metrics = prepare_ppo_items(critic, reference, rows, kl_coef=kl_coef, gamma=gamma, lam=lam,
                                       whiten_advantages=whiten_advantages, kl_estimator=kl_estimator, pad=pad,
                                       batch_size=batch_size)
    del reference
    mx.clear_cache()
    policy, policy_config = load(policy_dir)
    model = ActorCritic(policy, critic)
    model.train()
    per_epoch = -(-len(items) // mini_batch_size)
    steps = ppo_epochs * per_epoch
    metrics |= {"steps": 0, "moments_carried": False} | {k: None for k in METRICS}
    carried = Path(optimizer_from) / OPTIMIZER_STATE if optimizer_from is not None else None
    carried = carried if carried is not None and carried.exists() else None
    train_dir = out_dir.with_name(out_dir.name + "-train")
    moments = None
    if steps:
        tcfg = TrainConfig(steps=steps, batch_size=mini_batch_size, lr=lr, warmup_steps=min(warmup_steps, steps),
                           min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, beta2=0.999, grad_clip=grad_clip,
                           eval_every=0, save_every=max(steps // 4, 1), keep_last=1, log_every=1, seed=seed,
                           compile=False, fine_tune_type="full")
        use_fast_kernels(policy)  # fit's Stepper patches only modules it recognises; ActorCritic is ours
        for part in (policy, critic):  # per decoder: a segment must not span the two
            remat.checkpoint_layers(part, grad_checkpoint)
        optimizer = _optimizer(tcfg, critic_lr)
        metrics["moments_carried"] = _carry_moments(optimizer, model, carried)
        result = fit(model, {"policy": policy_config, "value": critic_config}, tcfg,
                     SampleBatches(items, mini_batch_size, seed), None, train_dir, optimizer=optimizer,
                     loss=PPOLoss(clip_range, cliprange_value, vf_coef, pad), callback=callback)
        final = Path(result["checkpoint"])
        ckpt.restore(final, model)  # the trained weights, also when fit() found the update done earlier
        for part in (policy, critic):
            remat.remove(part)
        history = [h for h in json.loads((final / ckpt.TRAINER_STATE).read_text())["history"] if h["event"] == "train"]
        metrics |= {"steps": result["step"]} | {k: float(np.mean([h[k] for h in history])) for k in METRICS}
        for k in ("policy_loss", "value_loss"):  # the step means of each pass over the samples
            metrics[f"{k}_by_epoch"] = [float(np.mean([h[k] for h in history[lo: lo + per_epoch]]))
                                        for lo in range(0, len(history), per_epoch)]
        moments = final / OPTIMIZER_STATE
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    with atomic_dir(out_dir, replace=True) as tmp:
        save_policy(tmp / "model", policy, policy_config, tokenizer_dir=policy_dir)
        save_critic(tmp / "critic", critic, critic_config, tokenizer_dir=policy_dir)
        write_json(tmp / "metrics.json", metrics)
        source = moments or carried  # nothing trained: hand the moments on unchanged
        if source is not None:
            shutil.copy2(source, tmp / OPTIMIZER_STATE)
        write_manifest(tmp, "rl-update", {"policy": str(policy_dir), "critic_from": str(critic_from),
                                           "reference": str(reference_dir), "update": settings}, metrics=metrics)
    shutil.rmtree(train_dir, ignore_errors=True)  # its checkpoints only served a resume
    return metrics
