"""Batched sampling for RL rollouts: a fused sampler and a lean batched generation loop.

    from mlxcore.rl.sampling import generate_batch, make_sampler, sample
    res = generate_batch(model, tokenizer, prompt_ids, max_tokens=128, temperature=1.0, top_p=1.0)
    res.token_ids, res.texts, res.logprobs, res.finish_reasons     # one entry per prompt

Why not mlx-lm's `batch_generate` (which `rollout` used before)? Profile on the CPU backend,
tiny preset, 8 prompts x K=8 (B=64 rows, V=6400). A decode step was 16-23 ms of model forward
plus 10.2 ms of sampling in MLX's scalar, single-threaded elementwise ops: `logsumexp` and a
subtract for full-vocabulary log-probs (5.0 ms), then the Gumbel trick (B*V uniforms, two logs,
an add, an argmax; 5.2 ms). Its default `completion_batch_size=32` also ran the 64 rows as
two sequential batches of 32, and it prefilled each of the K identical copies of a prompt.
Here:

* `sample` draws each row's token by inverse CDF from ONE uniform per row in a fused CPU kernel
  (`mlxcore.kernels.categorical_sample`; plain MLX ops elsewhere), and also returns the model's
  log-prob of the token: 0.5-0.7 ms for [64, 6400] instead of 10.2.
* `generate_batch` prefills each distinct prompt once and copies its KV cache to the rows that
  share it (`BatchKVCache.filter` with repeated indices). It then decodes all rows together,
  one model call and one sampler call per step, and queues the next step (`mx.async_eval`)
  before it reads the current tokens back. Rows that stop leave the batch.
* It routes the model's mlx-lm module through `mlxcore.kernels.patch.use_fast_kernels`
  (process-wide, as training does). Decode gets the fused SwiGLU. The cache-less scoring
  forward that `rollout` runs next gets fused attention and SwiGLU: 4.0-4.5 s -> 2.7-3.2 s.
* It generates with one BLAS thread (`DECODE_BLAS_THREADS`, below).

Sampling semantics are mlx-lm's `make_sampler(temp, top_p)`: temperature 0 is the argmax,
otherwise softmax(logits / temperature), restricted to `apply_top_p`'s set when 0 < top_p < 1.
Stop tokens are the tokenizer's `eos_token_ids`; a stop token ends the row and is not part of
its `token_ids`, and at most `max_tokens` tokens are generated (as `batch_generate`). The
draws differ from mlx-lm's (inverse CDF, not Gumbel), the distribution does not; draws are
reproducible under `mx.random.seed`.

Models whose cache is not a plain `KVCache` per layer (sliding windows, SSM state, ...) go
through mlx-lm's `batch_generate` with the fused sampler instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from mlxcore import kernels
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.perf._blas import blas_threads

# BLAS threads while generating. Decode matmuls are small ([64, 256] x [256, 768] for the tiny
# preset); with MKL's 2-thread OpenMP team each one pays a barrier, and on a shared 2-core VM
# a descheduled team member makes the other spin: a 48-step B=64 decode took 17-21 s with 2
# threads under load 5 and 1.2-1.3 s with 1. With one BLAS thread the Python thread (building
# the next step while the current one runs) and MLX's compute thread fill the two cores.
DECODE_BLAS_THREADS = 1


def sample(logits: mx.array, temperature: float = 1.0, top_p: float = 1.0) -> tuple[mx.array, mx.array]:
    """(tokens uint32 [B], the model's log-probs of them [B]) for logits [B, V].

    Tokens come from softmax(logits / temperature) (the argmax at temperature 0), restricted to
    mlx-lm's top-p set when 0 < top_p < 1. The log-prob is log_softmax(logits)[token] (the
    policy's own, at temperature 1 and without top-p).
    """
    if temperature == 0:
        tokens = mx.argmax(logits, axis=-1).astype(mx.uint32)
        logp = kernels.log_softmax(logits)
        return tokens, mx.take_along_axis(logp, tokens[..., None].astype(mx.int32), axis=-1)[..., 0]
    uniforms = mx.random.uniform(shape=logits.shape[:-1])  # the global key: mx.random.seed applies
    return kernels.categorical_sample(logits, uniforms, temperature, top_p)


def make_sampler(temperature: float = 1.0, top_p: float = 1.0) -> Callable[[mx.array], mx.array]:
    """A drop-in for `mlx_lm.sample_utils.make_sampler(temp, top_p)` (tokens from log-probs or logits)."""
    return lambda logprobs: sample(logprobs, temperature, top_p)[0]


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]] = field(default_factory=list)  # log pi(token) at temperature 1
    finish_reasons: list[str] = field(default_factory=list)  # "stop" or "length"
    stop_tokens: list[int | None] = field(default_factory=list)  # the stop token that ended each row (not in token_ids)


def _stop_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return {int(t) for t in ids}


def _plain_kv_layers(model) -> int | None:
    """The number of cache entries if every one is a plain KVCache (batchable here), else None."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    return len(caches) if all(type(c) is KVCache for c in caches) else None


def _prefill(model, layers: int, prompts: list[list[int]], step: int):
    """A BatchKVCache per layer holding every prompt but its last token (left-padded, one batch)."""
    from mlx_lm.models.cache import BatchKVCache

    context = [p[:-1] for p in prompts]
    width = max(len(c) for c in context)
    left = [width - len(c) for c in context]
    cache = [BatchKVCache(left) for _ in range(layers)]
    if width:
        x = mx.array([[0] * pad + c for pad, c in zip(left, context)], dtype=mx.int32)
        for lo in range(0, width, step):
            model(x[:, lo: lo + step], cache=cache)  # the logits are never evaluated
            mx.eval([c.state for c in cache])
    return cache


def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, prefill_step_size: int = 512) -> GenerationResult:
    """Sample one reply per prompt (token id lists), all rows decoded as one batch."""
    if not prompts:
        return GenerationResult([], [], [], [], [])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: empty prompt")
    if max_tokens <= 0:
        raise ValueError("generate_batch: max_tokens must be > 0")
    use_fast_kernels(model)  # fused SwiGLU (and, for cache-less forwards such as scoring, attention)
    layers = _plain_kv_layers(model)
    if layers is None:
        return _mlx_lm_generate(model, tokenizer, prompts, max_tokens, temperature, top_p)
    with blas_threads(DECODE_BLAS_THREADS):
        return _generate(model, tokenizer, layers, prompts, max_tokens, temperature, top_p, prefill_step_size)


