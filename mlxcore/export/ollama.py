"""An Ollama bundle: `Modelfile` + GGUF, with the chat template translated, never guessed.

    modelfile(model_dir_or_tokenizer_dir, gguf_name, *, params=None) -> str
    write_bundle(gguf_path, tokenizer_dir, out_dir, *, params=None) -> dict
    chat_format(model_dir_or_tokenizer_dir) -> ChatFormat     (the decomposition, for tests and tools)

`ollama create NAME -f Modelfile` otherwise picks a TEMPLATE by guessing from the GGUF's Jinja
template (a nearest match among its built-ins), which silently breaks a model trained on
anything else. The Modelfile written here carries an explicit TEMPLATE in Ollama's Go
text/template syntax and one `PARAMETER stop` per end-of-turn token.

How the translation works, for any Jinja chat template:

1. The checkpoint's own template is rendered (transformers' `apply_chat_template`, tokenize=False)
   on probe conversations whose contents are sentinels. Splitting the renderings at the
   sentinels gives a preamble (e.g. the BOS text), a default system block (emitted when there is
   no system message), per-role prefix/suffix strings for system / user / assistant, and the
   generation prefix (e.g. `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`).
2. That decomposition is rendered back in Python, with Ollama's semantics (the generation prefix
   follows the last message unless it is the assistant's; a last assistant message is left open
   for Ollama to continue, as transformers' `continue_final_message` does), and compared
   character for character with the Jinja rendering of several multi-turn conversations with
   realistic contents (newlines, quotes, `{{ }}`, backslashes, non-ASCII): system+user+assistant+
   user, no system, one user turn, three turns, a final assistant turn, and a system message in
   the middle when the template accepts one. A template that cannot be written this way (it
   renders a role differently by position, drops or rewrites contents, ...) raises
   `TemplateError` (a ValueError) naming the first conversation that differs and where.
3. The Go template puts every literal string inside `{{ "..." }}` actions (Go string literals),
   so whitespace trimming (`{{-`) only ever eats layout newlines, and nothing in it can end the
   Modelfile's `\"\"\"` block or be dropped by Ollama's Modelfile parser (non-printable characters
   are escaped).

BOS: when the tokenizer itself adds BOS (as llama.cpp will, from the GGUF's add_bos flag) and the
template starts with the BOS text, the TEMPLATE leaves that text out, so the model sees one BOS
as it does through transformers (whose chat path tokenizes without special tokens).

Not translated: tool calls / the "tool" role, and template switches (e.g. `enable_thinking`);
the TEMPLATE renders the template's default behaviour.

The bundle: `write_bundle` writes `Modelfile` (atomically) into `out_dir` beside the GGUF. A GGUF
already in `out_dir` stays where it is; one elsewhere is hard-linked in (no second copy on disk,
and the bundle stays whole if the original is removed), or copied where a link is impossible
(another filesystem). `FROM ./<file>.gguf` is relative, so the dir can be moved as a whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxcore.io import fsync_dir, tmp_path, write_text, writing

ROLES = ("system", "user", "assistant")
MODELFILE = "Modelfile"


class TemplateError(ValueError):
    """The chat template cannot be written as an Ollama TEMPLATE of per-role prefixes and suffixes."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as strings: what `ChatFormat.render` and the Go TEMPLATE emit."""

    preamble: str
    default_system: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    stop: tuple[str, ...]
    bos_left_to_tokenizer: str = ""  # BOS text the template emits and the tokenizer (llama.cpp) adds instead
    default_unless_first_is_system: bool = False  # else: the default system block unless any system message
    system_anywhere: bool = False  # the template was checked with a system message after the first turn
    source: str = field(default="", compare=False)

    def render(self, messages: list[dict]) -> str:
        """The prompt Ollama builds from the TEMPLATE (Ollama's semantics, see the module doc)."""
        out = [self.preamble]
        if self.default_unless_first_is_system:
            if not messages or messages[0]["role"] != "system":
                out.append(self.default_system)
        elif not any(m["role"] == "system" and m["content"] for m in messages):  # Ollama's .System is empty
            out.append(self.default_system)
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] not in ROLES:
                continue
            out += [self.prefix[m["role"]], m["content"]]
            if not (last and m["role"] == "assistant"):
                out.append(self.suffix[m["role"]])
            if last and m["role"] != "assistant":
                out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        """The TEMPLATE in Go text/template syntax, over Ollama's `.Messages` (`.Role`, `.Content`) and `.System`."""
        lit = _go_action
        lines = [lit(self.preamble)]
        if self.default_system and self.default_unless_first_is_system:
            lines.append('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                         + lit(self.default_system) + "{{ end }}")
        elif self.default_system:
            lines.append("{{- if not .System }}" + lit(self.default_system) + "{{ end }}")
        lines.append("{{- range $i, $_ := .Messages }}")
        lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
        for n, role in enumerate(ROLES):
            keyword = "if" if n == 0 else "else if"
            body = lit(self.prefix[role]) + "{{ .Content }}"
            if role == "assistant":
                body += "{{ if not $last }}" + lit(self.suffix[role]) + "{{ end }}" if self.suffix[role] else ""
            else:
                body += lit(self.suffix[role])
            lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}' + body)
        lines.append("{{- end }}")
        if self.generation:
            lines.append('{{- if and $last (ne .Role "assistant") }}' + lit(self.generation) + "{{ end }}")
        lines.append("{{- end }}")
        text = "\n".join(line for line in lines if line)
        assert '"""' not in text  # Go string literals escape every quote
        return text


