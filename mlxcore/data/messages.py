"""Chat messages as users write them, normalised: {"role", "content"} dicts (ShareGPT's {"from",
"value"} too), content as a string or a list of text parts, OpenAI's assistant "weight", and tool
calling (an assistant's "tool_calls", "tool" turns, a row's "tools"; LLaMA-Factory's
"function_call" / "observation" turns; OpenAI's older "function_call" / "function" turns). Roles
spelled otherwise (OpenAI's "developer", Gemma's "model", ShareGPT's "human" / "gpt") are read as
theirs. Errors name the row and the message.
"""

from __future__ import annotations

import json
from typing import Any

from mlxcore.data.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}  # tool: a tool call's result (context, not learned)
# Other spellings of them, under "role" or ShareGPT's "from": ShareGPT's "human" / "gpt", LLaMA-Factory's
# "observation" (+ its "function_call" turns, `_sharegpt`), OpenAI's "developer" (its system message
# since o1) and its deprecated functions API's "function" result turn, Gemma's "model"
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "observation": "tool",
                "developer": "system", "function": "tool"}


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


def _openai(m: dict) -> dict:
    """Other spellings as the messages above: the roles of `ROLE_ALIASES`; the deprecated OpenAI
    functions API's assistant "function_call" {"name", "arguments"} as one tool call (its "function"
    result turn is a "tool" turn); a tool result given as a JSON value rather than text as its JSON
    text (the template renders text)."""
    role = m.get("role")
    if role in ROLE_ALIASES or (role == "assistant" and m.get("function_call") is not None
                                and m.get("tool_calls") is None):
        m = {**m, "role": ROLE_ALIASES.get(role, role)}
        if role == "assistant":
            m["tool_calls"] = [{"type": "function", "function": m.pop("function_call")}]
    content = m.get("content")
    parts = isinstance(content, list) and all(isinstance(p, str) or (isinstance(p, dict) and "type" in p) for p in content)
    if m.get("role") == "tool" and content is not None and not isinstance(content, str) and not (content and parts):
        m = {**m, "content": json.dumps(content, ensure_ascii=False)}
    return m


def _sharegpt(m: dict, where: str, what: str) -> dict:
    """A ShareGPT turn ({"from", "value"}) as a message; LLaMA-Factory's "function_call" turn (its
    value the JSON of one call {"name", "arguments"} or a list of them) as an assistant's tool calls."""
    if m["from"] != "function_call":
        return {"role": ROLE_ALIASES.get(m["from"], m["from"]), "content": m.get("value")}
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


def tools_of(row: dict, where: str) -> list | None:
    """A row's "tools" (a list of JSON schemas, or its JSON text), or None when it has none."""
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
    return [_without_nulls(t) for t in tools]


def _without_nulls(value: Any) -> Any:
    """A JSON value without its null-valued object keys. Parquet and `datasets` store tool schemas
    as Arrow structs, which give every schema every key any row has, null where it has none
    (another tool's properties, `"required": null`): rendered, they would teach tools that differ
    from the row's."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


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
        elif isinstance(m, dict):
            m = _openai(m)
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {what} needs 'role' in {sorted(ROLES)} and a string 'content'")
        calls = _tool_calls(m, where, what) if m.get("tool_calls") is not None else None
        content = "" if calls and m.get("content") is None else _content(m.get("content"), where, what)
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = calls
        msg.update({k: m[k] for k in ("tool_call_id", "name") if m["role"] == "tool" and isinstance(m.get(k), str)})
        if m.get("weight") is not None:  # Arrow (parquet, `datasets`) gives every message every key, null where unset
            if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise DataError(f"{where}: {what}: 'weight' is for assistant messages and must be 0 or 1, "
                                f"got {m['weight']!r} on a {m['role']!r} message")
            if m["weight"] == 0:
                msg["weight"] = 0
        out.append(msg)
    return out
