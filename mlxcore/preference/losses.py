"""Preference objectives as losses of the one training loop (`train.loop.fit(..., loss=)`).

A batch (`batches.PreferenceBatches`) holds each example's responses as rows of one padded
array: pairs as (chosen, rejected) rows 2i, 2i+1, KTO / scored rows one per example. Every loss
returns (sum over the batch's examples, the number of examples, sums to report), so `fit`
averages per example (a pair counts once, however long its replies) over the step and its
accumulated micro-batches, and reports the means of the extra sums in its log lines.

Sequence log-probabilities are sums of the response tokens' log pi (the fused cross-entropy
kernel on the Linux CPU); `reference` holds the same sums for the frozen reference model,
computed once by their own stage (`reference.py`), so no reference model is in memory here.

  dpo    -(1-e) log s(b h) - e log s(-b h),  h = (pi_c - ref_c) - (pi_r - ref_r)
         (Rafailov et al. 2023; e = label_smoothing: the conservative / robust variant)
  ipo    (h' - 1/(2b))^2 with h' over per-token mean log-probs (Azar et al. 2023, as TRL does)
  hinge  max(0, 1 - b h)   (SLiC)
  simpo  -log s(b (mean pi_c - mean pi_r) - gamma): length-normalised, no reference (Meng et al. 2024)
  orpo   NLL(chosen, per token) - b log s(log odds_c - log odds_r), odds = p / (1 - p) of the
         per-token mean probability; no reference (Hong et al. 2024)
  kto    unpaired rows with a label: w_d (1 - s(b (r - z))) for desirable, w_u (1 - s(b (z - r)))
         for undesirable, r = pi - ref; z = the batch's mean r clamped at 0, without gradient
         (the batch estimate of KL(pi || ref) that Ethayarajh et al. 2024 use; their mismatched-pair
         estimate needs an extra forward pass per step)
  sft_weight a   adds a x the chosen (KTO: desirable) reply's per-token NLL to any of them but orpo
         (which has it built in): RPO (Pang et al. 2024, TRL's rpo_alpha). DPO alone lowers the
         log-prob of both replies when they differ in a token or two (near misses), which can
         hurt generation; the NLL term keeps the chosen reply likely.
Reported: `reward_chosen`, `reward_rejected` (b times the log-ratio, or b times the mean log-prob
without a reference), `margin`, `accuracy` (chosen above rejected; KTO: the reward's sign
matches the label; ties count one half) and `kl`: the k3 estimate exp(d) - d - 1 of the mean
per-token d = log ref - log pi of each response (pairs: the mean of the two), on the data's
responses, not on samples of pi: a per-token drift measure, 0 at the start.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxcore.train.losses import token_cross_entropy

OBJECTIVES = ("dpo", "ipo", "hinge", "simpo", "orpo", "kto")
USES_REFERENCE = {"dpo", "ipo", "hinge", "kto"}


def sequence_logprobs(model: nn.Module, x: mx.array, y: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(sum of log pi over each row's masked targets [R], their count [R])."""
    logp = -token_cross_entropy(model(x), y)
    return (logp * mask).sum(axis=-1), mask.sum(axis=-1)


def _k3(ref: mx.array, logp: mx.array, n: mx.array) -> mx.array:
    """Per-token KL estimate of each row: k3 = exp(d) - d - 1 of the mean per-token d = log ref - log pi."""
    d = mx.stop_gradient((ref - logp) / mx.maximum(n, 1.0))
    return mx.exp(mx.minimum(d, 30.0)) - d - 1.0


def _half_ties(a: mx.array, b: mx.array) -> mx.array:
    return (a > b).astype(mx.float32) + 0.5 * (a == b).astype(mx.float32)


