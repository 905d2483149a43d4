"""The built-in RL rewards and what every reward shares: `Sample`, `RewardError`, the
`@reward_function` decorator, and the GSM8K answer helpers. `mlxcore.rl.rewards` documents the
terms and re-exports all of this; its `Scorer` runs them.

GSM8K helpers (small pure functions, as before):

`extract_answer(text)`: the number after the last `#### ` line, else the final answer the
response states by the distill checker's rule (`mlxcore.bench.answers.final_number`: an
`Answer:` line or `\\boxed{}`, else a concluding final statement such as "So she has 12 left." or
"3 x 4 = 12"), normalised: thousands commas, a currency sign, a trailing full stop or `%` and zero
decimals go ("$1,234.00" -> "1234", "-3", "12.5", "3/4" -> "0.75"). None when the response states
no final answer: there is no "last number anywhere" fallback, so a response that restates the
question (its numbers, even the right one) earns no correctness reward.
`gsm8k_truth(answer)`: the same applied to a GSM8K `answer` field (its `#### n` line).
`correctness_reward`: 1.0 when the two are equal, else 0.0.
`format_reward`: 1.0 when the response ends with a `#### <number>` line (optionally followed by
the end-of-turn text only), the format GSM8K's worked answers use.
`reward(response, truth, format_weight)`: correctness + format_weight x format (the old fixed reward).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mlxcore.bench.answers import final_number, number_from_candidate

_HASHES = re.compile(r"^[ \t]*####[ \t]*(?P<rest>[^\n]*)$", re.M)
_FORMAT = re.compile(r"####[ \t]*[-+$]?[\d,]*\.?\d+[ \t]*\.?\s*\Z")


# ------------------------------------------------------------------------------ GSM8K helpers


def extract_answer(text: str) -> str | None:
    """The response's final answer, normalised; None when it states none."""
    if not text:
        return None
    marked = _HASHES.findall(text)
    if marked:
        found = number_from_candidate(marked[-1].strip())
        if found is not None:
            return found
    return final_number(text)


def gsm8k_truth(answer: str) -> str:
    """The normalised final number of a GSM8K `answer` field (`... #### 72`)."""
    truth = extract_answer(answer)
    if truth is None:
        raise ValueError(f"no final number in GSM8K answer {answer[-80:]!r}")
    return truth


def correctness_reward(response: str, truth: str) -> float:
    return 1.0 if extract_answer(response) == truth else 0.0


def format_reward(response: str) -> float:
    return 1.0 if _FORMAT.search(response.strip()) else 0.0


def reward(response: str, truth: str, format_weight: float = 0.0) -> float:
    """Correctness (0/1) plus `format_weight` x the format reward."""
    return correctness_reward(response, truth) + format_weight * format_reward(response)


# ------------------------------------------------------------------------------ samples, errors


@dataclass
class Sample:
    """One sampled completion of one prompt, as the rewards see it."""

    id: str                                  # "<prompt id>/<sample index>"
    where: str                               # the source row, "train.jsonl:12"
    prompt: str                              # the last user message's text
    messages: list[dict]                     # the prompt messages (system, user, ...)
    completion: str
    reference: dict[str, Any] = field(default_factory=dict)  # the row's reference fields: {"answer": ..., ...}
    completion_tokens: int = 0
    truncated: bool = False                  # generation hit max_tokens
    max_tokens: int = 0


