"""The rollout of one RL iteration: K samples per prompt, rewarded, into a resumable buffer; and
the batches the update trains on. The objectives are in `objectives.py` (GRPO family) and
`ppo.py`.

Buffer rows (JSONL, one per sample, written through the crash-safe `RowStore`):

    {"conversations": [...prompt messages, {"role": "assistant", "content": response}],
     "meta": {"id": "<prompt id>/<sample>", "prompt_id", "sample", "truth", "reward", "correct",
              "prompt_ids": [...], "response_ids": [...], "old_logprobs": [...],
              "finish_reason", "checkpoint", "seed", "created_at", ...}}

Rollout samples with `mlxcore.rl.sampling.generate_batch` (every prompt's K copies in one batch,
many prompts per batch; mlx-lm's sampling semantics with a fused CPU sampler), then scores the
sampled tokens with one forward pass of the same weights: those log-probabilities are the "old"
policy of the update. A re-run after a crash keeps the samples already written and generates
only the missing ones (never a duplicate).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlxcore.data.rows import RowStore, iter_rows, make_row
from mlxcore.rl.objectives import token_logprobs
from mlxcore.rl.prompts import RLPrompt
from mlxcore.rl.rewards import Sample


def sample_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}/{sample}"


def _pad(seqs: list[list[int]], pad: int) -> np.ndarray:
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), pad, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def per_response(fn, prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int = 0,
                 batch_size: int = 16) -> list[np.ndarray]:
    """`fn(inputs, targets)` ([B, T] -> [B, T]) over padded prompt + response batches, read at the
    positions that predict each response token: one float64 array per (prompt, response) pair."""
    out = []
    for lo in range(0, len(prompt_ids), batch_size):
        ps, rs = prompt_ids[lo: lo + batch_size], response_ids[lo: lo + batch_size]
        full = _pad([p + r for p, r in zip(ps, rs)], pad)
        values = np.array(fn(mx.array(full[:, :-1]), mx.array(full[:, 1:])).astype(mx.float32), dtype=np.float64)
        for i, (p, r) in enumerate(zip(ps, rs)):
            out.append(values[i, len(p) - 1: len(p) - 1 + len(r)].copy())
    return out


def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int = 0,
                      batch_size: int = 16) -> list[list[float]]:
    """log pi(response token | everything before it) for each (prompt, response) pair."""
    return [lp.tolist() for lp in per_response(lambda x, y: token_logprobs(model, x, y), prompt_ids, response_ids,
                                               pad, batch_size)]


def rollout(model, tokenizer, prompts: list[RLPrompt], buffer_path: str | Path, *, k: int, max_tokens: int,
            scorer, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, checkpoint: str = "",
            prompts_per_batch: int = 8, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """K samples of every prompt into the buffer (resuming); stats of what is in it now.

    `scorer.score(samples)` (`mlxcore.rl.rewards.Scorer`) rewards each generated chunk before
    any of its rows is written: a reward function that fails leaves the buffer as it was."""
    from mlxcore.perf._blas import blas_threads
    from mlxcore.rl.sampling import generate_batch  # batched decode + fused CPU sampler

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started, generated_tokens = time.perf_counter(), 0
    with RowStore(buffer_path) as store:
        todo = [(p, s) for p in prompts for s in range(k) if not store.has(sample_key(p.id, s))]
        total = len(prompts) * k
        for lo in range(0, len(todo), prompts_per_batch * k):
            chunk = todo[lo: lo + prompts_per_batch * k]
            mx.random.seed(seed * 1_000_003 + lo)  # a re-run of the same chunk samples the same
            prompt_ids = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True) for p, _ in chunk]
            res = generate_batch(model, tokenizer, prompt_ids, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p)
            # The update learns the stop token too (how to end an answer): it ends the response ids
            # of a sample that stopped, and is scored with them. The text is the answer without it.
            responses = [ids + [stop] if stop is not None else ids for ids, stop in zip(res.token_ids, res.stop_tokens)]
            with blas_threads(1):  # small matmuls in a tight loop: one BLAS thread (see blas_threads)
                old = sequence_logprobs(model, prompt_ids, responses, pad)
            samples = [Sample(id=sample_key(p.id, s), where=p.where, prompt=_last_user(p.messages), messages=p.messages,
                              completion=text, reference=p.reference, completion_tokens=len(ids),
                              truncated=f == "length", max_tokens=max_tokens)
                       for (p, s), ids, text, f in zip(chunk, res.token_ids, res.texts, res.finish_reasons)]
            scored = scorer.score(samples)
            for (p, s), pids, ids, text, lp, f, sc in zip(chunk, prompt_ids, responses, res.texts, old,
                                                          res.finish_reasons, scored):
                generated_tokens += len(ids)
                row = make_row(messages=p.messages, reply=text, id=sample_key(p.id, s), category="rl",
                               teacher=checkpoint, verified=False, prompt_hash=sample_key(p.id, s),
                               prompt_id=p.id, sample=s, reference=p.reference, where=p.where,
                               reward=sc["reward"], rewards=sc["rewards"], correct=sc["correct"],
                               judge_failed=sc.get("judge_failed", False), finish_reason=f,
                               prompt_ids=list(map(int, pids)), response_ids=list(map(int, ids)),
                               old_logprobs=[round(x, 6) for x in lp], checkpoint=checkpoint, seed=seed)
                store.append(row)
            if on_progress is not None:
                on_progress(total - len(todo) + lo + len(chunk), total)
    seconds = time.perf_counter() - started
    return buffer_stats(buffer_path) | {"generated_tokens": generated_tokens, "seconds": seconds,
                                        "tok_per_s": generated_tokens / max(seconds, 1e-9)}


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def read_buffer(buffer_path: str | Path) -> list[dict]:
    return [r["meta"] | {"response": r["conversations"][-1]["content"]} for r in iter_rows(buffer_path)]


def mean_of(values) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def buffer_stats(buffer_path: str | Path) -> dict:
    """Mean reward (and each term's), accuracy (the accuracy term's mean; None without one),
    response length, truncated share and judge failures of the buffer's samples."""
    rows = read_buffer(buffer_path)
    terms = sorted({name for r in rows for name in (r.get("rewards") or {})})
    return {"samples": len(rows), "mean_reward": mean_of(r["reward"] for r in rows),
            "accuracy": mean_of(r.get("correct") for r in rows),
            "rewards": {t: mean_of((r.get("rewards") or {}).get(t) for r in rows) for t in terms},
            "response_tokens": mean_of(len(r["response_ids"]) for r in rows) or 0.0,
            "truncated": mean_of(r.get("finish_reason") == "length" for r in rows) or 0.0,
            "judge_failures": sum(bool(r.get("judge_failed")) for r in rows)}


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
