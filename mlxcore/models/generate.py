"""Chat-templated sampling from a checkpoint, through mlx-lm's loader and generator."""

from __future__ import annotations

from pathlib import Path

import mlxcore  # noqa: F401
from mlx_lm import generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlxcore.models.checkpoint import load


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


def held_out_prompts(data_dir: str | Path, n: int, split: str = "val") -> list[dict]:
    """The first `n` SFT rows of a pretokenized split as (prompt ids, expected reply ids).

    The prompt is everything before the first trainable token, the expected reply the first
    trainable run (the first assistant turn, end-of-turn token included), whatever the source
    format was.
    """
    import numpy as np

    from mlxcore.data.loader import documents

    out = []
    for tokens, mask in documents(data_dir, split):
        if mask is None:
            raise ValueError(f"{data_dir}: not an SFT dataset (no loss masks)")
        if len(out) == n:
            break
        m = np.asarray(mask)
        start = int(m.argmax())
        stop = start + (int(m[start:].argmin()) or len(m) - start)
        out.append({"prompt": tokens[:start].tolist(), "expected": tokens[start:stop].tolist()})
    return out


def sample_split(checkpoint: str | Path, data_dir: str | Path, n: int, max_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Reply to the prompts of the first `n` held-out SFT rows; mark replies equal to the reference."""
    import mlx.core as mx

    model, tokenizer = load_chat(checkpoint)
    mx.random.seed(seed)
    rows = []
    for row in held_out_prompts(data_dir, n):
        sampler = make_sampler(temp=temperature, top_p=top_p)
        out = generate(model, tokenizer, row["prompt"], max_tokens=max_tokens, sampler=sampler, verbose=False)
        expected = tokenizer.decode(row["expected"], skip_special_tokens=True)
        prompt = tokenizer.decode(row["prompt"], skip_special_tokens=True)
        rows.append({"prompt": _last_turn(prompt), "reply": out, "expected": expected,
                     "correct": out.strip() == expected.strip()})
    return rows


def _last_turn(rendered: str) -> str:
    """The user's words from a rendered prompt with special tokens removed ("user\nHi\nassistant\n")."""
    lines = rendered.rstrip().split("\n")
    if len(lines) > 1 and lines[-1].strip() == "assistant":
        lines = lines[:-1]
    if len(lines) > 1 and lines[0].strip() in ("user", "system"):
        lines = lines[1:]
    return "\n".join(lines).strip()
