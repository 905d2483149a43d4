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


class GRPOLoss:
    """`grpo_loss` as a loss `train.fit()` takes: batches are lists of (sample, advantage).

    A sample is a buffer row's meta (`prompt_ids`, `response_ids`, `old_logprobs`, and
    `ref_logprobs` when `beta > 0`: the reference's log-probs, computed once before training, so
    no reference model is in memory while the policy trains). `prepare` pads them on the host;
    the call returns (sum of per-token objectives over response tokens, their count, {"kl",
    "clip_fraction"} sums): `fit` divides by the step's token count, so the loss is the token-level
    mean of the module doc, whatever the accumulation.
    """

    def __init__(self, clip_eps: float = 0.2, beta: float = 0.0, pad: int = 0):
        self.clip_eps, self.beta, self.pad = clip_eps, beta, pad

    def tokens(self, batch: list[tuple[dict, float]]) -> int:
        return len(batch) * (max(len(r["prompt_ids"]) + len(r["response_ids"]) for r, _ in batch) - 1)

    def prepare(self, batch: list[tuple[dict, float]]) -> tuple[np.ndarray, ...]:
        seqs = [r["prompt_ids"] + r["response_ids"] for r, _ in batch]
        width = max(len(s) for s in seqs) - 1
        x = np.full((len(batch), width), self.pad, dtype=np.int32)
        y = np.full((len(batch), width), self.pad, dtype=np.int32)
        old, ref, mask = (np.zeros((len(batch), width), dtype=np.float32) for _ in range(3))
        for i, ((r, _), s) in enumerate(zip(batch, seqs)):
            x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
            start, n = len(r["prompt_ids"]) - 1, len(r["response_ids"])
            old[i, start: start + n] = r["old_logprobs"]
            mask[i, start: start + n] = 1.0
            if self.beta > 0:
                ref[i, start: start + n] = r["ref_logprobs"]
        adv = np.array([a for _, a in batch], dtype=np.float32)
        return x, y, old, adv, mask, ref

    def __call__(self, model, x, y, old, adv, mask, ref):
        loss, m = grpo_loss(token_logprobs(model, x, y), old, adv, mask, self.clip_eps, self.beta,
                            ref if self.beta > 0 else None)
        n = mask.sum()
        return loss * n, n, {"kl": m["kl"] * n, "clip_fraction": m["clip_fraction"] * n}
