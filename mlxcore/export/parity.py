"""The parity gate: is the shipped GGUF the trained model, as llama.cpp itself runs it?

Two checks, both through llama.cpp (the `llama-cpp-python` package: the real consumer, not a
reimplementation of it):

  token ids   llama.cpp tokenizes the bench prompts (rendered by the checkpoint's chat template,
              special tokens included), every vocabulary entry, and a text sample; each id list
              must equal our tokenizer's. One differing id fails the gate: a broken pre-tokenizer
              or merge list silently changes what the model reads.
  answers     both answer the bench questions greedily (the checkpoint through mlx-lm, the GGUF
              through llama.cpp's chat completion with the template stored in the file); the
              gate fails when a suite's accuracy drops by more than the format's tolerance
              (points, 0-100). How many answers are identical is reported beside it.

`check_tokens` and `compare` are pure functions of their inputs; `verdict` joins them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence


class ParityError(RuntimeError):
    """The gate failed: the message says which check and shows the first difference."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - installed with mlxflow
        raise ImportError("the parity gate and gguf bench targets run llama.cpp through llama-cpp-python: "
                          "pip install llama-cpp-python") from e
    return llama_cpp


def _open(path: str | Path, *, vocab_only: bool = False, n_ctx: int = 2048):
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return llama_cpp.Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx, verbose=False, seed=0,
                           n_threads=max(1, os.cpu_count() or 1), n_batch=min(512, n_ctx))


class GGUFChat:
    """A GGUF model in llama.cpp, answering chats greedily with the chat template stored in the file."""

    def __init__(self, path: str | Path, n_ctx: int = 2048):
        self.path, self.n_ctx, self.llm = Path(path), n_ctx, None

    def __enter__(self) -> "GGUFChat":
        self.llm = _open(self.path, n_ctx=self.n_ctx)
        return self

    def __exit__(self, *exc) -> None:
        if self.llm is not None and hasattr(self.llm, "close"):
            self.llm.close()
        self.llm = None

    def reply(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        """(reply text, generated tokens) at temperature 0, no repetition penalty."""
        self.llm.reset()
        out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                              top_k=1, min_p=0.0, repeat_penalty=1.0, seed=0)
        return out["choices"][0]["message"]["content"] or "", int(out["usage"]["completion_tokens"])


