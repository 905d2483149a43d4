"""Raw rows in, training examples out, with errors that name the file and line.

Files are read as a stream of chunks (`read_chunks`), so nothing here holds a whole corpus:
  *.jsonl / *.json(l) lines   one JSON object per line (the line number is the row's place)
  *.parquet                   row batches via pyarrow (the "line" is the 1-based row number)
  *.json                      a JSON array of objects (read whole: arrays do not stream)
  *.txt                       plain text; documents are separated by blank lines (pretraining)
All are UTF-8; a UTF-8 byte-order mark at the very start of a file is skipped (Windows tools
write one), anywhere else it is data. Other encodings fail naming the file and line.

Each row becomes an example of one of these formats, declared (`SourceConfig.format`) or
detected from a file's first row:
  text           {"text": str}                                   pretraining text
  conversations  {"conversations" | "messages": [{"role", "content"}, ...]}  (also ShareGPT's
                 {"from": human|gpt|system, "value"}; content may be a list of text parts, and
                 an assistant message with "weight": 0 is context, not learned, as in OpenAI's format;
                 tool calling as OpenAI writes it: an assistant's "tool_calls", "tool" turns with
                 the results, the row's "tools" schemas, all rendered by the chat template)
  instruction    {prompt_field, response_field} (default "prompt", "response"), or any fields
                 through `prompt_format` / `response_format` templates ("Q: {question}")
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
from typing import Any, Iterator, NamedTuple

import orjson

ROLES = {"system", "user", "assistant", "tool"}  # tool: a tool call's result (context, not learned)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool"}  # + "function_call" (LLaMA-Factory's tool calls)
FORMATS = ("auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids")
CHAT_FORMATS = ("conversations", "instruction", "alpaca", "gsm8k")
CHUNK_ROWS = 1024
CHUNK_BYTES = 256 << 10  # per worker task: small enough to balance the last tasks
MAX_LINE_BYTES = 8 << 20  # a longer JSONL line is refused before it is held in memory


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` (or the file alone)."""


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark: Windows tools start files with it


def skip_bom(f) -> int:
    """Move a binary file at its start past a UTF-8 BOM; the bytes skipped (0 or 3). A BOM only
    means something as the file's first bytes: later ones are data (and fail as such)."""
    if f.read(len(BOM)) == BOM:
        return len(BOM)
    f.seek(0)
    return 0


# ---------------------------------------------------------------- reading files as chunks


def file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(suffix):
            raise DataError(f"{path}: compressed files are not read directly; decompress it first")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt") or name.endswith(".md"):
        return "txt"
    if name.endswith(".json"):
        with open(path, "rb") as f:
            skip_bom(f)
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return "json-array"
    return "jsonl"


class LineBlock(NamedTuple):
    """Whole JSONL lines as one bytes block (cheap to hand to a worker), from line `first` on."""

    first: int
    data: bytes


def chunk_items(chunk) -> list[tuple[int, Any]]:
    """(line, payload) items of a chunk; a LineBlock is split here, blank lines skipped."""
    if not isinstance(chunk, LineBlock):
        return chunk
    lines = chunk.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [(chunk.first + i, line) for i, line in enumerate(lines) if line.strip()]


def read_chunks(path: str | Path, rows: int = CHUNK_ROWS, max_bytes: int | None = None) -> Iterator[tuple[Any, int]]:
    """Yield (chunk, bytes_read_so_far); `chunk_items(chunk)` gives its (line, payload) items.

    JSONL comes as LineBlocks of about `max_bytes` (decoded and parsed by whoever encodes them,
    in parallel); parquet and JSON arrays as lists of row dicts; txt as lists of documents.
    """
    path, max_bytes = Path(path), max_bytes or CHUNK_BYTES
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_chunks(path, rows)
    elif kind == "json-array":
        yield from _array_chunks(path, rows)
    elif kind == "txt":
        yield from _text_chunks(path, rows, max_bytes)
    else:
        yield from _line_blocks(path, max_bytes)


