"""The GRPO family of policy objectives: `grpo`, `dapo`, `dr_grpo`, `gspo`, `rloo`, one loss class.

Every variant shares GRPO's machinery: K samples per prompt form a group, the advantage is
computed from the group's rewards (no value network; PPO with one is `ppo.py`), the policy is
updated with a PPO-style clipped importance ratio, and an optional KL penalty to a frozen
reference uses the k3 estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative, 0
at the reference) weighted by `beta` (0 by default: no reference model is loaded at all; with
beta > 0 its log-probs are computed once before training).

Where things are computed (the same for every variant):
- Advantages are computed once, on the host, at the start of the update, from the buffer's
  rewards (`policy_items`); they do not change while the update trains.
- Importance ratios are taken against the ROLLOUT policy's log-probabilities, stored in the
  buffer as `old_logprobs` (a forward pass of the rollout weights over the sampled tokens), never
  against the policy being updated: on the first step the ratio is exactly 1, later steps
  measure how far the update has moved from the policy that produced the samples, which is
  what the clip bounds. The items keep the stored values; nothing here overwrites them.

The variants (`DEFAULTS` lists each one's hyper-parameters):

grpo (Shao et al. 2024, DeepSeekMath):
  kept: advantage (r - mean) / (std + eps) with the group's population std (`update.scale_rewards:
  false` centres only); the per-token clipped ratio pi / pi_old with a symmetric clip (0.2, 0.2),
  objective min(ratio x A, clip(ratio) x A).
  changed: the loss is averaged over all response tokens of the batch (token level, as DAPO and
  Dr. GRPO do), not per sequence and then per group: a long correct answer is not worth less per
  token than a short one, and padding cannot change the loss. Groups whose rewards are all equal
  carry no signal: advantage 0, counted (`zero_variance_groups`), left out of the batches. Old
  log-probs come from a forward pass of the rollout weights over the sampled tokens (not from
  the sampler), so the first step's ratio is exactly 1.

dapo (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
  kept: GRPO's std-normalised group advantages and the token-level average (DAPO introduced it).
  changed: "clip-higher", an asymmetric range [1 - 0.2, 1 + 0.28]: a larger upper bound lets
  low-probability tokens with positive advantage grow, which fights entropy collapse, while
  the lower bound stays tight. Overlong filtering: samples cut off by the generation budget
  (`finish_reason == "length"`) are masked out of the loss, since their reward judges an answer
  that was never finished and would punish possibly good reasoning (`overlong_filter`, on by
  default for dapo). Their rewards still count in their group's advantages. DAPO's soft overlong
  reward penalty is a reward function and lives with the rewards, not here. Dynamic sampling
  (dropping groups whose rewards are all equal) is what every variant here does already.

dr_grpo (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
  kept: group-relative advantages, the token-level clipped objective.
  changed: no std division (advantage r - mean), since dividing by the group's std up-weights
  questions that are nearly always right or wrong; and no length normalisation: the token sum
  is divided by a constant, sequences x `max_tokens` (the rollout's generation budget), not by
  the number of response tokens, since dividing by the length makes a long wrong answer cost
  less per token than a short one and so biases the policy towards longer wrong answers. For
  `fit`'s (loss_sum, n) protocol n is sequences x max_tokens, so gradient accumulation keeps the
  constant denominator. The constant counts every sequence of the batch, also one whose
  tokens a filter masked out.

gspo (Zheng et al. 2025, "Group Sequence Policy Optimization"):
  kept: GRPO's std-normalised group advantages.
  changed: the importance ratio is one per sequence, s_i = exp(mean over sample i's response
  tokens of (logp - old_logp)) (the length-normalised sequence likelihood ratio), clipped per
  sequence to [1 - 3e-4, 1 + 4e-4] (a sequence-level ratio of a long answer is close to 1, so the
  range is tiny); objective -min(s_i A_i, clip(s_i) A_i) averaged over sequences (n = sequences).
  The reward is a sequence-level quantity; token-level ratios give high-variance, noisy weights
  that accumulate over long answers and destabilise training (worst with mixture-of-experts).
  The KL term (beta > 0) is the per-token k3 averaged per sequence.

rloo (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs"):
  kept: the token-level clipped objective and token average of grpo.
  changed: the advantage is r_i minus the leave-one-out mean of the other K - 1 rewards of its
  group, r_i - mean_{j != i} r_j = K / (K - 1) x (r_i - mean): an unbiased baseline (it does not
  depend on the sample itself) and no std division. Needs K >= 2.

Group size 2: with the population std, a std-normalised advantage of a 2-sample group is at most
1 in magnitude (+-(1 - eps/(std + eps))), and a group whose rewards differ by less than 1e-8 in
std counts as all-equal: advantage 0, flagged, left out. No variant can blow up a near-tie.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


VARIANTS = ("grpo", "dapo", "dr_grpo", "gspo", "rloo")


def token_logprobs(model, inputs: mx.array, targets: mx.array) -> mx.array:
    """log pi(target_t | inputs_<=t) for every position: [B, T] (float32): minus the token
    cross-entropy, through the fused kernel (mlxcore.kernels: ~20x the plain logsumexp on CPU)."""
    from mlxcore.kernels import cross_entropy

    return -cross_entropy(model(inputs), targets)

# Each variant's defaults: advantage ("std": (r - mean) / (std + eps), "centred": r - mean,
# "loo": leave-one-out), ratio level, the loss's denominator, clip range, overlong filter.
# dr_grpo's max_tokens (the rollout's generation budget) has no default: it must be given. A
# symmetric variant given only clip_low keeps clip_high = clip_low (`clip_range`).
DEFAULTS: dict[str, dict] = {
    "grpo": dict(advantage="std", level="token", normalise="tokens", clip_low=0.2, clip_high=0.2,
                 beta=0.0, overlong_filter=False, max_tokens=None),
    "dapo": dict(advantage="std", level="token", normalise="tokens", clip_low=0.2, clip_high=0.28,
                 beta=0.0, overlong_filter=True, max_tokens=None),
    "dr_grpo": dict(advantage="centred", level="token", normalise="budget", clip_low=0.2, clip_high=0.2,
                    beta=0.0, overlong_filter=False, max_tokens=None),
    "gspo": dict(advantage="std", level="sequence", normalise="sequences", clip_low=3e-4, clip_high=4e-4,
                 beta=0.0, overlong_filter=False, max_tokens=None),
    "rloo": dict(advantage="loo", level="token", normalise="tokens", clip_low=0.2, clip_high=0.2,
                 beta=0.0, overlong_filter=False, max_tokens=None),
}


def _check_variant(variant: str) -> dict:
    if variant not in DEFAULTS:
        raise ValueError(f"unknown policy objective {variant!r}; one of {', '.join(VARIANTS)}")
    return DEFAULTS[variant]


def clip_range(variant: str, clip_low: float | None = None, clip_high: float | None = None) -> tuple[float, float]:
    """(clip_low, clip_high) of a variant: the given values, else its defaults; a symmetric
    variant (grpo, dr_grpo, rloo) given only clip_low stays symmetric (clip_high = clip_low)."""
    d = _check_variant(variant)
    lo = d["clip_low"] if clip_low is None else float(clip_low)
    if clip_high is None:
        clip_high = lo if d["clip_low"] == d["clip_high"] else d["clip_high"]
    return lo, float(clip_high)


def advantages(rewards, variant: str = "grpo", eps: float = 1e-4, scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [groups, K] float32, zero-variance mask [groups]) of rewards [groups, K].

    grpo, dapo, gspo: (r - mean) / (std + eps), population std; dr_grpo: r - mean; rloo:
    r_i - mean of the group's other rewards. Groups whose rewards are all equal (std < 1e-8)
    get advantage 0 and are flagged: they carry no learning signal. `scale=False` (the config's
    `update.scale_rewards: false`) makes the std-normalised variants centre only.
    """
    kind = _check_variant(variant)["advantage"]
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [groups, K], got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite")
    k = r.shape[1]
    if kind == "loo" and k < 2:
        raise ValueError(f"rloo needs at least 2 samples per group (a leave-one-out baseline), got K={k}")
    centred = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    zero = std[:, 0] < 1e-8
    if kind == "std" and scale:
        adv = centred / (std + eps)
    elif kind == "loo":
        adv = centred * (k / (k - 1))
    else:
        adv = centred
    adv[zero] = 0.0
    return adv.astype(np.float32), zero


