"""The GRPO objective (Shao et al. 2024, DeepSeekMath), as used for GSM8K here.

Kept from GRPO:
- K samples per prompt form a group; a sample's advantage is its reward minus the group's mean,
  divided by the group's standard deviation (`scale_rewards=False` keeps only the centring,
  which Dr. GRPO argues removes a bias towards easy and hard questions). No value network.
- The PPO-style clipped importance ratio per token, ratio = pi(token) / pi_old(token), with the
  clip range [1 - clip_eps, 1 + clip_eps]; the objective is min(ratio x A, clip(ratio) x A).
- An optional KL penalty to a frozen reference policy, with the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative, 0 when policy = reference);
  `beta = 0` (the default) means no reference model is loaded at all.

Changed, and why:
- The loss is averaged over all response tokens of the batch (token level, as DAPO and Dr.
  GRPO do), not per sequence and then per group: a long correct answer is not worth less per
  token than a short one, and the padding cannot change the loss.
- Groups whose rewards are all equal (all right or all wrong) carry no signal: their advantages
  are 0, they are counted (`zero_variance_groups`) and left out of the update's batches.
- Old log-probabilities come from a forward pass of the rollout weights over the sampled tokens
  (not from the sampler), so the ratio is exactly 1 on the first update step and measures only
  what the update changed.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def group_advantages(rewards: np.ndarray, scale_rewards: bool = True, eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [groups, K], zero-variance mask [groups]) from rewards [groups, K]."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [groups, K], got shape {r.shape}")
    centred = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    zero = std[:, 0] < 1e-8
    adv = centred / (std + eps) if scale_rewards else centred
    adv[zero] = 0.0
    return adv.astype(np.float32), zero


def token_logprobs(model, inputs: mx.array, targets: mx.array) -> mx.array:
    """log pi(target_t | inputs_<=t) for every position: [B, T]."""
    logits = model(inputs).astype(mx.float32)
    return -_cross_entropy(logits, targets)


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def grpo_loss(logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, clip_eps: float = 0.2,
              beta: float = 0.0, ref_logp: mx.array | None = None) -> tuple[mx.array, dict[str, mx.array]]:
    """Token-level clipped GRPO loss (to minimise) and its diagnostics.

    logp, old_logp, ref_logp, mask: [B, T] (mask 1 on response tokens); advantages: [B].
    Returns (loss, {"kl", "clip_fraction", "ratio"}), each a mean over the masked tokens.
    """
    mask = mask.astype(mx.float32)
    n = mx.maximum(mask.sum(), 1.0)
    adv = advantages[:, None]
    ratio = mx.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = mx.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -mx.minimum(unclipped, clipped)
    clipped_on = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    kl = mx.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the frozen reference's log-probs)")
        d = ref_logp - logp
        kl = mx.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / n
    return loss, {"kl": (kl * mask).sum() / n, "clip_fraction": (clipped_on * mask).sum() / n,
                  "ratio": (ratio * mask).sum() / n}
