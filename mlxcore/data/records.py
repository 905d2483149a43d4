"""Raw rows in, training examples out, with errors that name the file and line.

Files are read as chunks by `mlxcore.data.files` (JSONL, JSON arrays, txt, CSV / TSV, parquet,
Arrow, and the text ones compressed); this module turns their rows into examples.

Each row becomes an example of one of these formats, declared (`SourceConfig.format`) or
detected from a file's first row:
  text           {"text": str}                                   pretraining text
  conversations  {"conversations" | "messages" | "conversation": [{"role", "content"}, ...]}
                 (Capybara's [{"input", "output"}, ...] turns too; also ShareGPT's
                 {"from": human|gpt|system, "value"}; content may be a list of text parts, and
                 an assistant message with "weight": 0 is context, not learned, as in OpenAI's format;
                 tool calling as OpenAI writes it: an assistant's "tool_calls", "tool" turns with
                 the results, the row's "tools" schemas, all rendered by the chat template;
                 the messages themselves: `mlxcore.data.messages`)
  instruction    {prompt_field, response_field} (default: the first of "prompt", "instruction",
                 "question", "query"; "response" or "completion"), or any fields through
                 `prompt_format` / `response_format` templates ("Q: {question}");
                 Dolly's {"instruction", "context", "response"}: the context follows the
                 instruction after a blank line, as Alpaca's input does; TRL's conversational
                 {"prompt": [messages], "completion": [messages]}: the completion is learned
  (instruction, alpaca and gsm8k rows: a "system" or "system_prompt" field is the system turn)
  alpaca         {"instruction", "input" (optional), "output"}
  gsm8k          {"question", "answer"}
  ids            {"ids": [int, ...]} and for SFT optionally {"mask": [0|1, ...]} or
                 {"labels": [int | -100, ...]}: pretokenized, used as they are
Every chat-like format becomes a message list (+ `system_prompt` when the row has none),
rendered later through the tokenizer's chat template with loss on assistant tokens only. For
pretraining, a chat-like row is rendered whole and every token is learned. A mixture source's
`columns` ({our field: its column}) renames a row's columns before all of this (`apply_columns`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Iterator

import orjson

from mlxcore.data.errors import DataError
# the file readers, re-exported: callers read files through records (records.read_chunks, ...)
from mlxcore.data.files import BOM, chunk_items, file_kind, read_chunks, utf8  # noqa: F401
from mlxcore.data.messages import Chat, message_list, tools_of

FORMATS = ("auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids")
# the instruction format's prompt, where `prompt_field` is not set: the first of these a row has
# ("prompt"; Dolly's "instruction"; OpenOrca's "question"; MetaMathQA's "query")
PROMPT_FIELDS = ("prompt", "instruction", "question", "query")
# a row's own system prompt (OpenOrca's "system_prompt"), ahead of the config's `system_prompt`
SYSTEM_FIELDS = ("system", "system_prompt")
CHAT_FORMATS = ("conversations", "instruction", "alpaca", "gsm8k")
# where a conversation may be: "conversations" (ShareGPT), "messages" (OpenAI, HF), "conversation"
# (LMSYS-Chat-1M's messages; Capybara's [{"input", "output"}] turns)
CONVERSATION_FIELDS = ("conversations", "messages", "conversation")


def decode_row(path: str, lineno: int, payload: Any, text_file: bool = False) -> dict:
    """A row dict from a chunk item; DataError naming file:line for anything else."""
    where = f"{path}:{lineno}"
    if isinstance(payload, dict):
        return payload
    if text_file:
        return {"text": utf8(payload, where)}
    try:
        row = orjson.loads(payload)
    except orjson.JSONDecodeError:  # the slow path names the bad byte or says what and where
        try:
            row = json.loads(utf8(payload, where))  # also takes what orjson refuses (NaN)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


# ---------------------------------------------------------------- formats


def first_row(path: str | Path) -> tuple[int, dict] | None:
    """The first row of a file, decoded, with its line number; None for a file without rows."""
    for chunk, _ in read_chunks(path, rows=1):
        items = chunk_items(chunk)
        if items:
            lineno, payload = items[0]
            return lineno, decode_row(str(path), lineno, payload, file_kind(Path(path)) == "txt")
    return None


def apply_columns(row: dict, columns: dict | None, where: str) -> dict:
    """The row with a source's columns renamed to our field names: `columns` maps our field <- its
    column ({"text": "body"}); the row's other columns stay. DataError naming a column it lacks."""
    if not columns:
        return row
    for ours, theirs in columns.items():
        if theirs not in row:
            raise DataError(f"{where}: no column {theirs!r} (columns maps it to {ours!r}); "
                            f"the row's columns: {sorted(row)[:12]}")
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({ours: row[theirs] for ours, theirs in columns.items()})
    return out


