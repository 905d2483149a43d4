"""Rule-based scoring of a model's reply to a benchmark `Example`.

A closed `<think>...</think>` block is dropped first (`strip_think`); a reply whose reasoning was
never closed has no answer and is invalid. A verbatim echo of the prompt is dropped as well: what
restates the question is not an answer, so a reply that only restates it is invalid (for "ints",
the prompt's own numbers, one of which may be the gold answer's, are never read as the answer).
Then, by `Example.kind`:

  choice  the letter ("B", "(B)", "B)", "B.", "Answer: B", "The answer is B", "B) 82") or the
          text of one option as the whole reply; as a last resort the single capital letter A-D
          standing alone in the reply. Two different letters, or none, is invalid.
  ints    the last N integers of the reply, N = the gold answer's count (negatives allowed);
          fewer than N is invalid.
  json    the first "{" from which a JSON object decodes (fences and prose around it are fine);
          none is invalid. Correct iff same keys, numerically equal values (12.0 == 12, "12" is
          not a number, nor is true).
  exact   `normalise`d reply equals the `normalise`d gold; empty after normalising is invalid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mlxcore.bench.suites import LETTERS, Example
from mlxcore.bench.answers import strip_think


@dataclass(frozen=True)
class Score:
    correct: bool
    valid: bool          # the reply had a parsable answer of the right shape
    parsed: str | None   # the extracted answer, normalised


INVALID = Score(correct=False, valid=False, parsed=None)

_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is\b\s*:?|\s*:)\s*")
_WRAPPERS = "\"'`"
_LETTER_FORM = re.compile(
    r"(?:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
    r"\(?([a-z])(?:\)|[.:,]|(?=\s)|$)\s*(.*)", re.S)
_LETTER_TOKEN = re.compile(r"(?<![A-Za-z0-9])\(?([A-Za-z])\)?(?![A-Za-z0-9])")
_INT = re.compile(r"(?<![0-9A-Za-z])-?\d+")


def normalise(text: str) -> str:
    """Lowercase; drop markdown `**`, surrounding quotes/backticks, a trailing period and a leading
    "answer:" / "the answer is"; strip and collapse whitespace."""
    text = " ".join(text.replace("**", "").lower().split())
    while True:
        before = text
        text = _PREFIX.sub("", text).strip().strip(_WRAPPERS).strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        if text == before:
            return text


def score(ex: Example, reply: str) -> Score:
    """Score `reply` against `ex` (see the module docstring for the rules per kind)."""
    text = strip_think(reply)
    if text is None:
        return INVALID
    if ex.prompt.strip() and ex.prompt.strip() in text:
        text = text.replace(ex.prompt.strip(), "\n")
        if not re.search(r"[^\W_]", text):
            return INVALID  # the reply only restates the question
    if ex.kind == "choice":
        return _score_choice(ex, text)
    if ex.kind == "ints":
        return _score_ints(ex, text)
    if ex.kind == "json":
        return _score_json(ex, text)
    if ex.kind == "exact":
        parsed = normalise(text)
        if not parsed:
            return INVALID
        return Score(correct=parsed == normalise(ex.answer), valid=True, parsed=parsed)
    raise ValueError(f"unknown example kind {ex.kind!r} (example {ex.id})")


def _resolve_letter(options: tuple[str, ...], text: str) -> str | None:
    """The letter the reply picks, or None when it picks none or several."""
    letters = LETTERS[:len(options)]
    opts = [normalise(o) for o in options]
    reply = normalise(text)
    if not reply:
        return None
    m = _LETTER_FORM.fullmatch(reply)
    letter, rest = (m.group(1).upper(), normalise(m.group(2))) if m else ("", "")
    if m and not rest:  # the reply is a lone letter ("B", "(B)", "Answer: B"; "E" is invalid)
        return letter if letter in letters else None
    if m and letter in letters:
        if rest in opts:  # "B) 82": the text must be that letter's option
            return letter if letters[opts.index(rest)] == letter else None
        # "b because ...": the leading letter, unless the rest names another ("a or b").
        others = {c.upper() for c in _LETTER_TOKEN.findall(rest) if c != "a"}
        found = {letter, *_LETTER_TOKEN.findall(text), *others} & set(letters)
        return found.pop() if len(found) == 1 else None
    if reply in opts:
        return letters[opts.index(reply)]
    found = set(_LETTER_TOKEN.findall(text)) & set(letters)
    return found.pop() if len(found) == 1 else None


def _score_choice(ex: Example, text: str) -> Score:
    letter = _resolve_letter(ex.options, text)
    if letter is None:
        return INVALID
    return Score(correct=letter == ex.answer, valid=True, parsed=letter)


def _score_ints(ex: Example, text: str) -> Score:
    gold = [int(t) for t in _INT.findall(ex.answer)]
    got = [int(t) for t in _INT.findall(text)]
    if len(got) < len(gold):
        return INVALID
    got = got[len(got) - len(gold):]
    return Score(correct=got == gold, valid=True, parsed=" ".join(map(str, got)))


def _first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _score_json(ex: Example, text: str) -> Score:
    obj = _first_json_object(text)
    if obj is None:
        return INVALID
    gold = json.loads(ex.answer)
    correct = obj.keys() == gold.keys() and all(
        _is_number(obj[k]) and _is_number(g) and obj[k] == g for k, g in gold.items())
    return Score(correct=correct, valid=True, parsed=json.dumps(obj, sort_keys=True))
