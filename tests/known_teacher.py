"""A teacher whose answers are known: right for a fixed 70% of the prompts with a ground truth.

`KnownTeacher(cfg).answer` plugs into the Ollama stand-in; `assert_clean(path, n)` checks a rows
file: n complete JSON lines, no duplicate, only right answers or well-formed knowledge rows.

`KnownTeacher(cfg, restate=0.25, styled=True)` is a sloppier teacher: for a fixed share of the
prompts with a ground truth (`restates(p, share)`, fixed by the id) it answers nothing, only
restating the question with its numbers and the right answer's number among them ("It depends;
... first, then …", "We need to use 28 and 56 and 56."); the others get their right or wrong
answer written in one of the accepted styles (`Answer:`, `####`, `\\boxed{}`, bold, "the answer
is", "so the total is", "= 42", a think block, ...; numbers with a unicode minus, thousands
commas or as a fraction), the style fixed by the id.

`KnownTeacher(cfg, first_wrong=0.5)` is a sampled teacher: for a fixed share of the prompts it
answers right (`first_wrong_on(p, share)`, fixed by the id) its first ask gets a wrong final answer
(`wrong_value`) and every later ask the right one, so a re-run that asks a rejected prompt again
gets it right. The prompts it answers wrong (`is_right` false) get the same wrong reply every time.
`asked()` counts the requests per prompt.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from fractions import Fraction
from pathlib import Path

from mlxcore.distill import prompts as prompt_gen


def _bucket(salt: str, p, n: int) -> int:
    return int(hashlib.sha256(f"{salt}{p.id}".encode()).hexdigest(), 16) % n


def is_right(p) -> bool:
    """70% of the prompts with a ground truth get a right answer; which ones is fixed by the id."""
    return int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 10 < 7


def restates(p, share: float) -> bool:
    """Whether a restating teacher answers prompt `p` (with a truth) by restating it; fixed by the id."""
    return share > 0 and p.truth is not None and _bucket("restate/", p, 1000) < share * 1000


# Accepted ways to state a final answer v (each must be accepted when v is right).
NUMBER_STYLES = (
    lambda v: f"Working through it step by step gives the result.\nAnswer: {v}",
    lambda v: f"Step by step, as GSM8K does.\n#### {v}",
    lambda v: f"Putting the steps together gives $\\boxed{{{v}}}$.",
    lambda v: f"Adding it all up:\n\n**{v}**",
    lambda v: f"Let me work it out.\n\n**Answer: {v}**",
    lambda v: f"Let me work it out.\n\n**Answer:** {v}",
    lambda v: f"Let me work it out.\n\nAnswer:\n{v}",
    lambda v: f"Checked twice.\nFinal answer: {v}",
    lambda v: f"Each step checks out, so the total is {v}.",
    lambda v: f"After simplifying, the answer is {v}.\n\nHope this helps!",
    lambda v: f"Combining the steps, the result is {v}.",
    lambda v: f"First the inner part, then the rest:\nvalue = {v}",
    lambda v: f"<think>\nLet me be careful here.\n</think>\n\nTherefore the final value is {v}.",
)
WORD_STYLES = (
    lambda v: f"Reasoning it through.\nAnswer: {v}",
    lambda v: f"Reasoning it through.\n\n**Answer: {v}**",
    lambda v: f"Reasoning it through.\nFinal answer: {v}",
    lambda v: f"Reasoning it through.\nAnswer:\n{v}",
    lambda v: f"<think>hmm</think>\nAnswer: {v}",
)


def spell(truth: str, style: int) -> str:
    """A number the way a model may write it: unicode minus, thousands commas or a fraction."""
    f = Fraction(truth)
    if f < 0 and style % 2:
        return "\u2212" + spell(str(-f), style)
    if f.denominator == 1 and abs(f) >= 1000 and style % 3 != 2:
        return f"{int(f):,}"
    if f.denominator != 1 and style % 3 == 0:
        return f"{f.numerator}/{f.denominator}"
    return truth


def restatement(p) -> str:
    """No answer: the question again, its numbers and the right answer's number, no conclusion."""
    q = p.text.split("\n\n")[0]
    nums = re.findall(r"\d+(?:\.\d+)?", q) + [p.truth]
    return (
        f"It depends; {q[0].lower()}{q[1:]} First compute with {', '.join(nums)}, then …",
        f"The question says: {q}\nWe need to use {' and '.join(nums)}.",
        f"To find this we take {', '.join(nums)}",
        f"{q}\nI will work through the steps with {nums[-1]} in mind and",
        f"Let me restate it. {q} The numbers to look at are {', '.join(nums)}.",
    )[_bucket("how/", p, 5)]


