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
import numpy as np

from mlxcore.data.rows import RowStore, iter_rows, make_row
from mlxcore.rl.grpo import group_advantages, token_logprobs
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


def grpo_items(buffer_path: str | Path, scale_rewards: bool = True) -> tuple[list[tuple[dict, float]], dict]:
    """(samples with their advantage, buffer metrics): full groups only, zero-variance groups left out."""
    rows = read_buffer(buffer_path)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    k = max(len(g) for g in groups.values())
    full = [sorted(g, key=lambda r: r["sample"]) for g in groups.values() if len(g) == k]
    adv, zero = group_advantages(np.array([[r["reward"] for r in g] for g in full]), scale_rewards)
    items = [(r, float(a)) for g, ag, z in zip(full, adv, zero) if not z for r, a in zip(g, ag)]
    metrics = {"groups": len(full), "zero_variance_groups": int(zero.sum()), "samples_used": len(items),
               "mean_reward": float(np.mean([r["reward"] for r in rows])),
               "accuracy": float(np.mean([r["correct"] for r in rows])),
               "response_tokens": float(np.mean([len(r["response_ids"]) for r in rows])),
               "steps": 0, "loss": None, "kl": None, "clip_fraction": None, "grad_norm": None}
    return items, metrics


def add_reference_logprobs(items: list[tuple[dict, float]], ref_model, pad: int = 0) -> None:
    """Each sample's log-probs under the frozen reference (for the KL term), computed once."""
    refs = sequence_logprobs(ref_model, [r["prompt_ids"] for r, _ in items], [r["response_ids"] for r, _ in items], pad)
    for (r, _), lp in zip(items, refs):
        r["ref_logprobs"] = lp


class SampleBatches:
    """`fit()`'s batch source over GRPO samples: `epochs` seeded shuffles, `batch_size` at a time
    (an epoch's last batch may be smaller). The cursor {"epoch", "index"} (batches into the epoch)
    is all a resumed run needs: epoch e's order is the (e+1)-th permutation of `seed`'s stream."""

    def __init__(self, items: list[tuple[dict, float]], batch_size: int, seed: int = 0):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.per_epoch = -(-len(items) // batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        for _ in range(epoch):
            rng.permutation(len(self.items))
        return rng.permutation(len(self.items))

    def next(self, cursor: dict) -> tuple[list[tuple[dict, float]], dict]:
        epoch, index = cursor.get("epoch", 0), cursor.get("index", 0)
        if index >= self.per_epoch:
            epoch, index = epoch + 1, 0
        order = self._order(epoch)[index * self.batch_size: (index + 1) * self.batch_size]
        return [self.items[i] for i in order], {"epoch": epoch, "index": index + 1}