def _line_blocks(path: Path, max_bytes: int):
    first, rest = 1, b""
    with open(path, "rb") as f:
        pos = skip_bom(f)
        while block := f.read(max_bytes):
            pos += len(block)
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if not cut:  # one line longer than a block: read on, up to the limit
                if len(block) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{first}: a single line of over {MAX_LINE_BYTES >> 20} MB; one row may "
                                    "not be that long (is this a JSON array, or not JSONL at all?)")
                rest = block
                continue
            yield LineBlock(first, block[:cut]), pos
            first += block.count(b"\n", 0, cut)
            rest = block[cut:]
    if rest:
        yield LineBlock(first, rest), pos


def _text_chunks(path: Path, rows: int, max_bytes: int):
    """Plain text: documents are runs of non-blank lines."""
    items, size, doc, doc_line = [], 0, [], 0
    with open(path, "rb") as f:
        pos = skip_bom(f)
        for lineno, line in enumerate(f, 1):
            pos += len(line)
            if line.strip():
                doc_line = doc_line or lineno
                doc.append(line)
                continue
            if not doc:
                continue
            items.append((doc_line, b"".join(doc).rstrip(b"\r\n")))
            size += items[-1][1].__len__()
            doc, doc_line = [], 0
            if len(items) >= rows or size >= max_bytes:
                yield items, pos
                items, size = [], 0
    if doc:
        items.append((doc_line, b"".join(doc).rstrip(b"\r\n")))
    if items:
        yield items, pos


def _parquet_chunks(path: Path, rows: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    total, done, row = path.stat().st_size, 0, 0
    n = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=rows):
        items = [(row + i + 1, r) for i, r in enumerate(batch.to_pylist())]
        row += len(items)
        done = total * row // n
        yield items, done


def _array_chunks(path: Path, rows: int):
    """A JSON array file (Alpaca's layout): read whole, since JSON arrays do not stream."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw[len(BOM):] if raw.startswith(BOM) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise DataError(f"{where}: invalid JSON array file: {e}") from None
    size = path.stat().st_size
    for start in range(0, len(data), rows):
        part = data[start : start + rows]
        yield [(start + i + 1, r if isinstance(r, dict) else json.dumps(r).encode()) for i, r in enumerate(part)], \
            size * (start + len(part)) // max(len(data), 1)


def _utf8(payload: bytes, where: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{payload[e.start]:02x} at column {e.start + 1})") from None


def decode_row(path: str, lineno: int, payload: Any, text_file: bool = False) -> dict:
    """A row dict from a chunk item; DataError naming file:line for anything else."""
    where = f"{path}:{lineno}"
    if isinstance(payload, dict):
        return payload
    if text_file:
        return {"text": _utf8(payload, where)}
    try:
        row = orjson.loads(payload)
    except orjson.JSONDecodeError:  # the slow path names the bad byte or says what and where
        try:
            row = json.loads(_utf8(payload, where))  # also takes what orjson refuses (NaN)
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
    if "conversations" in row or "messages" in row:
        return "conversations"
    if "question" in row and "answer" in row:
        return "gsm8k"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ("prompt" in row and ("response" in row or "completion" in row)) or ("instruction" in row and "response" in row):
        return "instruction"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from the fields {sorted(row)[:8]}; expected text, conversations/messages, "
        "instruction/response, alpaca (instruction/input/output), gsm8k (question/answer) or ids; "
        "or set format and the field names in the data config"
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


def _content(value: Any, where: str, what: str) -> str:
    """A message's content as text: a string, or a list of content parts (OpenAI's and Hugging Face
    chat templates' {"type": "text", "text": ...}), whose text parts are joined as a template renders
    them (back to back). Any other part (an image, audio) is a DataError: text training takes text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{where}: {what} content part {j} is {kind!r}, not text; text training takes "
                                "text parts only (images belong to the VLM task: `mlxflow run vlm`)")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: {what} needs 'role' in {sorted(ROLES)} and a string 'content' "
                    "(or a list of text parts)")


