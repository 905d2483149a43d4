"""The LLM judge: a reward (`judge` in RLConfig.rewards) asked of another model over HTTP.

`Judge(JudgeConfig, resolve_secret=None)` talks to the judge through the teacher client
(mlxcore.clients.chat.Teacher: Ollama or OpenAI-compatible, with its retries, backoff and
failure budget). `score(samples)` returns one reward per sample, score / max_score (0..1), or
None when the judge gave no score for it. It never raises for the judge's sake: an RL iteration
must not crash because the judge is slow, flaky or down.

Per sample, one user message is built from `JudgeConfig.template` (`str.format` placeholders:
{prompt} the last user message, {completion}, {reference} "Reference answer: <answer>\\n\\n" when
the row has an `answer` field, else "", {max_score}; other literal braces must be doubled). All
samples are sent at once through `Teacher.imap_unordered` (`teacher.workers` in flight); identical
judge prompts within one call are asked once.

The reply's score is its first number ("7", "Score: 7/10" -> 7, "**8**", "7.5"), after any
<think> block. A reply with no number, or one outside 0..max_score, is malformed: the sample is
asked again, up to `attempts` asks in all, then gets None. Transport failures (timeouts, HTTP
5xx / 429, dropped connections, unparsable bodies) are retried by the teacher client; a call it
could not recover (or a 4xx) leaves that sample None. When the client gives up (TeacherGaveUp:
its failure budget is spent), every sample not yet scored gets None, and so does every sample
of later calls (the give-up is sticky; a new Judge tries again).

`stats` (cumulative over the Judge's life):
  asked      judge requests issued (first asks and re-asks)
  scored     samples that got a score
  malformed  replies without a score in range
  reasks     requests repeated because of a malformed reply
  failed     samples left without a score (None)
  retries    attempts the teacher client retried (transport failures it recovered or not)
  gave_up    the teacher client gave up (its failure budget is spent)
  last_error the last failure, for people
  teacher    the teacher client's own counters
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Callable
from typing import Any

from mlxcore.clients.chat import Reply, Teacher, TeacherError, TeacherGaveUp

log = logging.getLogger(__name__)

PLACEHOLDERS = ("prompt", "completion", "reference", "max_score")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")


class _Score(float):
    """max_score in a template: '10' rather than '10.0' unless a format spec is given."""

    def __format__(self, spec: str) -> str:
        return format(float(self), spec or "g")


def check_template(template: str) -> None:
    """A ValueError when the template names a placeholder other than PLACEHOLDERS or is malformed."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"judge template: {e} (write literal braces as {{{{ and }}}})") from None
    for f in fields:
        base = re.split(r"[.\[!:]", f, maxsplit=1)[0]
        if base not in PLACEHOLDERS:
            raise ValueError(f"judge template: unknown placeholder {{{f}}} (the placeholders are "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}; write literal braces as {{{{ and }}}})")


def parse_score(text: str, max_score: float) -> float | None:
    """The first number of a judge's reply when it lies in 0..max_score, else None."""
    if not text:
        return None
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        value = float(m.group())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0 or value > max_score:
        return None
    return value


def reference_text(reference: dict[str, Any] | None) -> str:
    answer = (reference or {}).get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return ""
    if isinstance(answer, (list, tuple)):
        answer = " | ".join(map(str, answer))
    return f"Reference answer: {answer}\n\n"


class Judge:
    """The LLM judge of a JudgeConfig; thread-unsafe (one score() at a time); close() when done."""

    def __init__(self, config, resolve_secret: Callable[[str], str] | None = None) -> None:
        check_template(config.template)
        self.config = config
        self.teacher = Teacher(config.teacher, resolve_secret=resolve_secret)
        self._stats: dict[str, Any] = {"asked": 0, "scored": 0, "malformed": 0, "reasks": 0, "failed": 0,
                                       "retries": 0, "gave_up": False, "last_error": None}

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self.teacher.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The teacher client's health check (raises TeacherError): for a run's start, not scoring."""
        return self.teacher.health()

    @property
    def stats(self) -> dict[str, Any]:
        t = self.teacher.stats
        return {**self._stats, "retries": t["retries"], "gave_up": self._stats["gave_up"] or t["gave_up"],
                "teacher": t}

    # ---------------------------------------------------------------- scoring

    def render(self, sample) -> str:
        """The judge's user message for a sample."""
        return self.config.template.format(prompt=sample.prompt, completion=sample.completion,
                                           reference=reference_text(sample.reference),
                                           max_score=_Score(self.config.max_score))

    def _jobs(self, todo: list[int], prompts: list[str], asks: dict[int, int]):
        for j in todo:  # counted as the client takes them (none after a give-up)
            asks[j] += 1
            self._stats["asked"] += 1
            yield j, [{"role": "user", "content": prompts[j]}]

    def score(self, samples: list) -> list[float | None]:
        """score / max_score per sample, None where the judge gave no score. Never raises for
        the judge's failures (see the module doc)."""
        samples = list(samples)
        if not samples:
            return []
        texts: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            texts.setdefault(self.render(s), []).append(i)
        prompts = list(texts)
        scores: dict[int, float] = {}
        asks = dict.fromkeys(range(len(prompts)), 0)
        todo = list(range(len(prompts)))
        max_score = self.config.max_score
        try:
            while todo:
                again: list[int] = []
                for j, result in self.teacher.imap_unordered(self._jobs(todo, prompts, asks)):
                    if isinstance(result, TeacherError):
                        self._stats["last_error"] = f"{result.kind}: {result}"
                        continue  # unrecovered after the client's retries: no score
                    assert isinstance(result, Reply)
                    value = parse_score(result.text, max_score)
                    if value is not None:
                        scores[j] = value
                        continue
                    self._stats["malformed"] += 1
                    self._stats["last_error"] = f"malformed: no score in 0..{max_score:g} in {result.text[:80]!r}"
                    if asks[j] < self.config.attempts:
                        again.append(j)
                self._stats["reasks"] += len(again)
                todo = sorted(again)
        except TeacherGaveUp as e:
            self._stats["gave_up"] = True
            self._stats["last_error"] = str(e)
            log.warning("the judge gave up; samples without a score get no reward: %s", e)
        except Exception as e:  # never crash the iteration because of the judge
            self._stats["last_error"] = f"{type(e).__name__}: {e}"
            log.warning("the judge failed; samples without a score get no reward: %s: %s", type(e).__name__, e)
        out: list[float | None] = [None] * len(samples)
        for j, text in enumerate(prompts):
            if j in scores:
                for i in texts[text]:
                    out[i] = scores[j] / max_score
        n_scored = sum(v is not None for v in out)
        self._stats["scored"] += n_scored
        self._stats["failed"] += len(samples) - n_scored
        return out
