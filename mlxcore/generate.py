"""Chat-templated sampling from a checkpoint, through mlx-lm's loader and generator."""

from __future__ import annotations

from pathlib import Path

import mlxcore  # noqa: F401
from mlx_lm import generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlxcore.model import load


def load_chat(checkpoint: str | Path):
    """(model, tokenizer) for a checkpoint, model dir or adapter dir (tokenizer files inside it)."""
    path = Path(checkpoint)
    model, config = load(path)
    model.eval()
    return model, load_tokenizer(path, {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id"))


def reply(model, tokenizer, prompt: str | list[dict], max_tokens: int = 64,
          temperature: float = 0.0, top_p: float = 1.0) -> str:
    """The assistant's reply to `prompt` (a user message, or a whole message list)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    return generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler, verbose=False)


def sample(checkpoint: str | Path, prompts: list[str], max_tokens: int = 64,
           temperature: float = 0.0, top_p: float = 1.0) -> list[dict]:
    model, tokenizer = load_chat(checkpoint)
    return [{"prompt": p, "reply": reply(model, tokenizer, p, max_tokens, temperature, top_p)} for p in prompts]


def sample_dataset(checkpoint: str | Path, sft_jsonl: str | Path, n: int, max_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Reply to the first `n` conversations' prompts; mark replies equal to the reference."""
    import mlx.core as mx

    from mlxcore.data.records import read_rows

    model, tokenizer = load_chat(checkpoint)
    mx.random.seed(seed)
    rows = []
    for messages in read_rows(sft_jsonl, "sft"):
        if len(rows) == n:
            break
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out = reply(model, tokenizer, messages[:first], max_tokens, temperature, top_p)
        expected = messages[first]["content"]
        rows.append({"prompt": messages[first - 1]["content"], "reply": out, "expected": expected,
                     "correct": out.strip() == expected.strip()})
    return rows
