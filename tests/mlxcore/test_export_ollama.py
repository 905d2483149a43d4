"""Ollama bundles: the chat template translated to a Go TEMPLATE, checked against Go's own text/template.

The consumer check compiles a tiny Go program once per module (skipped where `go` is absent:
`apt-get install golang-go`) that executes the Modelfile's TEMPLATE with Ollama's data shape
(`.Messages` of {Role, Content} after Ollama's collation, `.System`, missingkey=zero) and
compares it with transformers' rendering of the checkpoint's Jinja template.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from mlxcore.data.tokenizer import CHATML_TEMPLATE, load, train_bpe
from mlxcore.export import ollama
from mlxcore.io import temp_files

MINIMIND = "minimind_tokenizer"

# Llama-3 style: BOS text, header tokens around the role, <|eot_id|> after each turn, contents trimmed.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# ChatML with a default system block when the first message is not a system message (Qwen2.5 style).
DEFAULT_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Turns numbered by position (ChatGLM2's "[Round N]"): no fixed per-role prefix exists.
ROUNDS_TEMPLATE = (
    "{%- for message in messages %}[Round {{ loop.index }}] {{ message['role'] }}: {{ message['content'] }}\n"
    "{%- endfor %}{%- if add_generation_prompt %}[Round {{ messages | length + 1 }}] assistant: {%- endif %}"
)
# Llama-2 style: the system prompt folded into the first user turn.
FOLDED_SYSTEM_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}"
    "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{- message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + ' </s>' }}{%- endif %}"
    "{%- endfor %}"
)
SHOUTING_TEMPLATE = "{%- for message in messages %}{{ message['role'] }}: {{ message['content'] | upper }}\n{%- endfor %}"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

GO_RENDER = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Ollama's collation: .System joins every system message; consecutive messages of one role merge.
func collate(in []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range in {
		m := in[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var in struct {
		Template string      `json:"template"`
		Cases    [][]Message `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	out := []string{}
	for _, c := range in.Cases {
		system, messages := collate(c)
		var b strings.Builder
		data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": "",
			"Think": false, "IsThinkSet": false}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(4)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''


def _with_template(src, dst, template: str):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.fixture(scope="module")
def toks(tmp_path_factory, test_data) -> dict:
    """Tokenizer dirs: our ChatML BPE, MiniMind's (Qwen3 style), Llama-3 style (with and without a
    tokenizer that adds BOS itself), a default-system template, and templates that must be refused."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("toks")
    train_bpe(["hello world, the user asks and the assistant answers: 12 * 7 = 84"] * 40, 300, 1, root / "chatml")

    def llama3(name: str, adds_bos: bool):
        tk = Tokenizer.from_file(str(root / "chatml/tokenizer.json"))
        tk.add_special_tokens(LLAMA3_SPECIALS)
        if adds_bos:
            bos = LLAMA3_SPECIALS[0]
            tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                              special_tokens=[(bos, tk.token_to_id(bos))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=LLAMA3_SPECIALS[0], eos_token="<|eot_id|>",
                                       pad_token="<|endoftext|>")
        fast.chat_template = LLAMA3_TEMPLATE
        fast.save_pretrained(str(root / name))
        return root / name

    return {
        "chatml": root / "chatml",
        "minimind": test_data / MINIMIND,
        "llama3": llama3("llama3", adds_bos=False),
        "llama3-bos": llama3("llama3-bos", adds_bos=True),
        "default-system": _with_template(root / "chatml", root / "default-system", DEFAULT_SYSTEM_TEMPLATE),
        "rounds": _with_template(root / "chatml", root / "rounds", ROUNDS_TEMPLATE),
        "folded": _with_template(root / "chatml", root / "folded", FOLDED_SYSTEM_TEMPLATE),
        "shouting": _with_template(root / "chatml", root / "shouting", SHOUTING_TEMPLATE),
    }


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, [messages, ...]) -> [str, ...] through Go's text/template, Ollama's data shape."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go): the TEMPLATE is not checked with Go")
    work = tmp_path_factory.mktemp("go")
    (work / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GOFLAGS": "", "GOTOOLCHAIN": "local"}
    if not os.environ.get("GOCACHE") and not os.environ.get("HOME"):
        env["GOCACHE"] = str(work / "gocache")
    subprocess.run([go, "build", "-o", str(work / "render"), str(work / "main.go")], cwd=work, env=env,
                   check=True, capture_output=True, timeout=300)

    def render(template: str, cases: list[list[dict]]) -> list[str]:
        r = subprocess.run([str(work / "render")], input=json.dumps({"template": template, "cases": cases}),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    return render


def _jinja(tok_dir, messages: list[dict]) -> str:
    tok = load(tok_dir)
    last_is_assistant = messages[-1]["role"] == "assistant"
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=not last_is_assistant,
                                   continue_final_message=last_is_assistant)


def _conversations() -> list[list[dict]]:
    return [ollama._conversation(roles, realistic=True) for roles in ollama.CHECKS]


def _template_of(modelfile_text: str) -> str:
    """The TEMPLATE value as Ollama's Modelfile parser reads it: from `\"\"\"` to the first `\"\"\"` at
    the end of a line."""
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M)
    assert m, modelfile_text
    return m.group(1)


def _assert_parseable_by_ollama(text: str) -> None:
    # Ollama's parser drops non-printable runes (other than space, tab, CR, LF) and ends a
    # triple-quoted value at the first `"""`: the TEMPLATE must have neither inside.
    assert all(c.isprintable() or c in "\n\t" for c in text), text
    assert '"""' not in _template_of(text)


