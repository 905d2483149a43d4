"""Every input format and file type becomes the right tokens and loss masks; parallel = serial."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxcore.data import files, pretokenize, records, tokenizer as tokenizers
from mlxcore.data.loader import documents
from mlxcore.data.records import DataError


def _docs(out, split="train"):
    return list(documents(out, split))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(tmp_path, small_data, rows, name="rows.jsonl", out="out", **source):
    src = _write(tmp_path / name, rows)
    out = tmp_path / out
    m = pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "sft", out, source=source,
                                progress_bar=False)
    return m, _docs(out), tokenizers.load(small_data["tok"])


def _learned(tok, doc):
    toks, mask = doc
    return tok.decode(toks[mask == 1])


CASES = {  # format: (row, user turn, assistant turn)
    "conversations": ({"conversations": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}]},
                      "Sort: 3 1", "1 3"),
    "messages": ({"messages": [{"role": "user", "content": "Copy: ab"}, {"role": "assistant", "content": "ab"}]}, "Copy: ab", "ab"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}]}, "hi there", "hello"),
    "alpaca": ({"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}, "Add the numbers\n\n2 and 3", "5"),
    "alpaca_no_input": ({"instruction": "Say yes", "input": "", "output": "yes"}, "Say yes", "yes"),
    "gsm8k": ({"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}, "What is 2+3?", "2+3=<<2+3=5>>5\n#### 5"),
    "instruction": ({"prompt": "Name a color", "response": "red"}, "Name a color", "red"),
    "completion": ({"prompt": "Name a fruit", "completion": "plum"}, "Name a fruit", "plum"),
    # Dolly-15k's rows: the context is the passage the instruction is about, not to be dropped
    "dolly": ({"instruction": "Who sat?", "context": "The cat sat on the mat.", "response": "The cat.",
               "category": "closed_qa"}, "Who sat?\n\nThe cat sat on the mat.", "The cat."),
    "dolly_no_context": ({"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"}, "Say hi", "hi"),
    "metamath": ({"query": "What is 2+3?", "response": "5", "type": "GSM_Rephrased"}, "What is 2+3?", "5"),
    "lmsys": ({"conversation_id": "c1", "model": "vicuna-13b", "turn": 1, "language": "English",
               "conversation": [{"role": "user", "content": "Copy: ab"}, {"role": "assistant", "content": "ab"}]},
              "Copy: ab", "ab"),
    "capybara": ({"source": "Airoboros", "conversation": [{"input": "hi there", "output": "hello"}]}, "hi there", "hello"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_sft_format_is_detected_rendered_and_masked_to_the_answer(case, tmp_path, small_data):
    row, user, answer = CASES[case]
    m, docs, tok = _sft(tmp_path, small_data, [row] * 3)
    fmt = ("conversations" if case in ("messages", "sharegpt", "lmsys", "capybara") else "instruction" if case == "completion"
           or case.startswith("dolly") or case == "metamath" else case.split("_")[0])
    assert m["formats"] == {"rows.jsonl": fmt}
    assert len(docs) == 3 and m["stats"]["rows"] == 6
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    for doc in docs:
        assert tok.decode(doc[0]) == tok.apply_chat_template(msgs, tokenize=False)
        assert _learned(tok, doc) == answer + tok.eos_token


def test_a_row_s_own_system_prompt_and_trl_s_conversational_prompt_completion(tmp_path, small_data):
    """OpenOrca's rows carry their system prompt ("system_prompt"), which becomes the system turn
    (it was dropped: the rows did not even load). TRL's conversational prompt-completion rows give
    both sides as message lists: the prompt's turns are context, only the completion is learned."""
    orca = {"id": "niv.1", "system_prompt": "Be brief.", "question": "Name a color", "response": "red"}
    m, docs, tok = _sft(tmp_path, small_data, [orca] * 2)
    assert m["formats"] == {"rows.jsonl": "instruction"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color"},
            {"role": "assistant", "content": "red"}]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _learned(tok, docs[0]) == "red" + tok.eos_token

    trl = {"prompt": [{"role": "system", "content": "Count."}, {"role": "user", "content": "one"},
                      {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
           "completion": [{"role": "assistant", "content": "four"}]}
    m, docs, tok = _sft(tmp_path, small_data, [trl] * 2, name="trl.jsonl", out="trl")
    assert m["formats"] == {"trl.jsonl": "instruction"}
    msgs = trl["prompt"] + trl["completion"]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _learned(tok, docs[0]) == "four" + tok.eos_token  # not the prompt's "two"

    capybara = {"conversation": [{"input": "one", "output": "two"}, {"input": "three", "output": "four"}]}
    _, docs, tok = _sft(tmp_path, small_data, [capybara] * 2, name="capy.jsonl", out="capy")
    msgs = [{"role": r, "content": c} for r, c in (("user", "one"), ("assistant", "two"), ("user", "three"),
                                                   ("assistant", "four"))]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _learned(tok, docs[0]) == "two" + tok.eos_token + "four" + tok.eos_token  # every turn's reply

    bad = [({**trl, "completion": [{"role": "user", "content": "five"}]}, r"trl-bad.jsonl:1: field 'completion' has no assistant"),
           ({**orca, "system_prompt": ["Be brief."]}, r"trl-bad.jsonl:1: field 'system_prompt' must be a string")]
    for row, message in bad:
        with pytest.raises(DataError, match=message):
            _sft(tmp_path, small_data, [row], name="trl-bad.jsonl", out="trl-bad")
        assert not (tmp_path / "trl-bad").exists()


def test_templates_custom_fields_and_system_prompt(tmp_path, small_data):
    rows = [{"q": "2+2", "a": "4", "id": 7}]
    _, docs, tok = _sft(tmp_path, small_data, rows, format="instruction", prompt_format="Q{id}: {q}?",
                        response_format="A: {a}", system_prompt="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q7: 2+2?"},
            {"role": "assistant", "content": "A: 4"}]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _learned(tok, docs[0]) == "A: 4" + tok.eos_token
    _, docs, _ = _sft(tmp_path, small_data, [{"ask": "hi", "say": "yo"}], name="b.jsonl", out="b", format="instruction",
                      prompt_field="ask", response_field="say")
    assert _learned(tok, docs[0]) == "yo" + tok.eos_token


def test_a_template_naming_a_missing_field_is_a_row_error(tmp_path, small_data):
    with pytest.raises(DataError, match=r"rows.jsonl:1: prompt_format 'Q: \{question\}' needs field 'question'"):
        _sft(tmp_path, small_data, [{"q": "x", "response": "y"}], format="instruction", prompt_format="Q: {question}")
    assert not (tmp_path / "out").exists()


def test_multi_turn_masks_every_assistant_turn(tmp_path, small_data):
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    _, docs, tok = _sft(tmp_path, small_data, [{"messages": conv}])
    assert _learned(tok, docs[0]) == "b" + tok.eos_token + "d" + tok.eos_token


def test_content_parts_and_weight_zero_turns_as_openai_and_hf_chat_data_write_them(tmp_path, small_data):
    """Content as a list of text parts (OpenAI's format, Hugging Face chat templates) renders as the
    parts back to back; an assistant turn with "weight": 0 is context (rendered, not learned)."""
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": "b", "weight": 0},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": [{"type": "text", "text": "d"}], "weight": 1}]
    _, docs, tok = _sft(tmp_path, small_data, [{"messages": parts}])
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(plain, tokenize=False)
    assert _learned(tok, docs[0]) == "d" + tok.eos_token  # "b" is in the tokens, not in the loss


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "y"}],
     "rows.jsonl:1: message 0 content part 0 is 'image_url', not text"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}],
     "rows.jsonl:1: message 1: 'weight' is for assistant messages and must be 0 or 1, got 0.5"),
    ([{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}],
     "rows.jsonl:1: message 0: 'weight' is for assistant messages"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}],
     "rows.jsonl:1: no assistant message to learn from (every one has weight 0)"),
    ([{"role": "user", "content": []}, {"role": "assistant", "content": "y"}], "rows.jsonl:1: message 0 needs 'role'"),
])
def test_unusable_parts_and_weights_fail_naming_file_line_and_message(messages, says, tmp_path, small_data):
    with pytest.raises(DataError) as err:
        _sft(tmp_path, small_data, [{"messages": messages}])
    assert says in str(err.value)
    assert not (tmp_path / "out").exists()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "sunny, 21C"}, {"role": "assistant", "content": "Sunny, 21C."}]