def detect_format(row: dict, where: str) -> str:
    """The format of a row, from its keys."""
    if "ids" in row:
        return "ids"
    if any(k in row for k in CONVERSATION_FIELDS):
        return "conversations"
    if "question" in row and "answer" in row:
        return "gsm8k"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if any(k in row for k in PROMPT_FIELDS) and ("response" in row or "completion" in row):
        return "instruction"
    if "text" in row:
        return "text"
    nested = [k for k, v in row.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    raise DataError(
        f"{where}: cannot tell the format from the fields {sorted(row)[:8]}; expected text, conversations/messages, "
        "instruction/response, alpaca (instruction/input/output), gsm8k (question/answer) or ids; "
        "or set format and the field names in the data config"
        + (f" (the field {nested[0]!r} holds a list of objects: if those are the rows, give them one per line)"
           if nested and not any(k in row for k in CONVERSATION_FIELDS) else "")
    )


def string_field(row: dict, name: str, where: str, fmt: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} ({fmt} format)")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def fill_template(tpl: str, row: dict, where: str, name: str) -> str:
    try:
        return tpl.format_map(row)
    except KeyError as e:
        raise DataError(f"{where}: {name} {tpl!r} needs field {e.args[0]!r}, which the row lacks") from None
    except (ValueError, IndexError, AttributeError) as e:
        raise DataError(f"{where}: {name} {tpl!r} cannot be filled: {e}") from None


def template_fields(tpl: str) -> list[str]:
    """Field names a str.format template uses (raises ValueError on a malformed one)."""
    return [name for _, name, _, _ in string.Formatter().parse(tpl) if name is not None]


def _messages(row: dict, where: str) -> list[dict]:
    value = row.get(next((k for k in CONVERSATION_FIELDS if k in row), "conversations"))
    if isinstance(value, list) and value and all(isinstance(t, dict) and "input" in t and "output" in t
                                                 and "role" not in t and "from" not in t for t in value):
        # Capybara's turns: [{"input": user, "output": assistant}, ...]
        value = [m for t in value for m in ({"role": "user", "content": t["input"]},
                                              {"role": "assistant", "content": t["output"]})]
    out = message_list(value, where)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise DataError(f"{where}: no assistant message to learn from" + (
            " (every one has weight 0)" if any(m["role"] == "assistant" for m in out) else ""))
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; nothing prompts it")
    return out


def _with_input(prompt: str, row: dict, field: str, where: str) -> str:
    """The instruction, then a blank line and the row's `field` (Alpaca's input, Dolly's context)
    when it has text."""
    extra = row.get(field) or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(extra).__name__}")
    return f"{prompt}\n\n{extra}" if extra.strip() else prompt


def _prompt_response(row: dict, fmt: str, opts: dict, where: str) -> tuple[str, str]:
    if opts.get("prompt_format"):
        prompt = fill_template(opts["prompt_format"], row, where, "prompt_format")
    elif fmt == "alpaca":
        prompt = _with_input(string_field(row, "instruction", where, fmt), row, "input", where)
    elif fmt == "gsm8k":
        prompt = string_field(row, "question", where, fmt)
    else:
        name = opts.get("prompt_field") or next((k for k in PROMPT_FIELDS if k in row), "prompt")
        prompt = string_field(row, name, where, fmt)
        if name == "instruction" and not opts.get("prompt_field"):
            # Dolly's rows: {instruction, context, response}; the context is the passage the
            # instruction is about (closed QA, summarisation), kept as Alpaca's input is
            prompt = _with_input(prompt, row, "context" if "context" in row else "input", where)
    if opts.get("response_format"):
        response = fill_template(opts["response_format"], row, where, "response_format")
    else:
        name = {"alpaca": "output", "gsm8k": "answer"}.get(fmt) or opts.get("response_field") or "response"
        if name not in row and name == "response" and "completion" in row:
            name = "completion"
        response = string_field(row, name, where, fmt)
    return prompt, response