def objective_sums(logp: mx.array, old_logp: mx.array, adv: mx.array, mask: mx.array, variant: str = "grpo", *,
                   clip_low: float | None = None, clip_high: float | None = None, beta: float = 0.0,
                   ref_logp: mx.array | None = None, max_tokens: int | None = None
                   ) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """(loss sum, n, {"kl", "clip_fraction", "ratio"} sums) of a variant's objective (to minimise).

    logp, old_logp, ref_logp, mask: [B, T] (mask 1 on the response tokens that count); adv: [B].
    loss sum / n is the batch's loss; each reported sum / n is the mean the loss is averaged
    over (tokens, or sequences for gspo), so summing over micro-batches and dividing by the
    summed n (what `train.fit` does) gives means.
    """
    d = _check_variant(variant)
    lo, hi = clip_range(variant, clip_low, clip_high)
    mask = mask.astype(mx.float32)
    live = mask > 0
    delta = mx.where(live, logp - old_logp, 0.0)  # padding never reaches exp()
    a = adv.astype(mx.float32)
    kl = mx.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the frozen reference's log-probs)")
        dr = mx.where(live, ref_logp - logp, 0.0)
        kl = mx.exp(dr) - dr - 1.0

    if d["level"] == "sequence":  # gspo
        count = mask.sum(axis=1)
        length = mx.maximum(count, 1.0)
        seq = (count > 0).astype(mx.float32)
        ratio = mx.exp((delta * mask).sum(axis=1) / length)
        per_seq = -mx.minimum(ratio * a, mx.clip(ratio, 1.0 - lo, 1.0 + hi) * a)
        kl_seq = (kl * mask).sum(axis=1) / length
        if beta > 0:
            per_seq = per_seq + beta * kl_seq
        clipped_on = ((a > 0) & (ratio > 1.0 + hi)) | ((a < 0) & (ratio < 1.0 - lo))
        return (per_seq * seq).sum(), seq.sum(), {"kl": (kl_seq * seq).sum(), "clip_fraction": (clipped_on * seq).sum(),
                                                  "ratio": (ratio * seq).sum()}

    a = a[:, None]
    ratio = mx.exp(delta)
    per_token = -mx.minimum(ratio * a, mx.clip(ratio, 1.0 - lo, 1.0 + hi) * a)
    if beta > 0:
        per_token = per_token + beta * kl
    clipped_on = ((a > 0) & (ratio > 1.0 + hi)) | ((a < 0) & (ratio < 1.0 - lo))
    tokens = mask.sum()
    sums = {"kl": (kl * mask).sum(), "clip_fraction": (clipped_on * mask).sum(), "ratio": (ratio * mask).sum()}
    loss_sum = (per_token * mask).sum()
    if d["normalise"] == "budget":  # dr_grpo: a constant denominator, sequences x generation budget
        if not max_tokens or max_tokens <= 0:
            raise ValueError("dr_grpo needs max_tokens (the rollout's generation budget) for its constant denominator")
        n = mx.array(float(logp.shape[0] * max_tokens))
        scale = n / mx.maximum(tokens, 1.0)  # reported sums: token means x n
        return loss_sum, n, {k: v * scale for k, v in sums.items()}
    return loss_sum, tokens, sums


