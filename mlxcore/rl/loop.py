"""One GRPO iteration on GSM8K-style prompts: `rollout` (K samples per prompt into a buffer) and
`update` (the clipped objective over that buffer). The objective itself is in `grpo.py`.

Buffer rows (JSONL, one per sample, written through the crash-safe `RowStore`):

    {"conversations": [...prompt messages, {"role": "assistant", "content": response}],
     "meta": {"id": "<prompt id>/<sample>", "prompt_id", "sample", "truth", "reward", "correct",
              "prompt_ids": [...], "response_ids": [...], "old_logprobs": [...],
              "finish_reason", "checkpoint", "seed", "created_at", ...}}

Rollout samples with mlx-lm's `batch_generate` (every prompt's K copies in one batch, many
prompts per batch), then scores the sampled tokens with one forward pass of the same weights:
those log-probabilities are the "old" policy of the update. A re-run after a crash keeps the
samples already written and generates only the missing ones (never a duplicate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxcore.distill.rows import RowStore, iter_rows, make_row
from mlxcore.rl.grpo import group_advantages, grpo_loss, token_logprobs
from mlxcore.rl.rewards import correctness_reward, reward as score


@dataclass(frozen=True)
class RLPrompt:
    id: str
    messages: list[dict]
    truth: str


def sample_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}/{sample}"


def _pad(seqs: list[list[int]], pad: int) -> np.ndarray:
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), pad, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int = 0,
                      batch_size: int = 16) -> list[list[float]]:
    """log pi(response token | everything before it) for each (prompt, response) pair."""
    out = []
    for lo in range(0, len(prompt_ids), batch_size):
        ps, rs = prompt_ids[lo: lo + batch_size], response_ids[lo: lo + batch_size]
        full = _pad([p + r for p, r in zip(ps, rs)], pad)
        lp = np.array(token_logprobs(model, mx.array(full[:, :-1]), mx.array(full[:, 1:])))
        for i, (p, r) in enumerate(zip(ps, rs)):
            out.append(lp[i, len(p) - 1: len(p) - 1 + len(r)].tolist())
    return out


def rollout(model, tokenizer, prompts: list[RLPrompt], buffer_path: str | Path, *, k: int, max_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, checkpoint: str = "",
            format_weight: float = 0.0, prompts_per_batch: int = 8,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """K samples of every prompt into the buffer (resuming); stats of what is in it now."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature, top_p=top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started, generated_tokens = time.perf_counter(), 0
    with RowStore(buffer_path) as store:
        todo = [(p, s) for p in prompts for s in range(k) if not store.has(sample_key(p.id, s))]
        total = len(prompts) * k
        for lo in range(0, len(todo), prompts_per_batch * k):
            chunk = todo[lo: lo + prompts_per_batch * k]
            mx.random.seed(seed * 1_000_003 + lo)  # a re-run of the same chunk samples the same
            prompt_ids = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True) for p, _ in chunk]
            res = batch_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens, sampler=sampler,
                                 return_token_ids=True)
            old = sequence_logprobs(model, prompt_ids, res.token_ids, pad)
            for (p, s), pids, ids, text, lp in zip(chunk, prompt_ids, res.token_ids, res.texts, old):
                generated_tokens += len(ids)
                row = make_row(messages=p.messages, reply=text, id=sample_key(p.id, s), category="gsm8k",
                               teacher=checkpoint, verified=False, prompt_hash=sample_key(p.id, s),
                               prompt_id=p.id, sample=s, truth=p.truth,
                               reward=score(text, p.truth, format_weight), correct=correctness_reward(text, p.truth),
                               prompt_ids=list(map(int, pids)), response_ids=list(map(int, ids)), old_logprobs=[round(x, 6) for x in lp],
                               checkpoint=checkpoint, seed=seed)
                store.append(row)
            if on_progress is not None:
                on_progress(total - len(todo) + lo + len(chunk), total)
    seconds = time.perf_counter() - started
    return buffer_stats(buffer_path) | {"generated_tokens": generated_tokens, "seconds": seconds,
                                        "tok_per_s": generated_tokens / max(seconds, 1e-9)}


def read_buffer(buffer_path: str | Path) -> list[dict]:
    return [r["meta"] | {"response": r["conversations"][-1]["content"]} for r in iter_rows(buffer_path)]


