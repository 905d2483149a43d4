"""Tokenizers in the Hugging Face layout: load a local one, or train a byte-level BPE.

A trained tokenizer splits digits one by one before BPE (as LLaMA and Qwen do), so numbers are
spelled digit by digit and arithmetic stays learnable. Special tokens follow MiniMind's:
`<|endoftext|>` (pad/unk, document separator), `<|im_start|>` (bos), `<|im_end|>` (eos), and
the chat template is ChatML. Nothing here executes code from a tokenizer directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mlxcore.data.records import read_rows
from mlxcore.io import MANIFEST, atomic_dir, dir_digest, write_manifest

if TYPE_CHECKING:  # pretokenize's worker processes import this module; pydantic configs are not needed there
    from mlxcore.config import TokenizerConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",  # a vision-language model's image processor (mlxcore/vlm)
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (its tokenizer.json; digits one by one): llama.cpp implements it as pre-tokenizer "qwen2"
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML. With tools (a row's "tools": JSON schemas, as OpenAI's and mlx-lm's chat data carry them)
# the system turn lists them, and an assistant turn's tool_calls follow its text as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>; a tool's result is a "tool" turn.
# Without tools and tool calls it renders exactly the plain ChatML it always did.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You can call these tools (JSON schemas):\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nTo call one, reply with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- ('\\n' if message['content'] or not loop.first else '') + '<tool_call>'"
    " + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson) + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load(tokenizer_dir: str | Path):
    """A transformers fast tokenizer from a local dir (offline, no remote code)."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def digest(tokenizer_dir: str | Path) -> str:
    """A tokenizer's content digest: a tokenizer stage's manifest digest, else (a model dir, a plain
    Hugging Face tokenizer dir) a hash of its tokenizer files."""
    import json

    manifest = Path(tokenizer_dir) / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if data.get("kind") == "tokenizer":
            return data["digest"]
    return dir_digest(tokenizer_dir, TOKENIZER_FILES)


# carried with the tokenizer files (a base model's sampling defaults and end-of-turn ids, which
# transformers' `generate` reads) but not part of the tokenizer's digest
CARRIED_FILES = ("generation_config.json",)


def copy_files(tokenizer_dir: str | Path, dest: str | Path) -> None:
    """Copy the tokenizer files of `tokenizer_dir` (e.g. into a checkpoint), and its generation_config.json."""
    for name in (*TOKENIZER_FILES, *CARRIED_FILES):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dest) / name)


def special_ids(tok) -> dict[str, int | None]:
    sep = tok.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tok.get_vocab() else None
    return {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "separator": sep if sep is not None else tok.eos_token_id,
    }


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str | Path) -> None:
    """Train a byte-level BPE on `texts` and save it (with a ChatML template) to `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1 << 20,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _corpus(corpus, max_bytes: int) -> Iterable[str]:
    """Training text: the train files of every (kind, inputs, format) source, up to `max_bytes`; the
    sources of a mixture take turns, a row each, so a large first source does not fill the budget."""
    from mlxcore.data.inputs import source_parts

    if isinstance(corpus, (str, Path)):  # a synthetic raw-dataset dir: both kinds
        corpus = [{"kind": kind, "inputs": corpus} for kind in ("pretrain", "sft")]
    used = 0
    for part in corpus:
        streams = [_texts(sub["inputs"], part["kind"], sub["opts"]) for sub in source_parts(part["inputs"], part.get("source"))]
        for text in _taking_turns(streams):
            yield text
            used += len(text.encode())
            if used >= max_bytes:
                return


def _texts(inputs, kind: str, opts: dict) -> Iterable[str]:
    from mlxcore.data.inputs import resolve_inputs

    for path in resolve_inputs(inputs, kind)["train"]:
        for row in read_rows(path, kind, opts.get("format", "auto"), opts):
            if isinstance(row, tuple):  # pretokenized ids: nothing to learn a vocabulary from
                break
            # role names too, so the chat template's words become tokens
            yield row if isinstance(row, str) else "\n".join(f"{m['role']}\n{m['content']}" for m in row)


def _taking_turns(streams: list) -> Iterable[str]:
    while streams:
        for stream in list(streams):
            try:
                yield next(stream)
            except StopIteration:
                streams.remove(stream)


def planned_size(cfg: TokenizerConfig) -> tuple[int, bool]:
    """(vocabulary size, exact?) known before the tokenizer stage runs: a local tokenizer's exact
    size; for a BPE still to train, its upper bound (merges stop early on a small corpus)."""
    if cfg.path:
        return len(load(cfg.path)), True
    return cfg.vocab_size, False


def load_or_train(cfg: TokenizerConfig, corpus, out_dir: str | Path) -> dict:
    """Copy a local tokenizer (cfg.path) or train a BPE on the corpus's train files.

    `corpus` is a synthetic raw-dataset dir, or a list of `{"kind", "inputs", "source"}`
    (inputs and source as `pretokenize` takes them).
    """
    with atomic_dir(out_dir) as tmp:
        if cfg.path:
            src = Path(cfg.path)
            tok = load(src)  # validates before copying
            copy_files(src, tmp)
            if not tok.chat_template:
                raise ValueError(f"{src}: tokenizer has no chat_template; SFT needs one")
        else:
            train_bpe(_corpus(corpus, int(cfg.train_mb * (1 << 20))), cfg.vocab_size, cfg.min_frequency, tmp)
        tok = load(tmp)
        return write_manifest(tmp, "tokenizer", cfg.model_dump(), vocab_size=len(tok), special_ids=special_ids(tok))
