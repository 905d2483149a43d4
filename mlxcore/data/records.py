"""Reading raw JSONL rows with errors that name the file and line.

Row schemas (more formats arrive with the data issue):
  pretrain: {"text": str}
  sft:      {"conversations" | "messages": [{"role": system|user|assistant, "content": str}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:`."""


def _messages(row: dict, where: str) -> list[dict]:
    msgs = row.get("conversations", row.get("messages"))
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected a non-empty 'conversations' or 'messages' list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} needs 'role' in {sorted(ROLES)} and a string 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to learn from")
    if msgs[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; nothing prompts it")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_rows(path: str | Path, kind: str) -> Iterator[str | list[dict]]:
    """Yield pretraining texts (kind='pretrain') or message lists (kind='sft')."""
    path = Path(path)
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if kind == "pretrain":
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{where}: missing string field 'text'")
                yield row["text"]
            else:
                yield _messages(row, where)
            count += 1
    if count == 0:
        raise DataError(f"{path}: no rows (empty file)")