# ------------------------------------------------------------------------ Go literals

def _go_string(s: str) -> str:
    """`s` as a Go interpreted string literal using only printable characters."""
    out = ['"']
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def _go_action(s: str) -> str:
    return "{{ " + _go_string(s) + " }}" if s else ""


# ------------------------------------------------------------------------ the tokenizer

def _tokenizer_dir(path: Path) -> Path:
    """`path` if it has tokenizer files; for an adapter dir without them, its base model's dir."""
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model")
        if base and Path(base).is_dir():
            return Path(base)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    raise FileNotFoundError(f"{path}: no tokenizer (tokenizer_config.json / tokenizer.json); "
                            "an Ollama TEMPLATE is translated from the tokenizer's chat_template")


def _load_tokenizer(source):
    if not isinstance(source, (str, os.PathLike)):
        return source, getattr(source, "name_or_path", "tokenizer")
    from mlxcore.data.tokenizer import load

    directory = _tokenizer_dir(Path(source))
    return load(directory), str(directory)


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (llama.cpp's add_bos follows it)."""
    if tok.bos_token_id is None:
        return False
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    return len(full) > len(plain) and full[0] == tok.bos_token_id


def _special_tokens(tok) -> list[str]:
    found = set(tok.all_special_tokens)
    found |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return sorted((t for t in found if t), key=len, reverse=True)


# ------------------------------------------------------------------------ decomposition

_SENTINEL = "Zq{}xK"  # plain ASCII letters/digits: no template trims, escapes or splits them

_SAMPLES = {
    "system": ["You are terse.\nAnswer in \"plain\" words {{ like_this }} and \\n escapes.", "Be kind; naïve café 你好."],
    "user": ["What is 12 * (3 + 4)?\nShow the steps.", "Quote: \"\"\" triple \"\"\" and {% raw %} and \t tab.",
             "Last one: ünïcödé ✓ and a backslash \\"],
    "assistant": ["12 * 7 = 84.\n\nSo the answer is 84.", "Sure: \"quoted\" {{ braces }} here."],
}


def _conversation(roles: str, realistic: bool) -> list[dict]:
    """Messages for a role pattern like "sua" (system, user, assistant)."""
    names = {"s": "system", "u": "user", "a": "assistant"}
    used = {r: 0 for r in ROLES}
    messages = []
    for i, r in enumerate(roles):
        role = names[r]
        if realistic:
            pool = _SAMPLES[role]
            content = pool[used[role] % len(pool)]
        else:
            content = _SENTINEL.format(i)
        used[role] += 1
        messages.append({"role": role, "content": content})
    return messages


class _Jinja:
    def __init__(self, tok, where: str) -> None:
        if not isinstance(getattr(tok, "chat_template", None), str) or not tok.chat_template.strip():
            raise TemplateError(f"{where}: the tokenizer has no chat_template to translate")
        self.tok, self.where = tok, where

    def __call__(self, messages: list[dict], mode: str) -> str:
        """mode: "gen" (add_generation_prompt), "plain", or "continue" (continue_final_message)."""
        try:
            out = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=mode == "gen",
                                               continue_final_message=mode == "continue")
        except Exception as e:  # jinja2 errors, raise_exception() in the template, transformers' checks
            raise _Refused(f"{type(e).__name__}: {e}") from e
        if not isinstance(out, str):
            raise TemplateError(f"{self.where}: apply_chat_template(tokenize=False) returned {type(out).__name__}")
        return out