@pytest.mark.parametrize("case", ["openai", "llama_factory_sharegpt"])
def test_tool_calling_rows_render_their_tools_and_learn_the_calls_not_the_results(case, tmp_path, small_data):
    """OpenAI's tool-calling rows (arguments as JSON text, a "tool" turn, the row's "tools") and
    LLaMA-Factory's ShareGPT form ("function_call" / "observation" turns, "tools" as JSON text) are
    the same conversation: rendered with the tools by the chat template, the assistant's call and
    its final answer learned, the tool's result not."""
    if case == "openai":
        row = {"messages": [TOOL_CHAT[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}, TOOL_CHAT[3]], "tools": [WEATHER]}
    else:
        row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                 {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                                 {"from": "observation", "value": "sunny, 21C"}, {"from": "gpt", "value": "Sunny, 21C."}],
               "tools": json.dumps([WEATHER])}
    _, docs, tok = _sft(tmp_path, small_data, [row])
    rendered = tok.decode(docs[0][0])
    assert rendered == tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER], tokenize=False)
    assert '"name": "get_weather"' in rendered.split("<tools>")[1] and "<|im_start|>tool\nsunny, 21C" in rendered
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert _learned(tok, docs[0]) == call + tok.eos_token + "Sunny, 21C." + tok.eos_token


