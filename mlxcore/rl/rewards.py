"""GSM8K answers and rewards, as small pure functions.

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
the end-of-turn text only), the format GSM8K's worked answers use; it teaches the model where to
put its answer, and is weighted by `format_weight` in `reward`.
"""

from __future__ import annotations

import re

from mlxcore.bench.answers import final_number, number_from_candidate

_HASHES = re.compile(r"^[ \t]*####[ \t]*(?P<rest>[^\n]*)$", re.M)
_FORMAT = re.compile(r"####[ \t]*[-+$]?[\d,]*\.?\d+[ \t]*\.?\s*\Z")


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