def policy_loss(logp: mx.array, old_logp: mx.array, adv: mx.array, mask: mx.array, variant: str = "grpo",
                **kwargs) -> tuple[mx.array, dict[str, mx.array]]:
    """(loss, {"kl", "clip_fraction", "ratio"} means) of one batch: `objective_sums` divided by n."""
    loss_sum, n, sums = objective_sums(logp, old_logp, adv, mask, variant, **kwargs)
    n = mx.maximum(n, 1.0)
    return loss_sum / n, {k: v / n for k, v in sums.items()}


def truncated(sample: dict, max_tokens: int | None = None) -> bool:
    """Whether a buffer sample hit the generation budget: its `finish_reason` is "length" (or,
    for rows written without one, its response is `max_tokens` long)."""
    reason = sample.get("finish_reason")
    if reason is not None:
        return reason == "length"
    if max_tokens is None:
        raise ValueError("overlong filtering needs each sample's finish_reason, or max_tokens to infer it")
    return len(sample["response_ids"]) >= max_tokens


class PolicyLoss:
    """A variant's objective as a loss `train.fit()` takes: batches are lists of (sample, advantage).

    A sample is a buffer row's meta (`prompt_ids`, `response_ids`, `old_logprobs`, `finish_reason`,
    and `ref_logprobs` when `beta > 0`). `prepare` pads a batch on the host (and masks truncated
    samples out when `overlong_filter`); the call returns `objective_sums` of the model's
    log-probs: (loss sum, n, {"kl", "clip_fraction", "ratio"} sums). Arguments left None take
    the variant's `DEFAULTS`; dr_grpo needs `max_tokens`.
    """

    def __init__(self, variant: str = "grpo", clip_low: float | None = None, clip_high: float | None = None,
                 beta: float = 0.0, pad: int = 0, max_tokens: int | None = None, overlong_filter: bool | None = None):
        d = _check_variant(variant)
        self.variant, self.pad, self.beta = variant, pad, float(beta)
        self.clip_low, self.clip_high = clip_range(variant, clip_low, clip_high)
        self.max_tokens = d["max_tokens"] if max_tokens is None else int(max_tokens)
        self.overlong_filter = d["overlong_filter"] if overlong_filter is None else bool(overlong_filter)
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"clip range [1 - {self.clip_low}, 1 + {self.clip_high}] must hold 1 and stay positive")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        if d["normalise"] == "budget" and (self.max_tokens is None or self.max_tokens <= 0):
            raise ValueError("dr_grpo needs max_tokens (the rollout's generation budget)")

    def tokens(self, batch: list[tuple[dict, float]]) -> int:
        return len(batch) * (max(len(r["prompt_ids"]) + len(r["response_ids"]) for r, _ in batch) - 1)

    def prepare(self, batch: list[tuple[dict, float]]) -> tuple[np.ndarray, ...]:
        seqs = [r["prompt_ids"] + r["response_ids"] for r, _ in batch]
        width = max(len(s) for s in seqs) - 1
        x = np.full((len(batch), width), self.pad, dtype=np.int32)
        y = np.full((len(batch), width), self.pad, dtype=np.int32)
        old, ref, mask = (np.zeros((len(batch), width), dtype=np.float32) for _ in range(3))
        for i, ((r, _), s) in enumerate(zip(batch, seqs)):
            start, n = len(r["prompt_ids"]) - 1, len(r["response_ids"])
            if len(r["old_logprobs"]) != n:
                raise ValueError(f"sample {r.get('id', i)}: {len(r['old_logprobs'])} old_logprobs "
                                 f"for {n} response tokens")
            if self.variant == "dr_grpo" and n > self.max_tokens:
                raise ValueError(f"sample {r.get('id', i)}: {n} response tokens exceed max_tokens={self.max_tokens}")
            x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
            old[i, start: start + n] = r["old_logprobs"]
            if not (self.overlong_filter and truncated(r, self.max_tokens)):
                mask[i, start: start + n] = 1.0
            if self.beta > 0:
                ref[i, start: start + n] = r["ref_logprobs"]
        adv = np.array([a for _, a in batch], dtype=np.float32)
        return x, y, old, adv, mask, ref

    def __call__(self, model, x, y, old, adv, mask, ref):
        return objective_sums(token_logprobs(model, x, y), old, adv, mask, self.variant, clip_low=self.clip_low,
                              clip_high=self.clip_high, beta=self.beta, ref_logp=ref if self.beta > 0 else None,
                              max_tokens=self.max_tokens)