def test_openai_s_other_spellings_are_the_same_conversation(tmp_path, small_data):
    """OpenAI's "developer" role (its system message since o1), the deprecated functions API (an
    assistant "function_call", a "function" result turn), a tool result given as a JSON value, and
    Gemma's / ShareGPT's role names: normalised to the conversation the template renders."""
    row = {"messages": [{"role": "developer", "content": "Be brief."}, TOOL_CHAT[0],
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"role": "function", "name": "get_weather", "content": {"sky": "sunny", "temp": "21C"}},
                        TOOL_CHAT[3]], "tools": [WEATHER]}
    _, docs, tok = _sft(tmp_path, small_data, [row])
    want = [{"role": "system", "content": "Be brief."}, *TOOL_CHAT[:2],
            {"role": "tool", "name": "get_weather", "content": '{"sky": "sunny", "temp": "21C"}'}, TOOL_CHAT[3]]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(want, tools=[WEATHER], tokenize=False)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert _learned(tok, docs[0]) == call + tok.eos_token + "Sunny, 21C." + tok.eos_token
    # Gemma's "model" and ShareGPT's names under "role" are the assistant and the user
    _, docs, _ = _sft(tmp_path, small_data, [{"messages": [{"role": "human", "content": "Hi"}, {"role": "model", "content": "Hello."},
                                                           {"role": "user", "content": "Bye"}, {"role": "gpt", "content": "Bye."}]}],
                      out="aliases")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(chat, tokenize=False)
    assert _learned(tok, docs[0]) == "Hello." + tok.eos_token + "Bye." + tok.eos_token
    with pytest.raises(DataError, match="rows.jsonl:1: message 0 needs 'role'"):  # a JSON value is a tool result's only
        _sft(tmp_path, small_data, [{"messages": [{"role": "user", "content": {"q": 1}}, TOOL_CHAT[3]]}], out="user")