class _Refused(Exception):
    """The Jinja template refused a conversation (raised)."""


def _split(text: str, sentinels: list[str], what: str, where: str) -> list[str]:
    """text = p0 s0 p1 s1 ... pn: the pieces between the sentinels, each placed verbatim once, in order."""
    pieces, rest = [], text
    for s in sentinels:
        if text.count(s) != 1:
            raise TemplateError(f"{where}: the chat template does not place each message's content verbatim, "
                                f"once, in order ({what}: content {s!r} appears {text.count(s)} times)")
        head, _, rest = rest.partition(s)
        pieces.append(head)
    pieces.append(rest)
    if len("".join(pieces)) + sum(map(len, sentinels)) != len(text):
        raise TemplateError(f"{where}: the chat template reorders message contents ({what})")
    return pieces


_POSITION_HINT = ("a template whose text for a turn depends on its position (turn numbers, a system prompt folded "
                  "into the first user turn) cannot be written as an Ollama TEMPLATE")


def _without(s: str, head: str, what: str, where: str) -> str:
    if not s.startswith(head):
        raise TemplateError(f"{where}: cannot split the template into per-role prefixes and suffixes "
                            f"({what}: {s!r} does not start with {head!r}); {_POSITION_HINT}")
    return s[len(head):]


def _cut_end(s: str, tail: str, what: str, where: str) -> str:
    if not s.endswith(tail):
        raise TemplateError(f"{where}: cannot split the template into per-role prefixes and suffixes "
                            f"({what}: {s!r} does not end with {tail!r}); {_POSITION_HINT}")
    return s[:len(s) - len(tail)]


def _probe(render: _Jinja, roles: str, mode: str, where: str) -> list[str]:
    msgs = _conversation(roles, realistic=False)
    try:
        text = render(msgs, mode)
    except _Refused as e:
        raise TemplateError(f"{where}: the chat template refuses a {'+'.join(m['role'] for m in msgs)} "
                            f"conversation: {e}") from None
    return _split(text, [m["content"] for m in msgs], "+".join(m["role"] for m in msgs), where)