def _generate(model, tokenizer, layers, prompts, max_tokens, temperature, top_p, prefill_step_size):
    stop = _stop_ids(tokenizer)
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    cache = _prefill(model, layers, [list(p) for p in distinct], prefill_step_size)
    if len(distinct) < len(prompts) or list(distinct.values()) != row_prompt:
        rows = mx.array(row_prompt)
        for c in cache:  # a gather over the batch axis: each row gets its prompt's cache
            c.filter(rows)

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(inputs[:, None], cache=cache)[:, -1, :]
        return sample(logits, temperature, top_p)

    n = len(prompts)
    token_ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    stops: list[int | None] = [None] * n
    active = list(range(n))  # prompt index of each batch row
    current = step(mx.array([p[-1] for p in prompts], dtype=mx.uint32))
    mx.async_eval(current)
    for generated in range(1, max_tokens + 1):
        upcoming = None
        if generated < max_tokens:  # queue the next step before reading this one back
            upcoming = step(current[0])
            mx.async_eval(upcoming)
        tokens, lps = current[0].tolist(), current[1].tolist()
        keep = []
        for b, (i, t, lp) in enumerate(zip(active, tokens, lps)):
            if t in stop:
                reasons[i], stops[i] = "stop", t
                continue
            token_ids[i].append(t)
            logprobs[i].append(lp)
            if generated < max_tokens:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch (and its cache)
            active = [active[b] for b in keep]
            idx = mx.array(keep)
            for c in cache:
                c.filter(idx)
            upcoming = (upcoming[0][idx], upcoming[1][idx])
        current = upcoming
    return GenerationResult(token_ids, [tokenizer.decode(t) for t in token_ids], logprobs, reasons, stops)


def _mlx_lm_generate(model, tokenizer, prompts, max_tokens, temperature, top_p) -> GenerationResult:
    """Fallback for caches `generate_batch` cannot batch: mlx-lm's loop with the fused sampler."""
    from mlx_lm.generate import batch_generate

    res = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True,
                         return_logprobs=True, sampler=make_sampler(temperature, top_p),
                         completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    reasons = ["length" if len(t) >= max_tokens else "stop" for t in res.token_ids]
    eos = tokenizer.eos_token_id  # mlx-lm does not say which stop token ended a row: the main one
    return GenerationResult(res.token_ids, res.texts, res.logprobs, reasons, [eos if r == "stop" else None for r in reasons])