def _mean(values) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def policy_items(rows: list[dict], variant: str = "grpo", eps: float = 1e-4, scale: bool = True
                 ) -> tuple[list[tuple[dict, float]], dict]:
    """(samples with their variant's advantage, buffer metrics) of buffer rows (`loop.read_buffer`'s
    dicts, or a buffer path): full groups only (the largest group size seen), zero-variance
    groups and groups with an unscored sample (a judge that gave no score: reward None) left
    out and counted. The rows are handed on as they are (their stored old_logprobs included)."""
    _check_variant(variant)
    if not rows:
        raise ValueError("no samples in the buffer")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    k = max(len(g) for g in groups.values())
    full = [sorted(g, key=lambda r: r["sample"]) for g in groups.values() if len(g) == k]
    scored = [g for g in full if all(r["reward"] is not None for r in g)]
    adv, zero = (advantages(np.array([[r["reward"] for r in g] for g in scored]), variant, eps, scale) if scored
                 else (np.zeros((0, k), np.float32), np.zeros(0, bool)))
    items = [(r, float(a)) for g, ag, z in zip(scored, adv, zero) if not z for r, a in zip(g, ag)]
    metrics = {"variant": variant, "groups": len(full), "zero_variance_groups": int(zero.sum()),
               "unscored_groups": len(full) - len(scored),
               "samples_used": len(items),
               "truncated_samples": sum(r.get("finish_reason") == "length" for r in rows),
               "mean_reward": _mean([r["reward"] for r in rows]),
               "accuracy": _mean([r.get("correct") for r in rows]),
               "response_tokens": _mean([len(r["response_ids"]) for r in rows]),
               "steps": 0, "loss": None, "kl": None, "clip_fraction": None, "grad_norm": None}
    return items, metrics
