"""Tokenized preference data: every example is a prompt and its responses, as token ids.

`pretokenize(inputs, tokenizer_dir, out_dir)` reads preference files (`formats`), renders each
prompt through the tokenizer's chat template (with the generation prompt) and each response as
the assistant turn that follows it, through its end-of-turn token (the same split SFT's masks
use, so a model SFT'd here and then preference-trained sees the same tokens), and writes

  <out>/<split>.npz   prompt (int32, back to back) + prompt_off [N+1];
                      response (int32) + response_off [N*R+1]: example i's R responses are
                      rows i*R .. i*R+R-1 (pairs: chosen, rejected; kto / scored: one), each
                      the reply through its end-of-turn token and then the template's tail
                      after it (ChatML's "\n"): the whole rendered conversation, as a reward
                      model reads it; response_train [N*R]: how many of its tokens are the
                      reply (what a policy learns; the tail is not learned, as in SFT)
                      target [N] float32 (kto: 1 desirable / 0 not; scored: the reward)
  <out>/manifest.json kind "preference", its `rows` kind (pairs / kto / scored), counts

An over-long example (prompt + response over `max_tokens`) keeps the end of its prompt (at
least half the budget) and then the start of its response, and is counted as `truncated`; with
`overlong: drop` it is left out and counted as `dropped_overlong`.
Splits: the files' own val files, or a fixed `val_fraction` of the train rows (by row number,
as in SFT). The whole stage is written atomically.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlxcore import lineage
from mlxcore.data import records
from mlxcore.data import tokenizer as tokenizers
from mlxcore.data.inputs import SPLITS, resolve_inputs
from mlxcore.data.pretokenize import Holdout, byte_bar, render_chat, report_bytes
from mlxcore.data.records import DataError
from mlxcore.io import atomic_dir, path_digest, read_manifest, write_manifest
from mlxcore.preference import formats

RESPONSES = {"pairs": 2, "kto": 1, "scored": 1}
BATCH = 512
WARN_SKIPPED = 5


def file_format(path: Path, fmt: str) -> str:
    """The declared format, or the one the file's first row shows."""
    for chunk, _ in records.read_chunks(path, rows=1):
        items = records.chunk_items(chunk)
        if items:
            lineno, payload = items[0]
            row = records.decode_row(str(path), lineno, payload)
            return formats.detect_format(row, f"{path}:{lineno}") if fmt == "auto" else fmt
    raise DataError(f"{path}: no rows (empty file)")


def iter_examples(path: Path, fmt: str, opts: dict, skipped: collections.Counter, skipped_where: list):
    """(where, example, bytes read) of every usable row of one file; unusable ones are counted."""
    for chunk, pos in records.read_chunks(path):
        for lineno, payload in records.chunk_items(chunk):
            where = f"{path}:{lineno}"
            row = records.decode_row(str(path), lineno, payload)
            try:
                yield where, formats.to_example(row, fmt, opts, where), pos
            except formats.Skip as s:
                skipped[s.reason] += 1
                if len(skipped_where) < WARN_SKIPPED:
                    skipped_where.append(f"{where}: {s.reason}")


class Renderer:
    """Prompt and response texts of examples, through the tokenizer's chat template."""

    def __init__(self, tok):
        self.tok, self.eos = tok, tok.eos_token or ""

    def prompt(self, messages: list[dict], where: str = "") -> str:
        return self._render(messages, where, add_generation_prompt=True)

    def _render(self, messages: list[dict], where: str, **kwargs) -> str:
        try:
            return render_chat(self.tok, messages, **kwargs)
        except DataError as e:  # a template that refuses the conversation (e.g. roles that must alternate)
            raise DataError(f"{where}: {e}" if where else str(e)) from None

    def response(self, messages: list[dict], prompt_text: str, reply: str, where: str) -> tuple[str, str]:
        """(the reply through its end-of-turn token, the template's text after it)."""
        full = self._render(messages + [{"role": "assistant", "content": reply}], where)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template is not prefix-stable; cannot split prompt and response")
        answer = full[len(prompt_text):]
        cut = answer.rfind(self.eos) + len(self.eos) if self.eos and self.eos in answer else len(answer)
        return answer[:cut], answer[cut:]

    def encode(self, backend, messages: list[dict], replies: list[str], where: str = "") -> tuple[list, list, list]:
        """(prompt ids, [reply + tail ids], [reply token counts]): each piece encoded on its own, as SFT does."""
        prompt_text = self.prompt(messages, where)
        pieces = [prompt_text]
        for reply in replies:
            pieces += self.response(messages, prompt_text, reply, where)
        ids = [e.ids for e in backend.encode_batch(pieces, add_special_tokens=False)]
        return ids[0], [ids[i] + ids[i + 1] for i in range(1, len(ids), 2)], [len(ids[i]) for i in range(1, len(ids), 2)]