def chat_format(source) -> ChatFormat:
    """Decompose the chat template of a model / tokenizer dir (or a loaded tokenizer) and verify it.

    Raises TemplateError (a ValueError) when the template cannot be written as a Modelfile TEMPLATE.
    """
    tok, where = _load_tokenizer(source)
    render = _Jinja(tok, where)

    # system + user + assistant + user, with the generation prompt: p0 S p1 U p2 A p3 U p4
    p = _probe(render, "suau", "gen", where)
    user_suffix = _probe(render, "su", "plain", where)[-1]
    assistant_suffix = _probe(render, "ua", "plain", where)[-1]
    generation = _without(p[4], user_suffix, "user turn + generation prompt", where)
    assistant_prefix = _without(p[2], user_suffix, "user turn, then the assistant's", where)
    user_prefix = _without(p[3], assistant_suffix, "assistant turn, then the user's", where)
    system_suffix = _cut_end(p[1], user_prefix, "system turn, then the user's", where)
    head = _cut_end(_probe(render, "u", "gen", where)[0], user_prefix, "a conversation without a system message",
                    where)  # = preamble + default system block

    # The system prefix as the template writes it after the first turn, where it renders one there.
    system_prefix = preamble = None
    system_anywhere = False
    try:
        mid = render(_conversation("uasu", realistic=False), "gen")
    except _Refused:
        mid = None
    if mid is not None:
        system_anywhere = True
        q = _split(mid, [m["content"] for m in _conversation("uasu", realistic=False)], "user+assistant+system+user",
                   where)
        if q[2].startswith(assistant_suffix) and p[0].endswith(q[2][len(assistant_suffix):]):
            system_prefix = q[2][len(assistant_suffix):]
            preamble = p[0][:len(p[0]) - len(system_prefix)]
            if not head.startswith(preamble):
                system_prefix = preamble = None
    if preamble is None:  # what every conversation starts with: the common start of both openings
        preamble = os.path.commonprefix([p[0], head])
        system_prefix = p[0][len(preamble):]
    default_system = head[len(preamble):]
    # Templates emit a default system block either when messages[0] is not a system message or when
    # there is no system message at all: a system message after the first turn tells them apart.
    first_rule = bool(default_system) and mid is not None and q[0] == head + user_prefix

    bos = ""
    if tok.bos_token and preamble.startswith(tok.bos_token) and _adds_bos(tok):
        bos, preamble = tok.bos_token, preamble[len(tok.bos_token):]

    specials = _special_tokens(tok)
    stop = [t for t in specials if t in assistant_suffix]
    stop.sort(key=assistant_suffix.index)
    if not stop and assistant_suffix.strip():
        stop = [assistant_suffix.strip()]
    if tok.eos_token and tok.eos_token in specials and tok.eos_token not in stop:
        stop.append(tok.eos_token)

    fmt = ChatFormat(preamble=preamble, default_system=default_system,
                     prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
                     suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                     generation=generation, stop=tuple(stop), bos_left_to_tokenizer=bos,
                     default_unless_first_is_system=first_rule,
                     system_anywhere=system_anywhere, source=where)
    verify(fmt, tok)
    return fmt


CHECKS = ("suau", "uau", "u", "su", "uauau", "sua", "ua", "uasu")


def verify(fmt: ChatFormat, tok) -> list[str]:
    """Compare `fmt.render` with the Jinja rendering of CHECKS conversations; the role patterns checked.

    "uasu" (a system message after the first turn) is checked only when the template renders it.
    """
    render = _Jinja(tok, fmt.source)
    checked = []
    for roles in CHECKS:
        msgs = _conversation(roles, realistic=True)
        mode = "continue" if msgs[-1]["role"] == "assistant" else "gen"
        try:
            want = render(msgs, mode)
        except _Refused as e:
            if roles == "uasu":
                continue
            raise TemplateError(f"{fmt.source}: the chat template refuses a "
                                f"{'+'.join(m['role'] for m in msgs)} conversation: {e}") from None
        if fmt.bos_left_to_tokenizer:
            want = _without(want, fmt.bos_left_to_tokenizer, "BOS", fmt.source)
        got = fmt.render(msgs)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise TemplateError(
                f"{fmt.source}: the chat template cannot be written as an Ollama TEMPLATE of per-role prefixes "
                f"and suffixes: for a {'+'.join(m['role'] for m in msgs)} conversation it renders "
                f"{want[max(0, at - 30):at + 40]!r} where the decomposition gives {got[max(0, at - 30):at + 40]!r} "
                f"(character {at}; does it render a role differently by position or rewrite contents?)")
        checked.append(roles)
    return checked


# ------------------------------------------------------------------------ the Modelfile