class PreferenceLoss:
    """One of OBJECTIVES as a `fit` loss. `prepare` takes a batch dict from PreferenceBatches."""

    def __init__(self, objective: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, sft_weight: float = 0.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        self.objective, self.beta, self.eps, self.gamma = objective, beta, label_smoothing, gamma
        self.w_d, self.w_u, self.sft_weight = desirable_weight, undesirable_weight, sft_weight

    @property
    def uses_reference(self) -> bool:
        return self.objective in USES_REFERENCE

    def tokens(self, batch: dict) -> int:
        return int(batch["inputs"].size)

    def prepare(self, batch: dict) -> tuple[np.ndarray, ...]:
        ref = batch.get("ref")
        if ref is None:
            if self.uses_reference:
                raise ValueError(f"{self.objective} needs the reference model's log-probs (a reference dir)")
            ref = np.zeros(batch["inputs"].shape[0], dtype=np.float32)
        return batch["inputs"], batch["targets"], batch["mask"], ref, batch["target"]

    def __call__(self, model, x, y, mask, ref, target):
        logp, n = sequence_logprobs(model, x, y, mask)
        if self.objective == "kto":
            return self._kto(logp, ref, target, n)
        b = self.beta
        pc, pr, rc, rr = logp[0::2], logp[1::2], ref[0::2], ref[1::2]
        nc, nr = mx.maximum(n[0::2], 1.0), mx.maximum(n[1::2], 1.0)
        if self.objective in ("dpo", "hinge", "ipo"):
            h = (pc - rc) - (pr - rr)
            reward_c, reward_r = b * (pc - rc), b * (pr - rr)
            if self.objective == "dpo":
                losses = -(1 - self.eps) * nn.log_sigmoid(b * h) - self.eps * nn.log_sigmoid(-b * h)
            elif self.objective == "hinge":
                losses = nn.relu(1.0 - b * h)
            else:
                h_mean = (pc - rc) / nc - (pr - rr) / nr
                losses = (h_mean - 1.0 / (2.0 * b)) ** 2
        else:
            ac, ar = pc / nc, pr / nr
            reward_c, reward_r = b * ac, b * ar
            if self.objective == "simpo":
                z = b * (ac - ar) - self.gamma
                losses = -(1 - self.eps) * nn.log_sigmoid(z) - self.eps * nn.log_sigmoid(-z)
            else:  # orpo: log(p/(1-p)) with p = exp(mean log-prob); log1p(-exp(a)) kept finite
                odds = lambda a: a - mx.log1p(-mx.exp(mx.minimum(a, -1e-6)))  # noqa: E731
                losses = -ac - b * nn.log_sigmoid(odds(ac) - odds(ar))
        if self.sft_weight and self.objective != "orpo":  # RPO: keep the chosen replies likely
            losses = losses - self.sft_weight * pc / nc
        kl = _k3(ref, logp, n) if self.uses_reference else mx.zeros_like(logp)
        aux = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
               "margin": (reward_c - reward_r).sum(), "accuracy": _half_ties(reward_c, reward_r).sum(),
               "kl": kl.reshape(-1, 2).mean(axis=-1).sum()}
        return losses.sum(), mx.array(float(pc.shape[0])), {k: mx.stop_gradient(v) for k, v in aux.items()}

    def _kto(self, logp, ref, label, n):
        b, r = self.beta, logp - ref
        z = mx.stop_gradient(mx.maximum(r.mean(), 0.0))
        desirable = label > 0.5
        losses = mx.where(desirable, self.w_d * (1 - mx.sigmoid(b * (r - z))), self.w_u * (1 - mx.sigmoid(b * (z - r))))
        if self.sft_weight:  # the desirable completions' per-token NLL
            losses = losses - mx.where(desirable, self.sft_weight * logp / mx.maximum(n, 1.0), 0.0)
        reward = b * r
        signed = mx.where(desirable, reward, -reward)
        zero = mx.zeros_like(reward)
        aux = {"reward_chosen": mx.where(desirable, reward, zero).sum(), "reward_rejected": mx.where(desirable, zero, reward).sum(),
               "margin": signed.sum(), "accuracy": _half_ties(signed, zero).sum(),
               "kl": _k3(ref, logp, n).sum()}
        return losses.sum(), mx.array(float(r.shape[0])), {k: mx.stop_gradient(v) for k, v in aux.items()}


class RewardLoss:
    """A reward model's loss: Bradley-Terry on pairs (-log s(s_c - s_r - margin)) or squared error
    on scored rows. The model is a `reward.RewardModel` (scores at each row's last token).

    `dense` > 0 (pairs) adds, per pair, `dense` x the mean Bradley-Terry loss over the positions from
    where chosen and rejected first differ to the shorter one's last token: a mistake is seen where
    it happens, and the head must keep it to the end. On the synthetic sort pairs (one number
    miscounted) a 4-layer model's held-out accuracy went 0.87 -> 0.95 at 1000 steps with dense 3."""

    def __init__(self, rows: str = "pairs", margin: float = 0.0, dense: float = 0.0):
        if rows not in ("pairs", "scored"):
            raise ValueError(f"a reward model trains on pairs or scored rows, not {rows!r}")
        self.rows, self.margin, self.dense = rows, margin, dense

    def tokens(self, batch: dict) -> int:
        return int(batch["full"].size)

    def prepare(self, batch: dict) -> tuple[np.ndarray, ...]:
        return batch["full"], batch["last"], batch["target"]

    def __call__(self, model, x, last, target):
        if self.rows == "pairs" and self.dense > 0:
            every = model(x).astype(mx.float32)
            scores = mx.take_along_axis(every, last.astype(mx.int32)[:, None], axis=1)[:, 0]
        else:
            scores = model.sequence_scores(x, last)
        if self.rows == "pairs":
            sc, sr = scores[0::2], scores[1::2]
            losses = -nn.log_sigmoid(sc - sr - self.margin)
            if self.dense > 0:
                xc, xr = x[0::2], x[1::2]
                diverged = mx.cumsum((xc != xr).astype(mx.int32), axis=1) > 0
                pos = mx.arange(x.shape[1])[None, :]
                valid = (diverged & (pos <= mx.minimum(last[0::2], last[1::2])[:, None])).astype(mx.float32)
                per = -nn.log_sigmoid(every[0::2] - every[1::2]) * valid
                losses = losses + self.dense * per.sum(axis=1) / mx.maximum(valid.sum(axis=1), 1.0)
            aux = {"accuracy": _half_ties(sc, sr).sum(), "margin": (sc - sr).sum(),
                   "reward_chosen": sc.sum(), "reward_rejected": sr.sum()}
            count = sc.shape[0]
        else:
            err = scores - target
            losses = err * err
            aux = {"abs_error": mx.abs(err).sum()}
            count = scores.shape[0]
        return losses.sum(), mx.array(float(count)), {k: mx.stop_gradient(v) for k, v in aux.items()}