def fit_lengths(prompt: list[int], responses: list[list[int]], trained: list[int], max_tokens: int | None):
    """(prompt, responses, reply counts, truncated): one prompt cut for all responses, so each fits `max_tokens`."""
    longest = max(map(len, responses))
    if not max_tokens or len(prompt) + longest <= max_tokens:
        return prompt, responses, trained, False
    keep = max(min(len(prompt), max_tokens // 2), max_tokens - longest)
    prompt = prompt[len(prompt) - keep:] if keep else []
    responses = [r[: max_tokens - len(prompt)] for r in responses]
    return prompt, responses, [min(t, len(r)) for t, r in zip(trained, responses)], True


class _Split:
    def __init__(self, n_responses: int):
        self.r = n_responses
        self.prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        self.trained: list[int] = []
        self.targets: list[float] = []

    def add(self, prompt: list[int], responses: list[list[int]], trained: list[int], target: float) -> None:
        self.prompts.append(prompt)
        self.responses.extend(responses)
        self.trained.extend(trained)
        self.targets.append(target)

    def save(self, path: Path) -> dict:
        def ragged(lists):
            off = np.zeros(len(lists) + 1, dtype=np.int64)
            off[1:] = np.cumsum([len(x) for x in lists])
            flat = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(off[-1]))
            return flat, off

        p, p_off = ragged(self.prompts)
        r, r_off = ragged(self.responses)
        np.savez(path, prompt=p, prompt_off=p_off, response=r, response_off=r_off,
                 response_train=np.asarray(self.trained, dtype=np.int32),
                 target=np.asarray(self.targets, dtype=np.float32))
        return {"examples": len(self.prompts), "prompt_tokens": int(p_off[-1]), "response_tokens": int(r_off[-1])}


def pretokenize(inputs: Any, tokenizer_dir: str | Path, out_dir: str | Path, *, source: dict | None = None,
                max_tokens: int | None = None, on_progress: Callable[[int, int], None] | None = None,
                progress_bar: bool = True) -> dict:
    """Tokenize preference files (`{split: [files | download dirs]}`) into `out_dir`; its manifest."""
    opts = dict(source or {})
    fmt = opts.get("format", "auto")
    files = resolve_inputs(inputs, "preference")
    tok = tokenizers.load(tokenizer_dir)
    tok_digest = tokenizers.digest(tokenizer_dir)
    backend, render = tok.backend_tokenizer, Renderer(tok)
    file_formats = {p: file_format(p, fmt) for ps in files.values() for p in ps}
    kinds = {formats.kind_of(f) for f in file_formats.values()}
    if len(kinds) > 1:
        raise DataError("preference files mix kinds: " + ", ".join(f"{p} ({f})" for p, f in file_formats.items())
                        + "; pairs, KTO rows and scored rows train different objectives")
    kind = kinds.pop()
    n_resp = RESPONSES[kind]
    stats, skipped, skipped_where = collections.Counter(), collections.Counter(), []
    splits = {s: _Split(n_resp) for s in SPLITS}
    holdout = None if files["val"] else Holdout(opts.get("val_fraction", 0.05), opts.get("val_max_rows", 500))
    total = sum(p.stat().st_size for ps in files.values() for p in ps) or 1
    bar = byte_bar(total, "pretokenize preference") if progress_bar else None
    done = 0

    def flush(split: str, pending: list) -> None:
        route = holdout(len(pending)) if (split == "train" and holdout is not None) else np.zeros(len(pending), bool)
        for (target, prompt, responses, trained), to_val in zip(pending, route):
            if not all(trained):
                stats["dropped_empty"] += 1
                continue
            prompt, responses, trained, cut = fit_lengths(prompt, responses, trained, max_tokens)
            if cut and opts.get("overlong") == "drop":
                stats["dropped_overlong"] += 1
                continue
            stats["truncated"] += int(cut)
            splits["val" if to_val else split].add(prompt, responses, trained, target)
        pending.clear()

    try:
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:
                for path in files[split]:
                    pending, base = [], done
                    for where, ex, pos in iter_examples(path, file_formats[path], opts, skipped, skipped_where):
                        stats["rows"] += 1
                        replies = ([ex["chosen"], ex["rejected"]] if kind == "pairs"
                                   else [ex["completion"]] if kind == "kto" else [ex["response"]])
                        target = float(ex.get("label", ex.get("reward", 0.0)))
                        pending.append((target, *render.encode(backend, ex["prompt"], replies, where)))
                        if len(pending) >= BATCH:
                            flush(split, pending)
                        done = base + pos
                        report_bytes(bar, on_progress, done, total)
                    flush(split, pending)
                    done = base + path.stat().st_size
            report_bytes(bar, on_progress, total, total)
            counts = {s: splits[s].save(tmp / f"{s}.npz") for s in SPLITS}
            if counts["train"]["examples"] == 0:
                raise DataError(f"no usable preference rows for training (read {stats['rows']} rows, skipped "
                                f"{dict(skipped)}, {dict(stats)}){_first(skipped_where)}")
            if counts["val"]["examples"] == 0:
                raise DataError("no held-out preference rows: raise val_fraction or give val files")
            if kind == "kto" and len({*splits["train"].targets}) < 2:
                raise DataError("KTO rows need both desirable (label true) and undesirable (label false) completions")
            if skipped_where:
                print(f"preference data: skipped {dict(skipped)}{_first(skipped_where)}", file=sys.stderr)
            config = {"inputs": {s: [path_digest(p) for p in ps] for s, ps in files.items()}, "tokenizer": tok_digest,
                      "format": opts, "max_tokens": max_tokens}
            return write_manifest(tmp, "preference", config, rows=kind, responses=n_resp, vocab_size=len(tok),
                                  splits=counts, stats={"rows": 0, "truncated": 0, **stats},
                                  skipped={"identical": 0, "no_prompt": 0, **skipped}, skipped_examples=skipped_where,
                                  formats={Path(k).name: v for k, v in file_formats.items()},
                                  pad_id=tokenizers.special_ids(tok)["pad"] or 0,
                                  **lineage.fields(lineage.of_inputs(inputs)))
    finally:
        if bar is not None:
            bar.close()


def _first(wheres: list[str]) -> str:
    return ("; e.g. " + "; ".join(wheres)) if wheres else ""


class Examples:
    """One split of a tokenized preference dir, as arrays (small: held in memory)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.manifest = read_manifest(data_dir, "preference")
        with np.load(Path(data_dir) / f"{split}.npz") as z:
            self.prompt, self.prompt_off = z["prompt"], z["prompt_off"]
            self.response, self.response_off = z["response"], z["response_off"]
            self.target, self.response_train = z["target"], z["response_train"]
        self.rows, self.r = self.manifest["rows"], self.manifest["responses"]

    def __len__(self) -> int:
        return len(self.target)

    def prompt_ids(self, i: int) -> np.ndarray:
        return self.prompt[self.prompt_off[i]: self.prompt_off[i + 1]]

    def response_ids(self, i: int, j: int = 0) -> tuple[np.ndarray, int]:
        """(the response's ids: reply + template tail, how many are the reply)."""
        k = i * self.r + j
        return self.response[self.response_off[k]: self.response_off[k + 1]], int(self.response_train[k])
