"""Preference rows in, (prompt messages, responses) out, with errors that name the file and line.

Formats, declared (`PreferenceSourceConfig.format`) or detected from a file's first row:
  pairs          {"prompt", "chosen", "rejected"} strings (TRL's "standard" preference rows;
                 the prompt may come from `prompt_field` or a `prompt_format` template, and the
                 prompt may itself be a message list)
  pair-messages  {"chosen": [messages], "rejected": [messages]} (MiniMind's dpo.jsonl,
                 UltraFeedback / TRL's conversational rows), or Anthropic-HH strings
                 ("\\n\\nHuman: ... \\n\\nAssistant: ..."): the messages both share are the prompt,
                 the last assistant message of each is the response; or OpenAI's preference
                 fine-tuning rows {"input": {"messages": [...]}, "preferred_output": [assistant
                 message], "non_preferred_output": [assistant message]}
  kto            {"prompt", "completion", "label": true | false} (unpaired: desirable or not; TRL's
                 conversational form too: the prompt a message list, the completion one assistant message)
  scored         {"prompt", "response", "reward": number} (the MLX-Pretrain seed's rows; also
                 "instruction" for the prompt and "score" for the reward)
Files are read like SFT data (`records.read_chunks`: JSONL, JSON arrays, parquet, CSV / TSV, Arrow,
and the text ones compressed; UTF-8 with or without a BOM). A CSV cell is text, so a KTO label
may be `true`/`false`/`1`/`0` and a reward any number as written there. A pair whose chosen and
rejected replies are identical, or whose two conversations share no prompt, is not an error but
is not usable either: it is skipped and counted (`identical`, `no_prompt`) in the tokenized
data's manifest, and the first few are named in a warning.
"""

from __future__ import annotations

import re

from mlxcore.data.messages import message_list
from mlxcore.data.records import DataError, row_system, string_field

FORMATS = ("auto", "pairs", "pair-messages", "kto", "scored")
KINDS = {"pairs": "pairs", "pair-messages": "pairs", "kto": "kto", "scored": "scored"}


# a KTO label as a CSV cell spells it
_CSV_BOOL = {"true": True, "false": False, "1": True, "0": False}


class Skip(Exception):
    """A row that is well-formed but unusable (counted under `reason`, not fatal)."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{where}: {reason}")
        self.reason, self.where = reason, where


def kind_of(fmt: str) -> str:
    """pairs / kto / scored: what the rows train."""
    return KINDS[fmt]


def detect_format(row: dict, where: str) -> str:
    if "preferred_output" in row and "non_preferred_output" in row:  # OpenAI's preference fine-tuning
        return "pair-messages"
    if "chosen" in row and "rejected" in row:
        c = row["chosen"]
        if isinstance(c, list) or (isinstance(c, str) and "prompt" not in row and _HH_TURN.search(c)):
            return "pair-messages"
        return "pairs"
    if "label" in row and ("completion" in row or "response" in row):
        return "kto"
    if ("reward" in row or "score" in row) and ("response" in row or "completion" in row or "output" in row):
        return "scored"
    raise DataError(
        f"{where}: cannot tell the preference format from the fields {sorted(row)[:8]}; expected "
        "prompt/chosen/rejected, chosen/rejected message lists, prompt/completion/label (KTO) or "
        "prompt/response/reward (scored); or set format and the field names in the data config")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_messages(text: str, name: str, where: str) -> list[dict]:
    """Anthropic-HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as a message list."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: field {name!r} is neither a message list nor a Human:/Assistant: transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def _openai_sides(row: dict, where: str) -> list[list[dict]]:
    """OpenAI's preference row as its two conversations: input.messages + each output's reply."""
    inp = row.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise DataError(f"{where}: field 'input' must be an object with a 'messages' list (OpenAI's preference "
                        "format: input, preferred_output, non_preferred_output)")
    if inp.get("tools"):
        raise DataError(f"{where}: field 'input.tools': preference rows with tool definitions are not supported "
                        "(the prompt is rendered without tools); drop them or train the tool calls with SFT")
    prompt = message_list(inp["messages"], where, "input.messages")
    return [prompt + [{"role": "assistant", "content": _one_reply(row[name], name, where,
                                                                   "hold one assistant message with text content")}]
            for name in ("preferred_output", "non_preferred_output")]


def _one_reply(value, name: str, where: str, expected: str) -> str:
    """The text of a field that holds one assistant message ([{"role": "assistant", "content"}])."""
    reply = message_list(value, where, name)
    if len(reply) != 1 or reply[0]["role"] != "assistant" or "tool_calls" in reply[0]:
        raise DataError(f"{where}: field {name!r} must {expected}")
    return reply[0]["content"]


def _conversation(row: dict, name: str, opts: dict, where: str, fmt: str) -> list[dict]:
    """The chosen or rejected side of a pair-messages row as a whole conversation."""
    value = row.get(name)
    msgs = _hh_messages(value, name, where) if isinstance(value, str) else message_list(value, where, name)
    if "prompt" in row and msgs[0]["role"] == "assistant":  # TRL conversational: prompt apart
        msgs = _prompt(row, opts, where, fmt) + msgs
    return msgs