@pytest.mark.parametrize("name", ["chatml", "minimind", "llama3", "default-system"])
def test_go_text_template_renders_the_modelfile_template_like_the_jinja_template(toks, go_render, name, tmp_path):
    text = ollama.modelfile(toks[name], "model.gguf")
    _assert_parseable_by_ollama(text)
    convs = _conversations()
    got = go_render(_template_of(text), convs)
    want = [_jinja(toks[name], msgs) for msgs in convs]
    for msgs, g, w in zip(convs, got, want):
        assert g == w, ("+".join(m["role"] for m in msgs), g, w)
    # what the test compares is what the library promised: its own check agrees with Go
    fmt = ollama.chat_format(toks[name])
    assert [fmt.render(m) for m in convs] == got


def test_a_tokenizer_that_adds_bos_gets_a_template_without_it(toks, go_render):
    fmt = ollama.chat_format(toks["llama3-bos"])
    assert fmt.bos_left_to_tokenizer == "<|begin_of_text|>" and not fmt.preamble
    plain = ollama.chat_format(toks["llama3"])
    assert plain.preamble == "<|begin_of_text|>" and not plain.bos_left_to_tokenizer
    convs = _conversations()
    got = go_render(_template_of(ollama.modelfile(toks["llama3-bos"], "m.gguf")), convs)
    for msgs, g in zip(convs, got):  # llama.cpp adds the BOS token itself (add_bos): one BOS, as in transformers
        assert "<|begin_of_text|>" + g == _jinja(toks["llama3-bos"], msgs)


def test_decomposition_of_the_three_template_families(toks):
    chatml = ollama.chat_format(toks["chatml"])
    assert chatml.prefix == {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
    assert set(chatml.suffix.values()) == {"<|im_end|>\n"}
    assert chatml.generation == "<|im_start|>assistant\n" and chatml.stop == ("<|im_end|>",)
    assert chatml.preamble == chatml.default_system == "" and chatml.system_anywhere

    qwen3 = ollama.chat_format(toks["minimind"])  # the generation prefix carries an empty think block
    assert qwen3.generation == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert qwen3.prefix["assistant"] == qwen3.generation and qwen3.stop == ("<|im_end|>",)

    llama3 = ollama.chat_format(toks["llama3"])
    assert llama3.prefix["user"] == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert llama3.suffix["assistant"] == "<|eot_id|>" and llama3.stop == ("<|eot_id|>",)
    assert llama3.generation == "<|start_header_id|>assistant<|end_header_id|>\n\n"

    dflt = ollama.chat_format(toks["default-system"])
    assert dflt.default_system == "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    assert dflt.default_unless_first_is_system and "index .Messages 0" in dflt.go_template()


def test_our_chatml_constant_is_what_the_bpe_tokenizer_carries(toks):
    assert load(toks["chatml"]).chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("name, words", [
    ("rounds", "per-role prefixes and suffixes"),
    ("folded", "per-role prefixes and suffixes"),
    ("shouting", "verbatim"),
])
def test_templates_that_cannot_be_decomposed_are_refused(toks, name, words):
    with pytest.raises(ValueError, match=words) as e:
        ollama.modelfile(toks[name], "m.gguf")
    assert isinstance(e.value, ollama.TemplateError) and name in str(e.value)


def test_a_tokenizer_without_a_chat_template_is_refused(toks, tmp_path):
    bare = shutil.copytree(toks["chatml"], tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat_template"):
        ollama.modelfile(bare, "m.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        ollama.modelfile(tmp_path, "m.gguf")


def test_modelfile_lines(toks):
    text = ollama.modelfile(toks["llama3"], "demo-q8_0.gguf", params={"temperature": 0.2, "num_ctx": 2048,
                                                                      "stop": ["<|start_header_id|>"]})
    lines = text.splitlines()
    assert "FROM ./demo-q8_0.gguf" in lines
    assert [ln for ln in lines if ln.startswith("PARAMETER")] == [
        'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|start_header_id|>"',
        "PARAMETER temperature 0.2", "PARAMETER num_ctx 2048"]
    assert text.count('TEMPLATE """') == 1 and ".Messages" in text and ".Content" in text and ".Role" in text
    for bad in ("../x.gguf", "x.bin", "", 'a"b.gguf'):
        with pytest.raises(ValueError, match="gguf_name"):
            ollama.modelfile(toks["chatml"], bad)
    with pytest.raises(ValueError, match="params"):
        ollama.modelfile(toks["chatml"], "m.gguf", params={"Bad Name": 1})


def test_write_bundle_links_the_gguf_beside_the_modelfile(toks, tmp_path):
    gguf = tmp_path / "exports" / "demo-q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    out = tmp_path / "bundle"
    info = ollama.write_bundle(gguf, toks["minimind"], out)
    assert info["placed"] == "hardlink" and info["stop"] == ["<|im_end|>"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "demo-q8_0.gguf"]
    assert os.path.samefile(out / "demo-q8_0.gguf", gguf)
    text = (out / "Modelfile").read_text()
    assert "FROM ./demo-q8_0.gguf\n" in text and _template_of(text) == info["template"]
    assert not temp_files(out)

    # the export task's layout: the GGUF is already in the bundle dir; an older Modelfile is replaced
    (out / "Modelfile").write_text("stale")
    again = ollama.write_bundle(out / "demo-q8_0.gguf", toks["minimind"], out)
    assert again["placed"] == "in place" and (out / "Modelfile").read_text() == text
    with pytest.raises(FileNotFoundError):
        ollama.write_bundle(tmp_path / "missing.gguf", toks["minimind"], out)


def test_a_refused_template_writes_nothing(toks, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ollama.TemplateError):
        ollama.write_bundle(gguf, toks["rounds"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