def test_tool_calls_through_minimind_s_own_qwen_style_template(tmp_path, test_data):
    """MiniMind's tokenizer (the test data) has a Qwen-style template with its own tool format
    (results as <tool_response> in a user turn): the call is learned, the response is not."""
    tok_dir = test_data / "minimind_tokenizer"
    src = _write(tmp_path / "rows.jsonl", [{"messages": TOOL_CHAT, "tools": [WEATHER]}])
    pretokenize.pretokenize({"train": [src], "val": [src]}, tok_dir, "sft", tmp_path / "out", progress_bar=False)
    tok = tokenizers.load(tok_dir)
    doc = _docs(tmp_path / "out")[0]
    assert tok.decode(doc[0]) == tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER], tokenize=False)
    learned = _learned(tok, doc)
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in learned and learned.endswith("Sunny, 21C." + tok.eos_token)
    assert "sunny, 21C" not in learned and "<tool_response>" in tok.decode(doc[0])


@pytest.mark.parametrize("row, says", [
    ({"messages": [TOOL_CHAT[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}]},
     "rows.jsonl:1: message 1 tool call 0 needs"),
    ({"messages": [TOOL_CHAT[0], {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
     "rows.jsonl:1: message 1: 'tool_calls' must be a non-empty list on an assistant message"),
    ({"messages": TOOL_CHAT, "tools": {"name": "f"}}, "rows.jsonl:1: field 'tools' must be a list of tool definitions"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     "rows.jsonl:1: message 1 (function_call) must be the JSON of a call"),
])
def test_malformed_tool_calls_fail_naming_file_line_and_message(row, says, tmp_path, small_data):
    with pytest.raises(DataError) as err:
        _sft(tmp_path, small_data, [row])
    assert says in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_template_that_cannot_render_a_tool_turn_fails_naming_the_row(tmp_path, small_data):
    import shutil

    tok_dir = tmp_path / "tok"
    shutil.copytree(small_data["tok"], tok_dir)
    tok = tokenizers.load(tok_dir)
    tok.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
                         "{%- endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}")
    tok.save_pretrained(str(tok_dir))
    src = _write(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                                           {"messages": TOOL_CHAT}])
    with pytest.raises(DataError, match=r"rows.jsonl:2: the tokenizer's chat template cannot render this conversation: "
                                        r"\w+: no tool turns"):
        pretokenize.pretokenize({"train": [src], "val": [src]}, tok_dir, "sft", tmp_path / "out", progress_bar=False)
    assert not (tmp_path / "out").exists()


def test_pretokenized_ids_are_used_as_they_are(tmp_path, small_data):
    rows = [{"ids": [5, 6, 7, 8], "mask": [0, 0, 1, 1]}, {"ids": [9, 10, 11], "labels": [-100, 10, 11]}]
    _, docs, _ = _sft(tmp_path, small_data, rows)
    assert [d[0].tolist() for d in docs] == [[5, 6, 7, 8], [9, 10, 11]]
    assert [d[1].tolist() for d in docs] == [[0, 0, 1, 1], [0, 1, 1]]
    src = _write(tmp_path / "pt.jsonl", [{"ids": [1, 2, 3]}, {"ids": [4]}])
    pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "pretrain", tmp_path / "pt", progress_bar=False)
    assert [d[0].tolist() for d in _docs(tmp_path / "pt")] == [[1, 2, 3], [4]]  # no separator added


def test_chat_rows_can_be_pretraining_text(tmp_path, small_data):
    row = CASES["alpaca"][0]
    src = _write(tmp_path / "a.jsonl", [row])
    pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "pretrain", tmp_path / "o", progress_bar=False)
    tok = tokenizers.load(small_data["tok"])
    (toks, mask), = _docs(tmp_path / "o")
    msgs = [{"role": "user", "content": CASES["alpaca"][1]}, {"role": "assistant", "content": "5"}]
    assert mask is None and tok.decode(toks[:-1]) == tok.apply_chat_template(msgs, tokenize=False)