def _prompt(row: dict, opts: dict, where: str, fmt: str) -> list[dict]:
    """The prompt as a message list (a string prompt is one user message)."""
    if opts.get("prompt_format"):
        from mlxcore.data.records import fill_template

        text = fill_template(opts["prompt_format"], row, where, "prompt_format")
    else:
        name = opts.get("prompt_field") or "prompt"
        if name == "prompt" and name not in row:
            name = next((k for k in ("instruction", "question") if k in row), name)
        if isinstance(row.get(name), list):
            return message_list(row[name], where, name)
        text = string_field(row, name, where, fmt)
    return [{"role": "user", "content": text}]


def _with_system(prompt: list[dict], opts: dict, row: dict, where: str) -> list[dict]:
    """The prompt after a system turn: the row's own ("system" / "system_prompt", as in Intel's
    orca_dpo_pairs), else the config's `system_prompt`; none where the prompt has one."""
    system = row_system(row, where) or opts.get("system_prompt")
    if system and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}] + prompt
    return prompt


def _split_shared(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], str, str]:
    """(shared prompt messages, chosen reply, rejected reply) of two conversations."""
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the {name} conversation does not end with an assistant reply")
        if "tool_calls" in msgs[-1]:  # its text alone (often empty) would be learned as the whole reply
            raise DataError(f"{where}: the {name} conversation ends with a tool call; a preference side must be "
                            "a text reply")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt = chosen[:n]
    if not prompt or prompt[-1]["role"] == "assistant" or chosen[n:-1] or rejected[n:-1]:
        # no shared prefix ending in a user turn, or the two differ before their last replies
        raise Skip("no_prompt", where)
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _response_field(row: dict, opts: dict, where: str, fmt: str, names: tuple[str, ...]) -> str:
    if opts.get("response_format"):
        from mlxcore.data.records import fill_template

        return fill_template(opts["response_format"], row, where, "response_format")
    name = opts.get("response_field")
    if not name or (name == "response" and name not in row):
        name = next((k for k in names if k in row), names[0])
    if isinstance(row.get(name), list):  # TRL's conversational rows: [{"role": "assistant", "content": ...}]
        return _one_reply(row[name], name, where, "be text or one assistant message")
    return string_field(row, name, where, fmt)


def to_example(row: dict, fmt: str, opts: dict, where: str) -> dict:
    """One example: {"prompt": messages, "chosen", "rejected"} | {"prompt", "completion", "label"}
    | {"prompt", "response", "reward"}. Raises DataError (bad row) or Skip (unusable pair)."""
    if fmt == "pairs":
        prompt = _prompt(row, opts, where, fmt)
        chosen, rejected = string_field(row, "chosen", where, fmt), string_field(row, "rejected", where, fmt)
        if chosen.strip() == rejected.strip():
            raise Skip("identical", where)
        return {"prompt": _with_system(prompt, opts, row, where), "chosen": chosen, "rejected": rejected}
    if fmt == "pair-messages":
        sides = (_openai_sides(row, where) if "preferred_output" in row
                 else [_conversation(row, name, opts, where, fmt) for name in ("chosen", "rejected")])
        if sides[0] == sides[1]:
            raise Skip("identical", where)
        prompt, chosen, rejected = _split_shared(*sides, where)
        if chosen.strip() == rejected.strip():
            raise Skip("identical", where)
        return {"prompt": _with_system(prompt, opts, row, where), "chosen": chosen, "rejected": rejected}
    if fmt == "kto":
        prompt = _prompt(row, opts, where, fmt)
        completion = _response_field(row, opts, where, fmt, ("completion", "response"))
        label = row.get("label")
        if isinstance(label, str):  # CSV / TSV cells are text: true/false, 1/0 as written
            label = _CSV_BOOL.get(label.strip().lower(), label)
        if not isinstance(label, bool):
            if label in (0, 1) and not isinstance(label, float):
                label = bool(label)
            else:
                raise DataError(f"{where}: field 'label' must be true or false (desirable or not), got {label!r}")
        return {"prompt": _with_system(prompt, opts, row, where), "completion": completion, "label": label}
    if fmt == "scored":
        prompt = _prompt(row, opts, where, fmt)
        response = _response_field(row, opts, where, fmt, ("response", "completion", "output"))
        name = opts.get("reward_field") or "reward"
        if name == "reward" and name not in row and "score" in row:  # the config's default names "reward"
            name = "score"
        value = row.get(name)
        if isinstance(value, str):  # a CSV / TSV cell: the number it spells, if it spells one
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise DataError(f"{where}: field {name!r} must be a finite number, got {value!r}")
        return {"prompt": _with_system(prompt, opts, row, where), "response": response, "reward": float(value)}
    raise DataError(f"{where}: unknown preference format {fmt!r}; choose one of {', '.join(FORMATS)}")
