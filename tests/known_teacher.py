"""A teacher whose answers are known: right for a fixed 70% of the prompts with a ground truth.

`KnownTeacher(cfg).answer` plugs into the Ollama stand-in; `assert_clean(path, n)` checks a rows
file: n complete JSON lines, no duplicate, only right answers or well-formed knowledge rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlxcore.distill import prompts as prompt_gen


def is_right(p) -> bool:
    """70% of the prompts with a ground truth get a right answer; which ones is fixed by the id."""
    return int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 10 < 7


class KnownTeacher:
    def __init__(self, cfg: prompt_gen.PromptConfig, n: int = 600):
        self.bank = {p.text: p for p in prompt_gen.prompts(cfg, 0, n)}
        self.by_id = {p.id: p for p in self.bank.values()}

    def answer(self, messages) -> str:
        p = self.bank[messages[-1]["content"]]
        if p.truth is None:
            return (f"Here is a short, complete answer about the question you asked, written in plain sentences "
                    f"for a general reader, with one concrete example ({p.id}).")
        if is_right(p):
            return f"Working through it step by step gives the result.\nAnswer: {p.truth}"
        return "I worked it out.\nAnswer: 987654321" if p.kind != "ordering" else "Answer: Nobody"

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
            assert p.truth is None or is_right(p), r
        return rows