def test_the_pipeline_s_own_source_options_read_dolly_and_trl_rows_too(tmp_path, small_data):
    """The pipeline and finetune flows pass `SourceConfig.options()`; its `prompt_field` was "prompt"
    by default, which turned off the field detection: Dolly's instruction rows and TRL's message-list
    prompt-completion rows failed there while `mlxflow pretokenize` read them."""
    from mlxcore.config.data import SourceConfig

    opts = SourceConfig(train=["x"]).options()
    dolly = {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.", "response": "Shakespeare",
             "category": "closed_qa"}
    _, docs, tok = _sft(tmp_path, small_data, [dolly] * 2, name="dolly.jsonl", out="dolly", **opts)
    assert tok.decode(docs[0][0]) == tok.apply_chat_template(
        [{"role": "user", "content": "Who wrote it?\n\nHamlet is a play by Shakespeare."},
         {"role": "assistant", "content": "Shakespeare"}], tokenize=False)
    trl = {"prompt": [{"role": "user", "content": "one"}], "completion": [{"role": "assistant", "content": "two"}]}
    _, docs, tok = _sft(tmp_path, small_data, [trl] * 2, name="trl.jsonl", out="trl", **opts)
    assert _learned(tok, docs[0]) == "two" + tok.eos_token


def test_parquet_s_null_filled_keys_are_absent_keys(tmp_path, small_data):
    """Arrow (parquet, `datasets`' exports) gives every message every key any message has, null where
    it has none: a null `weight` on a user turn is no weight (it failed the row), and a tool schema's
    null keys (another tool's properties, `"required": null`) are not part of the tool."""
    from mlxcore.data.messages import tools_of

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "skip", "weight": 0},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo", "weight": 1}]}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "w.parquet")
    assert pq.read_table(tmp_path / "w.parquet").to_pylist()[0]["messages"][0]["weight"] is None  # what Arrow gives
    out = tmp_path / "w"
    pretokenize.pretokenize({"train": [tmp_path / "w.parquet"], "val": [tmp_path / "w.parquet"]}, small_data["tok"],
                            "sft", out, progress_bar=False)
    tok = tokenizers.load(small_data["tok"])
    assert _learned(tok, _docs(out)[0]) == "yo" + tok.eos_token

    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "string"}},
                                                                         "required": ["x"]}}},
             {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {"y": {"type": "integer"}}}}}]
    pq.write_table(pa.Table.from_pylist([{"tools": tools}]), tmp_path / "t.parquet")
    stored = pq.read_table(tmp_path / "t.parquet").to_pylist()[0]
    assert stored["tools"][1]["function"]["parameters"]["required"] is None  # Arrow's fill
    assert tools_of(stored, "t.parquet:1") == tools


def test_parquet_json_array_and_txt_inputs(tmp_path, small_data):
    table = pa.table({"question": ["1+1?", "2+2?"], "answer": ["#### 2", "#### 4"]})
    pq.write_table(table, tmp_path / "g.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "yo"}] * 2))
    tok = tokenizers.load(small_data["tok"])
    for name in ("g.parquet", "a.json"):
        out = tmp_path / f"out-{name}"
        src = tmp_path / name
        pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "sft", out, progress_bar=False)
        learned = [_learned(tok, d) for d in _docs(out)]
        assert learned == (["#### 2<|im_end|>", "#### 4<|im_end|>"] if name.endswith("parquet") else ["yo<|im_end|>"] * 2)
    (tmp_path / "t.txt").write_text("First para\nline two\n\n\n  \nSecond para\n")
    pretokenize.pretokenize({"train": [tmp_path / "t.txt"], "val": [tmp_path / "t.txt"]}, small_data["tok"], "pretrain",
                            tmp_path / "txt", progress_bar=False)
    assert [tok.decode(d[0][:-1]) for d in _docs(tmp_path / "txt")] == ["First para\nline two", "Second para"]