def first_wrong_on(p, share: float) -> bool:
    """Whether a sampled teacher answers prompt `p` wrong on its first ask (a fixed share of the
    prompts it answers right, fixed by the id)."""
    return share > 0 and p.truth is not None and is_right(p) and _bucket("first-wrong/", p, 1000) < share * 1000


class KnownTeacher:
    def __init__(self, cfg: prompt_gen.PromptConfig, n: int = 600, *, restate: float = 0.0, styled: bool = False,
                 first_wrong: float = 0.0):
        self.bank = {p.text: p for p in prompt_gen.prompts(cfg, 0, n)}
        self.by_id = {p.id: p for p in self.bank.values()}
        self.restate, self.styled, self.first_wrong = restate, styled, first_wrong
        self.asks: collections.Counter = collections.Counter()
        self._lock = threading.Lock()  # the stand-in answers from several threads

    def reply(self, p) -> str:
        if p.truth is None:
            return (f"Here is a short, complete answer about the question you asked, written in plain sentences "
                    f"for a general reader, with one concrete example ({p.id}).")
        if restates(p, self.restate):
            return restatement(p)
        if not self.styled:
            if is_right(p):
                return f"Working through it step by step gives the result.\nAnswer: {p.truth}"
            return "I worked it out.\nAnswer: 987654321" if p.kind != "ordering" else "Answer: Nobody"
        value = p.truth if is_right(p) else wrong_value(p)
        if prompt_gen.ANSWER_TYPES[p.kind] == "number":
            style = _bucket("style/", p, len(NUMBER_STYLES))
            return NUMBER_STYLES[style](spell(value, style))
        return WORD_STYLES[_bucket("style/", p, len(WORD_STYLES))](value)

    def answer(self, messages) -> str:
        p = self.bank[messages[-1]["content"]]
        with self._lock:
            self.asks[p.id] += 1
            first = self.asks[p.id] == 1
        if first and first_wrong_on(p, self.first_wrong) and not restates(p, self.restate):
            return self.wrong_reply(p)
        return self.reply(p)

    def asked(self) -> dict[str, int]:
        """Requests per prompt id so far (a copy: the stand-in may still be answering)."""
        with self._lock:
            return dict(self.asks)

    @staticmethod
    def wrong_reply(p) -> str:
        """A sampled teacher's wrong first try: a stated final answer that is not the truth."""
        return f"I worked it out quickly.\nAnswer: {wrong_value(p)}"

    def kept(self, p) -> bool:
        """Whether a correct checker keeps this prompt's reply."""
        return p.truth is None or (is_right(p) and not restates(p, self.restate))

    def rows(self, path: str | Path) -> list[dict]:
        lines = Path(path).read_bytes().split(b"\n")
        assert lines[-1] == b""  # every line complete: nothing torn, nothing unparseable
        return [json.loads(line) for line in lines[:-1]]

    def assert_clean(self, path: str | Path, n: int) -> list[dict]:
        rows = self.rows(path)
        ids = [r["meta"]["id"] for r in rows]
        assert len(rows) == n and len(set(ids)) == n  # nothing lost past the target, nothing duplicated
        for r in rows:  # only verified rows: right answers, or well-formed knowledge answers
            p = self.by_id[r["meta"]["id"]]
            assert r["conversations"][:-1] == p.messages and r["meta"]["verified"] is True
            assert self.kept(p), r  # never a wrong answer, never a restated question
        return rows


def wrong_value(p) -> str:
    if p.kind == "syllogism":
        return next(a for a in ("yes", "no", "cannot tell") if a != p.truth)
    if p.kind == "ordering":
        return next(n for n in p.meta["names"] if n.lower() != p.truth.lower())
    return str(Fraction(p.truth) + 1)
