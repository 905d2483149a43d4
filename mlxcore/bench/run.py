"""Every target answers the same bench questions; one row per answer.

A row: the question's id / suite / category, the reply, its score (`correct`, `valid`,
`parsed`), the generated tokens and `ms`, the answer's share of the target's wall time. A
checkpoint generates greedily in batches (mlx-lm's `batch_generate`), so its answers share
each batch's time; an endpoint's concurrent requests share the target's wall time in
proportion to their latency (also kept, as `latency_ms`). Summed over any group of rows, `ms`
and `tokens` give that group's ms/example and tok/s on the same footing for every target.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from mlxcore.bench.scoring import score
from mlxcore.bench.suites import Example, baseline
from mlxcore.config import BenchTarget
from mlxcore.clients.secrets import SecretResolver

Progress = Callable[[int, int], None]


def answer(target: BenchTarget, examples: Sequence[Example], max_tokens: int = 64, batch_size: int = 32,
           seed: int = 0, on_progress: Progress | None = None,
           resolve_secret: SecretResolver | None = None) -> list[dict]:
    """`target`'s scored answers to `examples`, in their order. `resolve_secret` reads the
    Prefect Secret block an endpoint's `api_key_secret` names (see mlxcore/clients/secrets.py)."""
    if target.kind in ("checkpoint", "mlx-quantized"):
        quantize = (target.bits, target.group_size) if target.kind == "mlx-quantized" else None
        return _checkpoint(target.path, examples, max_tokens, batch_size, on_progress, quantize)
    if target.kind == "gguf":
        return _gguf(target.path, examples, max_tokens, on_progress)
    if target.kind == "random":
        return _random(examples, seed, on_progress)
    return _endpoint(target, examples, max_tokens, on_progress, resolve_secret)


def _row(ex: Example, reply: str | None, tokens: int, ms: float, **extra) -> dict:
    s = score(ex, reply) if reply is not None else None
    return {"id": ex.id, "suite": ex.suite, "category": ex.category, "reply": reply,
            "parsed": s.parsed if s else None, "correct": bool(s and s.correct), "valid": bool(s and s.valid),
            "tokens": tokens, "ms": ms, **extra}


def _checkpoint(path: str, examples: Sequence[Example], max_tokens: int, batch_size: int,
                on_progress: Progress | None, quantize: tuple[int, int] | None = None) -> list[dict]:
    """Greedy answers of a model dir; `quantize` (bits, group size): of its MLX-quantized self, unless
    it is already quantized (an `mlx-4bit` / `mlx-8bit` export)."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from mlxcore.models.generate import load_chat

    model, tokenizer = load_chat(path)
    if quantize is not None and not _is_quantized(path):
        from mlx_lm.utils import quantize_model

        model, _ = quantize_model(model, {}, group_size=quantize[1], bits=quantize[0])
    greedy = make_sampler(temp=0.0)
    rows: list[dict] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo: lo + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
                   for ex in chunk]
        started = time.perf_counter()
        res = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, sampler=greedy, return_token_ids=True)
        share = 1000 * (time.perf_counter() - started) / len(chunk)
        rows += [_row(ex, text, len(ids), share) for ex, text, ids in zip(chunk, res.texts, res.token_ids)]
        if on_progress is not None:
            on_progress(len(rows), len(examples))
    return rows


def _is_quantized(path: str) -> bool:
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    return config.is_file() and "quantization" in json.loads(config.read_text())


def _gguf(path: str, examples: Sequence[Example], max_tokens: int, on_progress: Progress | None) -> list[dict]:
    """Greedy answers of a GGUF file from llama.cpp itself (llama-cpp-python), through the chat template
    stored in the file, as a llama.cpp user gets them."""
    from mlxcore.export.parity import GGUFChat

    rows: list[dict] = []
    with GGUFChat(path) as chat:
        for ex in examples:
            started = time.perf_counter()
            text, tokens = chat.reply([{"role": "user", "content": ex.prompt}], max_tokens)
            rows.append(_row(ex, text, tokens, 1000 * (time.perf_counter() - started)))
            if on_progress is not None:
                on_progress(len(rows), len(examples))
    return rows


def _random(examples: Sequence[Example], seed: int, on_progress: Progress | None) -> list[dict]:
    """The uniform-random baseline: a random answer from each question's answer space."""
    rng = random.Random(f"mlxflow-bench-random/{seed}")
    rows = [_row(ex, baseline(ex, rng), 0, 0.0) for ex in examples]
    if on_progress is not None:
        on_progress(len(rows), len(examples))
    return rows


def _endpoint(target: BenchTarget, examples: Sequence[Example], max_tokens: int,
              on_progress: Progress | None, resolve_secret: SecretResolver | None) -> list[dict]:
    """Ollama or an OpenAI-compatible server, through the distillation teacher's client (retries included)."""
    from mlxcore.clients.chat import Teacher, TeacherConfig, TeacherError

    config = TeacherConfig(url=target.url or TeacherConfig().url, model=target.model, api=target.kind,
                           temperature=0.0, top_p=1.0, max_tokens=max_tokens, workers=target.workers,
                           timeout_s=target.timeout_s, api_key_env=target.api_key_env,
                           api_key_secret=target.api_key_secret)
    found: dict[int, tuple[str | None, int, float, str | None]] = {}
    with Teacher(config, resolve_secret=resolve_secret) as client:  # the key is read here, in this process
        client.health()  # unreachable server or unknown model: one clear error before any question
        started = time.perf_counter()
        jobs = ((i, [{"role": "user", "content": ex.prompt}]) for i, ex in enumerate(examples))
        for i, reply in client.imap_unordered(jobs):
            if isinstance(reply, TeacherError):
                found[i] = (None, 0, 0.0, str(reply))
            else:
                found[i] = (reply.text, reply.completion_tokens, 1000 * reply.seconds, None)
            if on_progress is not None:
                on_progress(len(found), len(examples))
        wall_ms = 1000 * (time.perf_counter() - started)
    scale = wall_ms / max(sum(latency for _, _, latency, _ in found.values()), 1e-9)
    rows = []
    for i, ex in enumerate(examples):
        text, tokens, latency, error = found[i]
        rows.append(_row(ex, text, tokens, latency * scale, latency_ms=round(latency, 1),
                         **({"error": error} if error else {})))
    return rows