def bench_texts(tokenizer, examples) -> list[str]:
    """Each bench question as the model reads it (chat template, generation prompt) and as a whole
    turn with its gold answer: special tokens, role names and answers in context."""
    texts = []
    for ex in examples:
        user = [{"role": "user", "content": ex.prompt}]
        texts.append(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
        texts.append(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": ex.answer}], tokenize=False))
    return texts


def vocabulary_texts(tokenizer, per_text: int = 64) -> list[str]:
    """Every non-special vocabulary entry decoded, `per_text` to a text (with and without a space
    before each), so every merge the tokenizer knows is exercised at least once."""
    special = set(tokenizer.all_special_ids)
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special]
    pieces = [p for p in pieces if p and "\ufffd" not in p]  # lone bytes of multi-byte chars do not round-trip
    texts = []
    for lo in range(0, len(pieces), per_text):
        chunk = pieces[lo: lo + per_text]
        texts += ["".join(chunk), " ".join(chunk)]
    return texts


def text_sample(paths: Iterable[str | Path], max_bytes: int, chunk_bytes: int = 4096) -> list[str]:
    """The first `max_bytes` of the files under `paths` (text as stored: JSONL lines stay JSON), in
    chunks of about `chunk_bytes` cut at line ends."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file() and f.name != "manifest.json") if p.is_dir() else [p]
    texts, used, chunk = [], 0, []
    size = 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if used >= max_bytes:
                    break
                line = line[: max_bytes - used]
                chunk.append(line)
                size += len(line.encode())
                used += len(line.encode())
                if size >= chunk_bytes:
                    texts.append("".join(chunk))
                    chunk, size = [], 0
    if chunk:
        texts.append("".join(chunk))
    return texts


def check_tokens(gguf_path: str | Path, tokenizer, texts: Sequence[str]) -> dict:
    """Tokenize `texts` with llama.cpp (special tokens parsed, no BOS added unless the model's
    tokenizer adds one) and with `tokenizer`; counts and the first difference."""
    llm = _open(gguf_path, vocab_only=True)
    checked = tokens = differing = 0
    first = None
    try:
        for text in texts:
            ours = tokenizer.encode(text, add_special_tokens=False)
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            checked += 1
            tokens += len(ours)
            if list(theirs) != list(ours):
                differing += 1
                if first is None:
                    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                    first = {"text": text[:200], "at": at, "ours": list(ours[max(0, at - 3): at + 5]),
                             "llama_cpp": list(theirs[max(0, at - 3): at + 5]),
                             "ours_pieces": tokenizer.convert_ids_to_tokens(list(ours[max(0, at - 3): at + 5]))}
    finally:
        if hasattr(llm, "close"):
            llm.close()
    return {"texts": checked, "tokens": tokens, "differing_texts": differing, "first_difference": first}


def _accuracy(rows: list[dict]) -> dict[str, float]:
    per: dict[str, list[bool]] = {}
    for r in rows:
        per.setdefault(r["suite"], []).append(bool(r["correct"]))
    return {s: 100.0 * sum(v) / len(v) for s, v in per.items()}


def compare(checkpoint_rows: list[dict], gguf_rows: list[dict]) -> dict:
    """Per-suite accuracy (points) of both, the drop, and the share of identical replies."""
    if [r["id"] for r in checkpoint_rows] != [r["id"] for r in gguf_rows]:
        raise ValueError("the checkpoint and the GGUF answered different questions")
    ours, theirs = _accuracy(checkpoint_rows), _accuracy(gguf_rows)
    same = sum((a["reply"] or "").strip() == (b["reply"] or "").strip() for a, b in zip(checkpoint_rows, gguf_rows))
    suites = {s: {"checkpoint": ours[s], "gguf": theirs[s], "drop": ours[s] - theirs[s]} for s in ours}
    differing = [{"id": a["id"], "suite": a["suite"], "checkpoint": a["reply"], "gguf": b["reply"],
                  "checkpoint_correct": a["correct"], "gguf_correct": b["correct"]}
                 for a, b in zip(checkpoint_rows, gguf_rows) if (a["reply"] or "").strip() != (b["reply"] or "").strip()]
    return {"suites": suites, "identical": same / max(len(gguf_rows), 1), "questions": len(gguf_rows),
            "differing": differing}


def verdict(tokens: dict, answers: dict, qtype: str, tolerance: float | None) -> dict:
    """Pass / fail with the reasons, from `check_tokens` and `compare`."""
    reasons = []
    if tokens["differing_texts"]:
        d = tokens["first_difference"]
        reasons.append(f"token ids differ on {tokens['differing_texts']} of {tokens['texts']} texts; first at token "
                       f"{d['at']} of {d['text'][:80]!r}: ours {d['ours']} {d['ours_pieces']}, llama.cpp {d['llama_cpp']}")
    if tolerance is not None:
        for suite, s in sorted(answers["suites"].items()):
            if s["drop"] > tolerance + 1e-9:
                reasons.append(f"{suite}: accuracy {s['checkpoint']:.1f} -> {s['gguf']:.1f} in the {qtype} GGUF, a drop "
                               f"of {s['drop']:.1f} points (tolerance {tolerance:g})")
    return {"passed": not reasons, "qtype": qtype, "tolerance": tolerance, "reasons": reasons,
            "tokens": tokens, "identical": answers["identical"], "questions": answers["questions"],
            "suites": answers["suites"]}


def gate(model_dir: str | Path, gguf_file: str | Path, qtype: str, config, checkpoint_rows: list[dict],
         gguf_rows: list[dict], text: Sequence[str | Path] = ()) -> dict:
    """The whole gate (`config`: a ParityGateConfig): token ids on the bench prompts, every vocabulary
    entry and the text sample, then the answers; `verdict`'s dict plus the differing answers."""
    from transformers import AutoTokenizer

    from mlxcore.bench.suites import make

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = (bench_texts(tokenizer, make(config.suites, config.examples, config.seed)) + vocabulary_texts(tokenizer)
             + text_sample([*config.text, *text], config.text_bytes))
    answers = compare(checkpoint_rows, gguf_rows)
    result = verdict(check_tokens(gguf_file, tokenizer, texts), answers, qtype, getattr(config.tolerance, qtype))
    return result | {"differing": answers["differing"]}


def markdown(result: dict, title: str, max_examples: int = 8) -> str:
    """The side-by-side artifact: per-suite accuracy, token parity, and the first differing answers."""
    tol = result["tolerance"]
    lines = [f"# {title}: {'PASSED' if result['passed'] else 'FAILED'}", "",
             f"token ids: {result['tokens']['texts'] - result['tokens']['differing_texts']} of "
             f"{result['tokens']['texts']} texts identical ({result['tokens']['tokens']} tokens)  ",
             f"identical greedy answers: {result['identical']:.1%} of {result['questions']} questions", "",
             "| suite | checkpoint | gguf | drop (points) | tolerance |", "|---|---|---|---|---|"]
    for suite, s in sorted(result["suites"].items()):
        lines.append(f"| {suite} | {s['checkpoint']:.1f} | {s['gguf']:.1f} | {s['drop']:.1f} | "
                     f"{'report only' if tol is None else f'{tol:g}'} |")
    if result["reasons"]:
        lines += ["", "**Why it failed**", ""] + [f"- {r}" for r in result["reasons"]]
    diffs = result.get("differing") or []
    if diffs:
        lines += ["", "| question | checkpoint | gguf |", "|---|---|---|"]
        for d in diffs[:max_examples]:
            lines.append(f"| {d['id']} | {json.dumps(d['checkpoint'])[:80]} | {json.dumps(d['gguf'])[:80]} |")
    return "\n".join(lines) + "\n"
