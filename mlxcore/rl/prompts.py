"""RL prompts from the rows users bring: each row becomes the messages the policy answers and the
reference fields its rewards see.

    load_prompts(["train.jsonl"], fmt="auto", columns={"prompt": "question"}, system_prompt=None)

Formats (`RLDataConfig.format`; `auto` decides per row, from its keys, after `columns` renamed them):
  gsm8k    {"question", "answer": "... #### 72"}: the question; reference {"answer": "72" (the final
           number, normalised), "solution": the worked answer, ...the row's other fields}
  prompt   {"prompt": text or a message list ending with a user turn, ...}: reference = every
           other field (`answer`, `tests`, `label`... whatever the reward functions read)
  chat     an SFT row (messages/conversations, instruction/output, prompt/completion,
           instruction/response): everything before the last assistant turn is the prompt,
           that turn is the reference `answer`
`columns` maps our field to the row's: {"prompt": "question", "answer": "solution"} reads the
prompt from `question` and the reference answer from `solution`. Every error names file:line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlxcore.data import records
from mlxcore.data.messages import message_list
from mlxcore.rl.rewards import gsm8k_truth

FORMATS = ("auto", "gsm8k", "prompt", "chat")


@dataclass(frozen=True)
class RLPrompt:
    id: str
    messages: list[dict]
    reference: dict = field(default_factory=dict)
    where: str = ""

    @property
    def truth(self) -> str | None:
        """The reference answer (GSM8K: the normalised final number), if the row has one."""
        answer = self.reference.get("answer")
        return None if answer is None else str(answer)


def _renamed(row: dict, columns: dict[str, str], where: str) -> dict:
    if not columns:
        return row
    missing = [theirs for theirs in columns.values() if theirs not in row]
    if missing:
        raise records.DataError(f"{where}: data.columns names {missing[0]!r}, which the row lacks "
                                f"(it has {sorted(row)[:8]})")
    out = {k: v for k, v in row.items() if k not in columns.values()}
    return out | {ours: row[theirs] for ours, theirs in columns.items()}


def row_format(row: dict, fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    if "question" in row and "answer" in row and not any(k in row for k in ("prompt", "messages", "conversations")):
        return "gsm8k"
    if "prompt" in row and not any(k in row for k in ("completion", "response")):
        return "prompt"
    try:
        records.detect_format(row, where)
    except records.DataError:
        raise records.DataError(f"{where}: cannot tell the RL format from the fields {sorted(row)[:8]}; expected a "
                                "`prompt` column (plus reference fields), gsm8k question/answer, or an SFT row "
                                "(messages, instruction/output, prompt/completion); or set data.format and "
                                "data.columns") from None
    return "chat"


def _reference(value) -> str:
    return value if isinstance(value, str) else str(value)


def to_prompt(row: dict, fmt: str, where: str) -> tuple[list[dict], dict]:
    """(prompt messages, reference fields) of one row in format `fmt` (not auto)."""
    if fmt == "gsm8k":
        question = records.string_field(row, "question", where, fmt)
        solution = records.string_field(row, "answer", where, fmt)
        try:
            truth = gsm8k_truth(solution)
        except ValueError as e:
            raise records.DataError(f"{where}: {e}") from None
        rest = {k: v for k, v in row.items() if k not in ("question", "answer")}
        return [{"role": "user", "content": question}], rest | {"answer": truth, "solution": solution}
    if fmt == "prompt":
        if "prompt" not in row:
            raise records.DataError(f"{where}: missing field 'prompt' (prompt format; map yours with data.columns)")
        value = row["prompt"]
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
        else:
            messages = message_list(value, where, "prompt")
            if messages[-1]["role"] != "user":
                raise records.DataError(f"{where}: the prompt's last message is from {messages[-1]['role']!r}; "
                                        "the policy answers a user turn")
        rest = {k: v for k, v in row.items() if k != "prompt"}
        if "answer" in rest and rest["answer"] is not None:
            rest["answer"] = _reference(rest["answer"])
        return messages, rest
    if fmt == "chat":
        sub = records.detect_format(row, where)
        if sub not in records.CHAT_FORMATS:
            raise records.DataError(f"{where}: a {sub} row has no assistant turn to take the reference from")
        msgs = records.to_example(row, sub, "sft", {}, where)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if not any(m["role"] == "user" for m in msgs[:last]):
            raise records.DataError(f"{where}: no user turn before the last assistant turn")
        return msgs[:last], {"answer": msgs[last]["content"]}
    raise records.DataError(f"{where}: unknown RL data format {fmt!r}; choose one of {', '.join(FORMATS)}")


def load_prompts(files: list[str | Path], fmt: str = "auto", columns: dict[str, str] | None = None,
                 system_prompt: str | None = None) -> list[RLPrompt]:
    """Every row of JSONL / JSON / parquet `files` as an RLPrompt (ids `<file stem>-<line>`)."""
    out = []
    for path in map(Path, files):
        for chunk, _ in records.read_chunks(path):
            for lineno, payload in records.chunk_items(chunk):
                where = f"{path}:{lineno}"
                row = _renamed(records.decode_row(str(path), lineno, payload), columns or {}, where)
                messages, reference = to_prompt(row, row_format(row, fmt, where), where)
                if system_prompt and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": system_prompt}] + messages
                out.append(RLPrompt(id=f"{path.stem}-{lineno}", messages=messages, reference=reference, where=where))
    if not out:
        raise records.DataError(f"no prompts in {', '.join(map(str, files))}")
    return out


def load_questions(files: list[str | Path], system_prompt: str | None = None) -> list[RLPrompt]:
    """GSM8K-style rows ({"question", "answer": "... #### n"}) of JSONL / JSON / parquet files."""
    return load_prompts(files, "gsm8k", None, system_prompt)


def warmup_source(fmt: str, columns: dict[str, str], first_row: dict | None = None) -> dict:
    """The SFT source options that train on the same rows' reference answers (the warmup stage)."""
    if fmt == "gsm8k" or (fmt == "auto" and first_row is not None and row_format(
            _renamed(first_row, columns, "first row"), "auto", "first row") == "gsm8k"):
        return {"format": "gsm8k"}
    if fmt in ("prompt", "auto") and (columns or (first_row is not None and "prompt" in first_row and "answer" in first_row)):
        return {"format": "instruction", "prompt_field": columns.get("prompt", "prompt"),
                "response_field": columns.get("answer", "answer")}
    return {"format": "auto"}