def buffer_stats(buffer_path: str | Path) -> dict:
    rows = read_buffer(buffer_path)
    n = max(len(rows), 1)
    return {"samples": len(rows), "mean_reward": sum(r["reward"] for r in rows) / n,
            "accuracy": sum(r["correct"] for r in rows) / n,
            "response_tokens": sum(len(r["response_ids"]) for r in rows) / n}


@dataclass
class UpdateConfig:
    clip_eps: float = 0.2
    beta: float = 0.0
    scale_rewards: bool = True
    batch_size: int = 16
    epochs: int = 1
    grad_clip: float = 1.0


def update(model, optimizer, buffer_path: str | Path, cfg: UpdateConfig, *, pad: int = 0, ref_model=None,
           seed: int = 0) -> dict:
    """GRPO steps over the buffer: advantages per prompt group, clipped ratio, optional KL."""
    rows = read_buffer(buffer_path)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    k = max(len(g) for g in groups.values())
    full = [sorted(g, key=lambda r: r["sample"]) for g in groups.values() if len(g) == k]
    adv, zero = group_advantages(np.array([[r["reward"] for r in g] for g in full]), cfg.scale_rewards)
    items = [(r, float(a)) for g, ag, z in zip(full, adv, zero) if not z for r, a in zip(g, ag)]
    metrics = {"groups": len(full), "zero_variance_groups": int(zero.sum()), "samples_used": len(items),
               "mean_reward": float(np.mean([r["reward"] for r in rows])),
               "accuracy": float(np.mean([r["correct"] for r in rows])),
               "response_tokens": float(np.mean([len(r["response_ids"]) for r in rows])),
               "steps": 0, "loss": None, "kl": None, "clip_fraction": None, "grad_norm": None}
    if not items:
        return metrics
    if cfg.beta > 0 and ref_model is None:
        raise ValueError("beta > 0 needs ref_model (the frozen reference policy)")

    def loss_fn(model, x, y, old, a, mask, ref):
        return grpo_loss(token_logprobs(model, x, y), old, a, mask, cfg.clip_eps, cfg.beta, ref)

    grad_fn = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(len(items))
        for lo in range(0, len(order), cfg.batch_size):
            batch = [items[i] for i in order[lo: lo + cfg.batch_size]]
            x, y, old, a, mask = _batch(batch, pad)
            ref = token_logprobs(ref_model, x, y) if cfg.beta > 0 else None
            (loss, m), grads = grad_fn(model, x, y, old, a, mask, ref)
            if cfg.grad_clip > 0:
                from mlx.optimizers import clip_grad_norm

                grads, norm = clip_grad_norm(grads, cfg.grad_clip)
            else:
                norm = mx.sqrt(sum((g * g).sum() for _, g in _leaves(grads)))
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss, norm, m["kl"], m["clip_fraction"])
            steps += 1
            for key, v in (("loss", loss), ("kl", m["kl"]), ("clip_fraction", m["clip_fraction"]), ("grad_norm", norm)):
                sums[key] += v.item()
    if not steps:  # epochs = 0: evaluation only
        return metrics
    return metrics | {"steps": steps} | {key: v / steps for key, v in sums.items()}


def _leaves(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _batch(batch: list[tuple[dict, float]], pad: int):
    """Inputs, targets, old log-probs, advantages and the response mask of a list of samples."""
    seqs = [r["prompt_ids"] + r["response_ids"] for r, _ in batch]
    width = max(len(s) for s in seqs) - 1
    x = np.full((len(batch), width), pad, dtype=np.int32)
    y = np.full((len(batch), width), pad, dtype=np.int32)
    old = np.zeros((len(batch), width), dtype=np.float32)
    mask = np.zeros((len(batch), width), dtype=np.float32)
    for i, ((r, _), s) in enumerate(zip(batch, seqs)):
        x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
        start = len(r["prompt_ids"]) - 1
        n = len(r["response_ids"])
        old[i, start: start + n] = r["old_logprobs"]
        mask[i, start: start + n] = 1.0
    return (mx.array(x), mx.array(y), mx.array(old), mx.array([a for _, a in batch], dtype=mx.float32),
            mx.array(mask))