class RewardError(ValueError):
    """A reward function failed on a sample, or a reward configuration is wrong. For a failure on
    a sample, `file` ("built-in" for built-ins), `function`, `sample_id` and `where` say which."""

    def __init__(self, message: str, *, file: str | None = None, function: str | None = None,
                 sample_id: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.file, self.function, self.sample_id, self.where = file, function, sample_id, where


BUILTIN = "built-in"
ACCURACY_ATTR = "__reward_accuracy__"
NAME_ATTR = "__reward_name__"


def reward_function(name: str | Callable | None = None, *, accuracy: bool = False):
    """Mark a function of a rewards file as a reward named `name` (default: its own name), also
    when that name is private or the function comes from a helper module; `accuracy=True` makes it
    an accuracy term (the iteration's `accuracy` metric). Usable bare (`@reward_function`) too."""
    def mark(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"reward_function: {fn!r} is not callable")
        reward_name = name if isinstance(name, str) else getattr(fn, "__name__", None)
        if not reward_name:
            raise TypeError(f"reward_function: name the reward of {fn!r} (it has no __name__)")
        setattr(fn, NAME_ATTR, reward_name)
        setattr(fn, ACCURACY_ATTR, bool(accuracy))
        return fn
    if callable(name) and not isinstance(name, str):
        return mark(name)
    return mark


# ------------------------------------------------------------------------------ built-ins


def _answer(sample: Sample, reward_name: str) -> Any:
    if "answer" not in sample.reference or sample.reference["answer"] is None:
        have = ", ".join(sorted(sample.reference)) or "none"
        raise LookupError(f"the row has no `answer` reference field ({reward_name} compares with it; its reference "
                          f"fields: {have}; map a column with data.columns: {{answer: <column>}})")
    return sample.reference["answer"]


@lru_cache(maxsize=65536)
def _reference_number(answer: str) -> str | None:
    return extract_answer(answer) or number_from_candidate(answer)


def numeric_match(sample: Sample) -> float:
    answer = _answer(sample, "numeric_match")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TypeError(f"reference answer {answer!r} is a {type(answer).__name__}, not a number or text")
    truth = _reference_number(answer if isinstance(answer, str) else repr(answer))
    if truth is None:
        raise ValueError(f"reference answer {str(answer)[-80:]!r} states no number")
    return 1.0 if extract_answer(sample.completion) == truth else 0.0


def _drop_punctuation(text: str) -> str:
    return " ".join("".join(" " if c in string.punctuation or unicodedata.category(c).startswith("P") else c
                            for c in text).split())


def _norm_text(text: str, ignore_case: bool, strip_punctuation: bool) -> str:
    text = text.strip()
    if strip_punctuation:
        text = _drop_punctuation(text)
    return text.casefold() if ignore_case else text


def exact_match(sample: Sample, ignore_case: bool = True, strip_punctuation: bool = False,
                contains: bool = False) -> float:
    answer = _answer(sample, "exact_match")
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    got = _norm_text(sample.completion, ignore_case, strip_punctuation)
    for a in answers:
        want = _norm_text(str(a), ignore_case, strip_punctuation)
        if (want in got) if contains else (got == want):
            return 1.0
    return 0.0


def gsm8k_format(sample: Sample) -> float:
    return format_reward(sample.completion)


def format_match(sample: Sample, pattern: str, search: bool = False, ignore_case: bool = False) -> float:
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    rx = re.compile(pattern, flags)
    text = sample.completion.strip()
    return 1.0 if (rx.search(text) if search else rx.fullmatch(text)) else 0.0


def overlong(sample: Sample, buffer: int | None = None) -> float:
    max_tokens, n = sample.max_tokens, sample.completion_tokens
    if sample.truncated:
        return -1.0
    if max_tokens <= 0:
        raise ValueError(f"overlong needs the sample's max_tokens (got {max_tokens})")
    if n >= max_tokens:
        return -1.0
    buffer = max_tokens // 4 if buffer is None else buffer
    start = max_tokens - buffer
    if buffer <= 0 or n <= start:
        return 0.0
    return -(n - start) / buffer


def length(sample: Sample, target: int | None = None) -> float:
    if sample.max_tokens <= 0:
        raise ValueError(f"length needs the sample's max_tokens (got {sample.max_tokens})")
    if target is None:
        return -sample.completion_tokens / sample.max_tokens
    return -abs(sample.completion_tokens - target) / sample.max_tokens


def repetition(sample: Sample, n: int = 3) -> float:
    words = sample.completion.lower().split()
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return -(len(grams) - len(set(grams))) / len(grams)


def _check_format(args: dict) -> None:
    try:
        re.compile(args["pattern"])
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern {args['pattern']!r} is not a regular expression: {e}") from None


def _check_positive_int(key: str, minimum: int) -> Callable[[dict], None]:
    def check(args: dict) -> None:
        v = args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return check


BUILTINS: dict[str, Callable[..., float]] = {
    "numeric_match": numeric_match,
    "exact_match": exact_match,
    "gsm8k_format": gsm8k_format,
    "format": format_match,
    "overlong": overlong,
    "length": length,
    "repetition": repetition,
}
ACCURACY_BUILTINS = frozenset({"numeric_match", "exact_match"})
_ARG_CHECKS: dict[str, Callable[[dict], None]] = {
    "format": _check_format,
    "overlong": _check_positive_int("buffer", 0),
    "length": _check_positive_int("target", 0),
    "repetition": _check_positive_int("n", 1),
}
SPECIAL = ("judge", "reward_model")