def row_system(row: dict, where: str) -> str:
    """The row's own system prompt ("system" / "system_prompt"), or ""."""
    for name in SYSTEM_FIELDS:
        if name in row and row[name] is not None:
            if not isinstance(row[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
            return row[name] if row[name].strip() else ""
    return ""


def _conversational(row: dict, opts: dict) -> bool:
    """TRL's conversational prompt-completion rows: "prompt" and "completion" are message lists."""
    return (not opts.get("prompt_format") and not opts.get("prompt_field") and isinstance(row.get("prompt"), list)
            and isinstance(row.get("completion"), list))


def _prompt_completion_messages(row: dict, where: str) -> list[dict]:
    """The prompt's messages, then the completion's; only the completion's assistant turns are
    learned (as TRL's SFTTrainer does)."""
    prompt = message_list(row["prompt"], where, "prompt")
    completion = message_list(row["completion"], where, "completion")
    for m in prompt:
        if m["role"] == "assistant":
            m["weight"] = 0
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in completion):
        raise DataError(f"{where}: field 'completion' has no assistant message to learn from")
    if prompt[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; nothing prompts it")
    return prompt + completion


def to_example(row: dict, fmt: str, kind: str, opts: dict, where: str):
    """One example: `str` (text), a message list (chat), or `(ids, mask | None)` (ids)."""
    if fmt == "ids":
        return _ids(row, kind, where)
    if fmt == "text":
        if kind == "sft":
            raise DataError(f"{where}: plain text rows have no assistant turn to learn; use them for pretraining, "
                            "or declare a chat format")
        return string_field(row, opts.get("text_field") or "text", where, fmt)
    tools = None
    if fmt == "conversations":
        msgs, tools = _messages(row, where), tools_of(row, where)
    elif fmt == "instruction" and _conversational(row, opts):
        msgs = _prompt_completion_messages(row, where)
    elif fmt in CHAT_FORMATS:
        prompt, response = _prompt_response(row, fmt, opts, where)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        system = row_system(row, where)
        if system:
            msgs = [{"role": "system", "content": system}] + msgs
    else:
        raise DataError(f"{where}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opts.get("system_prompt") and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": opts["system_prompt"]}] + msgs
    return Chat(msgs, tools) if tools else msgs


def _int_list(value, name: str, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        raise DataError(f"{where}: field {name!r} must be a non-empty list of integers")
    return value


def _ids(row: dict, kind: str, where: str):
    ids = _int_list(row.get("ids"), "ids", where)
    mask = None
    if "mask" in row:
        mask = _int_list(row["mask"], "mask", where)
        if any(v not in (0, 1) for v in mask):
            raise DataError(f"{where}: field 'mask' must hold only 0 and 1")
    elif "labels" in row:
        labels = _int_list(row["labels"], "labels", where)
        mask = [0 if v == -100 else 1 for v in labels]
    if mask is not None and len(mask) != len(ids):
        raise DataError(f"{where}: 'ids' has {len(ids)} tokens but the mask / labels have {len(mask)}")
    if kind == "sft" and mask is None:
        raise DataError(f"{where}: SFT rows given as 'ids' also need a 'mask' (1 = learn) or 'labels' (-100 = skip)")
    return ids, mask


def iter_examples(path: str | Path, kind: str, fmt: str = "auto", opts: dict | None = None):
    """Yield (where, example) for every row of one file, in order (single process)."""
    path, opts = Path(path), opts or {}
    text_file = file_kind(path) == "txt"
    count = 0
    for chunk, _ in read_chunks(path):
        for lineno, payload in chunk_items(chunk):
            where = f"{path}:{lineno}"
            row = apply_columns(decode_row(str(path), lineno, payload, text_file), opts.get("columns"), where)
            if fmt == "auto":
                fmt = detect_format(row, where)
            yield where, to_example(row, fmt, kind, opts, where)
            count += 1
    if count == 0:
        raise DataError(f"{path}: no rows (empty file)")


def read_rows(path: str | Path, kind: str, fmt: str = "auto", opts: dict | None = None) -> Iterator:
    """Examples of one file: texts (pretrain) or message lists (sft)."""
    for _, example in iter_examples(path, kind, fmt, opts):
        yield example