def _tool_calls(m: dict, where: str, what: str) -> list[dict]:
    """An assistant message's tool calls (OpenAI's {"type": "function", "function": {"name",
    "arguments"}}, arguments a JSON object or its JSON text), normalised to arguments as objects,
    the form Hugging Face chat templates render."""
    calls = m["tool_calls"]
    if m.get("role") != "assistant" or not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: {what}: 'tool_calls' must be a non-empty list on an assistant message")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments", {}) if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            raise DataError(f"{where}: {what} tool call {j} needs {{\"function\": {{\"name\": str, \"arguments\": "
                            "a JSON object or its text}}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args},
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return out


def _sharegpt(m: dict, where: str, what: str) -> dict:
    """A ShareGPT turn ({"from", "value"}) as a message; LLaMA-Factory's "function_call" turn (its
    value the JSON of one call {"name", "arguments"} or a list of them) as an assistant's tool calls."""
    if m["from"] != "function_call":
        return {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
    calls = m.get("value")
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except ValueError:
            calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise DataError(f"{where}: {what} (function_call) must be the JSON of a call {{\"name\", \"arguments\"}} "
                        "or a list of them")
    return {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": c} for c in calls]}


class Chat(list):
    """A row's messages, with its tool definitions (`tools`: OpenAI's / mlx-lm's JSON schemas) for
    the chat template; None when it has none."""

    def __init__(self, messages=(), tools: list | None = None):
        super().__init__(messages)
        self.tools = tools


def _tools(row: dict, where: str) -> list | None:
    tools = row.get("tools")
    if tools is None or tools == []:
        return None
    if isinstance(tools, str):  # some exports store the list as JSON text
        try:
            tools = json.loads(tools)
        except ValueError:
            tools = None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of tool definitions (JSON objects)")
    return tools


def message_list(value: Any, where: str, name: str | None = None) -> list[dict]:
    """A list of {"role", "content"} messages (ShareGPT's {"from", "value"} too; content as a string
    or a list of text parts), normalised; DataError naming the row (and the field `name`) otherwise.
    An assistant message's OpenAI-style "weight" (1: learn it, the default; 0: context only) is kept."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: " + (f"field {name!r} must be a non-empty list of messages" if name
                                        else "expected a non-empty 'conversations' or 'messages' list"))
    out = []
    for i, m in enumerate(value):
        what = f"{name + ' ' if name else ''}message {i}"
        if isinstance(m, dict) and "from" in m and "role" not in m:  # ShareGPT
            m = _sharegpt(m, where, what)
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {what} needs 'role' in {sorted(ROLES)} and a string 'content'")
        calls = _tool_calls(m, where, what) if m.get("tool_calls") is not None else None
        content = "" if calls and m.get("content") is None else _content(m.get("content"), where, what)
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = calls
        msg.update({k: m[k] for k in ("tool_call_id", "name") if m["role"] == "tool" and isinstance(m.get(k), str)})
        if "weight" in m:
            if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise DataError(f"{where}: {what}: 'weight' is for assistant messages and must be 0 or 1, "
                                f"got {m['weight']!r} on a {m['role']!r} message")
            if m["weight"] == 0:
                msg["weight"] = 0
        out.append(msg)
    return out


def _messages(row: dict, where: str) -> list[dict]:
    out = message_list(row.get("conversations" if "conversations" in row else "messages"), where)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise DataError(f"{where}: no assistant message to learn from" + (
            " (every one has weight 0)" if any(m["role"] == "assistant" for m in out) else ""))
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; nothing prompts it")
    return out


def _prompt_response(row: dict, fmt: str, opts: dict, where: str) -> tuple[str, str]:
    if opts.get("prompt_format"):
        prompt = fill_template(opts["prompt_format"], row, where, "prompt_format")
    elif fmt == "alpaca":
        prompt = string_field(row, "instruction", where, fmt)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
    elif fmt == "gsm8k":
        prompt = string_field(row, "question", where, fmt)
    else:
        name = opts.get("prompt_field") or "prompt"
        if name not in row and name == "prompt" and "instruction" in row:
            name = "instruction"
        prompt = string_field(row, name, where, fmt)
    if opts.get("response_format"):
        response = fill_template(opts["response_format"], row, where, "response_format")
    else:
        name = {"alpaca": "output", "gsm8k": "answer"}.get(fmt) or opts.get("response_field") or "response"
        if name not in row and name == "response" and "completion" in row:
            name = "completion"
        response = string_field(row, name, where, fmt)
    return prompt, response


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
        msgs, tools = _messages(row, where), _tools(row, where)
    elif fmt in CHAT_FORMATS:
        prompt, response = _prompt_response(row, fmt, opts, where)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
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