def test_overlong_rows_are_truncated_or_dropped_and_counted(tmp_path, small_data):
    short = {"prompt": "a", "response": "b"}
    long_answer = {"prompt": "a", "response": "word " * 200}
    long_prompt = {"prompt": "word " * 200, "response": "b"}  # the answer is cut away entirely
    rows = [short, long_answer, long_prompt]
    m, docs, tok = _sft(tmp_path, small_data, rows, max_tokens=None)
    assert m["stats"]["truncated"] == 0 and len(docs) == 3
    for overlong, kept, stats in (("truncate", 2, {"truncated": 4, "dropped_no_labels": 2, "dropped_overlong": 0}),
                                  ("drop", 1, {"truncated": 0, "dropped_no_labels": 0, "dropped_overlong": 4})):
        out = tmp_path / overlong
        src = tmp_path / "rows.jsonl"
        m = pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], "sft", out, max_tokens=64,
                                    source={"overlong": overlong}, progress_bar=False)
        assert {k: m["stats"][k] for k in stats} == stats and m["stats"]["rows"] == 6
        docs = _docs(out)
        assert len(docs) == kept and all(len(t) <= 64 for t, _ in docs)


def test_held_out_rows_are_a_fixed_capped_fraction_of_train(tmp_path, small_data):
    rows = [{"text": f"document number {i}"} for i in range(2000)]
    src = _write(tmp_path / "t.jsonl", rows)
    tok = tokenizers.load(small_data["tok"])

    def run(name, **source):
        out = tmp_path / name
        pretokenize.pretokenize({"train": [src]}, small_data["tok"], "pretrain", out, source=source, progress_bar=False)
        return {s: [tok.decode(t[:-1]) for t, _ in _docs(out, s)] for s in ("train", "val")}

    a, b = run("a", val_fraction=0.05), run("b", val_fraction=0.05)
    assert a == b and 70 <= len(a["val"]) <= 130
    assert sorted(a["train"] + a["val"]) == sorted(r["text"] for r in rows) and not set(a["train"]) & set(a["val"])
    capped = run("c", val_fraction=0.05, val_max_rows=10)
    assert capped["val"] == a["val"][:10]


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 4096)  # many chunks, read in this process
    rows = [{"conversations": [{"role": "user", "content": f"Compute: {i} + {i}"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(3000)]
    src = _write(tmp_path / "c.jsonl", rows)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        m = pretokenize.pretokenize({"train": [src]}, small_data["tok"], "sft", out, workers=workers, progress_bar=False)
        outs[workers] = (m["digest"], {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.bin"))})
    assert outs[1] == outs[2] and len(outs[1][1]) == 6


def test_progress_is_reported_up_to_the_total(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 2048)
    src = _write(tmp_path / "t.jsonl", [{"text": "some words " * 20}] * 300)
    seen = []
    pretokenize.pretokenize({"train": [src]}, small_data["tok"], "pretrain", tmp_path / "o",
                            on_progress=lambda done, total: seen.append((done, total)), progress_bar=False)
    total = src.stat().st_size
    assert len(seen) > 10 and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_worker_processes_do_not_rerun_the_callers_script(tmp_path, small_data):
    """A script without a __main__ guard (a notebook export, a quick script) still works with workers."""
    import subprocess
    import sys

    src = _write(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(500)])
    marker = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(
        "from mlxcore.data import pretokenize\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        f"m = pretokenize.pretokenize({{'train': [{str(src)!r}]}}, {str(small_data['tok'])!r}, 'pretrain', "
        f"{str(tmp_path / 'out')!r}, workers=2, progress_bar=False)\n"
        "print(m['splits']['train']['num_docs'] + m['splits']['val']['num_docs'])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["500"] and marker.read_text() == "ran\n"


def test_a_dataset_too_small_to_hold_out_a_row_says_so(tmp_path, small_data):
    src = _write(tmp_path / "t.jsonl", [{"text": "only one"}, {"text": "and two"}])
    with pytest.raises(DataError, match=r"no pretrain held-out rows: 2 rows x val_fraction 0.01 held out none"):
        pretokenize.pretokenize({"train": [src]}, small_data["tok"], "pretrain", tmp_path / "o", progress_bar=False)
    assert not (tmp_path / "o").exists()


BOM = b"\xef\xbb\xbf"
BOM_FILES = {  # name: (bytes without a BOM, kind)
    "rows.jsonl": (b"".join(json.dumps(r).encode() + b"\r\n" for r in (CASES["alpaca"][0], CASES["alpaca_no_input"][0])), "sft"),
    "rows.json": (json.dumps([CASES["instruction"][0], CASES["completion"][0]], indent=1).encode(), "sft"),
    "docs.txt": ("Première ligne\nline two\n\nSecond para\n".encode(), "pretrain"),
}


@pytest.mark.parametrize("name", sorted(BOM_FILES))
def test_a_utf8_byte_order_mark_at_the_start_is_skipped(name, tmp_path, small_data):
    data, kind = BOM_FILES[name]
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    plain, bom = tmp_path / "plain" / name, tmp_path / "bom" / name
    plain.write_bytes(data)
    bom.write_bytes(BOM + data)
    assert records.file_kind(bom) == records.file_kind(plain)
    rows = [example for _, example in records.iter_examples(plain, kind)]
    assert len(rows) == 2 and [example for _, example in records.iter_examples(bom, kind)] == rows
    # line numbers are unchanged by the BOM
    assert [w.rsplit(":", 1)[1] for w, _ in records.iter_examples(bom, kind)] == \
        [w.rsplit(":", 1)[1] for w, _ in records.iter_examples(plain, kind)]
    # and through pretokenize (worker processes and all): the same tokens
    for src in (plain, bom):
        pretokenize.pretokenize({"train": [src], "val": [src]}, small_data["tok"], kind, src.parent / "out",
                                progress_bar=False)
    for a, b in zip(_docs(plain.parent / "out"), _docs(bom.parent / "out"), strict=True):
        assert (a[0] == b[0]).all() and (a[1] is None) == (b[1] is None) and (a[1] is None or (a[1] == b[1]).all())


def test_a_bom_after_the_start_and_other_encodings_still_fail_naming_file_and_line(tmp_path):
    row = json.dumps(CASES["gsm8k"][0], ensure_ascii=False).replace("2+3", "2+3 é")
    cases = {  # file bytes: expected message after the path
        "later_bom.jsonl": ((row + "\n").encode() + BOM + (row + "\n").encode(), ":2: invalid JSON: Unexpected UTF-8 BOM"),
        "utf16.jsonl": ((row + "\n").encode("utf-16"), ":1: not UTF-8 text (byte 0xff at column 1)"),
        "utf16le.jsonl": ((row + "\n").encode("utf-16-le"), ":1: not UTF-8 text (byte 0xe9"),
        "latin1_with_bom.jsonl": (BOM + (row + "\n" + row + "\n").encode("latin-1"), ":1: not UTF-8 text (byte 0xe9"),
        "latin1.txt": ("ok\n\ncaf\xe9\n".encode("latin-1"), ":3: not UTF-8 text (byte 0xe9 at column 4)"),
        "utf16.json": (json.dumps([CASES["gsm8k"][0]]).encode("utf-16"), ":1: not UTF-8 text (byte 0xff at column 1)"),
    }
    for name, (data, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as e:
            list(records.iter_examples(path, "pretrain" if name.endswith(".txt") else "sft"))
        assert str(e.value).startswith(f"{path}{expect}"), (name, str(e.value))


def test_a_config_file_with_a_bom_loads_and_its_errors_keep_their_lines(tmp_path):
    from mlxcore.config import ConfigError, DistillConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(BOM + b"name: bommed\ntarget_rows: 700\n")
    config = load_config(path, cls=DistillConfig)
    assert (config.name, config.target_rows) == ("bommed", 700)
    path.write_bytes(BOM + b"name: bommed\ntarget_rows: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: target_rows"):
        load_config(path, cls=DistillConfig)