_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _quote_value(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if '"""' in text or "\r" in text:
        raise ValueError(f"{what}: {text!r} cannot be written in a Modelfile")
    if "\n" in text or '"' in text:
        return f'"""{text}"""'
    if not text or any(c.isspace() for c in text) or not text.isprintable() or text.startswith("<") or "#" in text:
        return f'"{text}"'
    return text


def _from_line(gguf_name: str) -> str:
    if not gguf_name or "/" in gguf_name or "\\" in gguf_name or gguf_name in (".", ".."):
        raise ValueError(f"gguf_name: {gguf_name!r} must be a bare file name (the GGUF lies beside the Modelfile)")
    if not gguf_name.endswith(".gguf"):
        raise ValueError(f"gguf_name: {gguf_name!r} must end with .gguf")
    if any(c in gguf_name for c in '"\n\r') or not gguf_name.isprintable():
        raise ValueError(f"gguf_name: {gguf_name!r} has characters a Modelfile cannot hold")
    path = f"./{gguf_name}"
    return f'FROM "{path}"' if any(c.isspace() for c in path) else f"FROM {path}"


def modelfile(model_dir_or_tokenizer_dir, gguf_name: str, *, params: dict[str, Any] | None = None) -> str:
    """The text of a Modelfile: `FROM ./<gguf_name>`, the translated TEMPLATE, a stop per end-of-turn token.

    `params`: more `PARAMETER` lines, e.g. {"temperature": 0.7, "num_ctx": 4096}; a list value gives
    one line per item (`{"stop": [...]}` adds stops after the derived ones).
    """
    from_line = _from_line(gguf_name)
    return _modelfile_text(chat_format(model_dir_or_tokenizer_dir), from_line, params)


def _modelfile_text(fmt: ChatFormat, from_line: str, params: dict[str, Any] | None) -> str:
    lines = [f"# Ollama Modelfile written by mlxcore.export.ollama; TEMPLATE translated from the chat template of "
             f"{Path(fmt.source).name or fmt.source}", f"#   ollama create NAME -f {MODELFILE}", from_line,
             f'TEMPLATE """{fmt.go_template()}"""']
    stops = list(fmt.stop)
    extra: list[tuple[str, Any]] = []
    for name, value in (params or {}).items():
        if not _PARAM_NAME.match(str(name)):
            raise ValueError(f"params: {name!r} is not a Modelfile parameter name")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if name == "stop":
                if v not in stops:
                    stops.append(v)
            else:
                extra.append((name, v))
    lines += [f"PARAMETER stop {_quote_value(s, 'stop')}" for s in stops]
    lines += [f"PARAMETER {name} {_quote_value(v, name)}" for name, v in extra]
    return "\n".join(lines) + "\n"


def _place(gguf: Path, out_dir: Path) -> str:
    """Put `gguf` into `out_dir` under its name: "in place", "hardlink" or "copy"."""
    dest = out_dir / gguf.name
    if dest.exists() and os.path.samefile(dest, gguf):
        return "in place"
    tmp = tmp_path(dest)
    try:
        with writing(dest):
            try:
                os.link(gguf, tmp)
                how = "hardlink"
            except OSError:
                shutil.copyfile(gguf, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                how = "copy"
            os.replace(tmp, dest)
            fsync_dir(out_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how


def write_bundle(gguf_path, tokenizer_dir, out_dir, *, params: dict[str, Any] | None = None) -> dict:
    """`out_dir/Modelfile` beside `out_dir/<gguf name>`: `ollama create NAME -f out_dir/Modelfile` works.

    The template is translated (and verified) before anything is written; the GGUF is left in
    place when it is already in `out_dir`, else hard-linked there (copied across filesystems).
    Returns {"modelfile", "gguf", "placed", "stop", "template"}.
    """
    gguf, out = Path(gguf_path), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    fmt = chat_format(tokenizer_dir)
    text = _modelfile_text(fmt, _from_line(gguf.name), params)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    placed = _place(gguf, out)
    write_text(out / MODELFILE, text)
    return {"modelfile": str(out / MODELFILE), "gguf": str(out / gguf.name), "placed": placed,
            "stop": list(fmt.stop), "template": fmt.go_template()}
