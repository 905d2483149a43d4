"""Acceptance checks for teacher replies: `check(prompt, reply, policy)` -> `Verdict`.

The final answer comes from `mlxcore.bench.answers` (`extract_answer` maps a prompt kind to its answer
type first; the rule a final answer follows is described there).
`check(prompt, reply, policy)` turns a reply into a `Verdict`: math / logic / reasoning replies
pass only when the extracted answer equals the prompt's truth ("correct"); a reply with no final
answer is rejected with reason "no_answer" (`NO_ANSWER`), one with a different answer with
"wrong answer: got ..., expected ...". Knowledge replies (no truth) pass format checks: length
bounds, no refusal, not cut off mid-sentence, no leftover think tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from mlxcore.bench.answers import _THINK_TAG, final_answer, normalize_choice, normalize_number
from mlxcore.distill.schema import ANSWER_TYPES, CategoryPolicy, VerifyPolicy  # noqa: F401  (re-exported)

__all__ = ["NO_ANSWER", "CategoryPolicy", "VerifyPolicy", "Verdict", "check", "extract_answer", "normalize_truth",
           "looks_like_refusal", "looks_truncated"]


NO_ANSWER = "no_answer"  # Verdict.reason of a reply that states no final answer (see the module doc)


@dataclass(frozen=True)
class Verdict:
    ok: bool  # keep the row
    reason: str  # "correct", "no_answer", "wrong answer: got 'x', expected 'y'", "refusal", ...
    extracted: str | None = None  # the normalised final answer (None for knowledge)
    verified: bool = False  # ok and actually checked (False for rows kept under verify=False)


def answer_type(kind: str) -> str | None:
    return ANSWER_TYPES.get(kind, "text")


def extract_answer(text: str, kind: str, choices: Iterable[str] | None = None,
                   prompt: str | None = None) -> str | None:
    """The reply's normalised final answer for a prompt kind (see the module doc), or None when
    it states none. `prompt` (the question's text) lets a final statement copied from the
    question count as a restatement, not an answer."""
    return final_answer(text, answer_type(kind), choices, prompt)


def normalize_truth(truth: str, kind: str) -> str | None:
    atype = answer_type(kind)
    if atype == "number":
        return normalize_number(truth)
    if atype == "choice":
        return normalize_choice(truth)
    if atype == "name":
        return truth.strip().lower()
    return truth.strip()


# ------------------------------------------------------------------------ knowledge checks

_REFUSAL = re.compile(
    r"\bI\s*(?:cannot|can\s*not|can't|am unable|'m unable|am not able|'m not able|won't|will not|"
    r"must decline|do not feel comfortable|don't feel comfortable)\b"
    r"|\bas an ai\b|\bas a language model\b|\bI'?m sorry\b|\bI am sorry\b|\bI apologi[sz]e\b"
    r"|\bsorry, (?:but )?I\b|\bI (?:do not|don't) have (?:access|the ability|enough information)\b",
    re.I)
_TERMINAL = tuple(".!?)]}\"'”’»*`…:")


def looks_like_refusal(text: str, head: int = 200) -> bool:
    """A refusal or an AI disclaimer in the reply's first `head` characters."""
    return bool(_REFUSAL.search(text.replace("\u2019", "'")[:head]))


def looks_truncated(text: str) -> bool:
    """The reply stops mid-sentence: an unclosed code fence, or a last line that is prose
    ending without closing punctuation (list items, table rows and headings may end bare)."""
    t = text.rstrip()
    if not t:
        return True
    if t.count("```") % 2:
        return True
    if t.endswith("```"):
        return False
    last = t.splitlines()[-1].strip()
    if re.match(r"^(?:[-*+•]|\d+[.)]|#{1,6}|\|)\s*", last) and not last.endswith((",", "-", "(")):
        return bool(re.search(r"\b(?:and|or|the|a|an|of|to|with|for|in|is|are)$", last, re.I))
    return not last.endswith(_TERMINAL)


# ------------------------------------------------------------------------------------- check

def check(prompt: Any, reply_text: str | None, policy: VerifyPolicy | None = None,
          finish_reason: str | None = None) -> Verdict:
    """Accept or reject a teacher reply to `prompt` (a `Prompt`: category, kind, truth, meta).

    `finish_reason` "length" (the teacher ran out of tokens) always rejects."""
    policy = policy or VerifyPolicy()
    cp = policy.for_category(prompt.category)
    text = reply_text or ""
    if not text.strip():
        return Verdict(False, "empty reply")
    if finish_reason == "length":
        return Verdict(False, "truncated (finish_reason=length)")
    choices = (prompt.meta or {}).get("names") if answer_type(prompt.kind) == "name" else None
    has_truth = prompt.truth is not None and answer_type(prompt.kind) is not None
    question = getattr(prompt, "text", None)
    extracted = extract_answer(text, prompt.kind, choices, question) if has_truth else None
    if not cp.verify:
        return Verdict(True, "unverified", extracted, verified=False)
    if policy.reject_think_tags and _THINK_TAG.search(text):
        return Verdict(False, "leftover <think> tag", extracted)
    n = len(text.strip())
    if n < cp.min_chars:
        return Verdict(False, f"too short ({n} < {cp.min_chars} chars)", extracted)
    if n > cp.max_chars:
        return Verdict(False, f"too long ({n} > {cp.max_chars} chars)", extracted)
    if not has_truth:
        if looks_like_refusal(text):
            return Verdict(False, "refusal")
        if looks_truncated(text):
            return Verdict(False, "truncated mid-sentence")
        return Verdict(True, "format ok", None, verified=True)
    if extracted is None:
        return Verdict(False, NO_ANSWER)
    expected = normalize_truth(prompt.truth, prompt.kind)
    if extracted != expected:
        return Verdict(False, f"wrong answer: got {extracted!r}, expected {expected!r}", extracted)
    return Verdict(True, "correct", extracted, verified=True)
