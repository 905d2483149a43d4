"""The vocabulary of a GGUF: a Hugging Face byte-level BPE tokenizer as llama.cpp's `gpt2` model.

llama.cpp re-implements tokenization: it gets the tokens, their types and the merges from the
GGUF, and chooses how to pre-tokenize (split text into words before BPE) by a *name*,
`tokenizer.ggml.pre`. The name is read here from the structure of tokenizer.json's
pre_tokenizer, never guessed:

  ByteLevel(use_regex=True) alone                     -> "gpt-2"     (GPT-2's regex; MiniMind)
  Split(Qwen2's regex) + ByteLevel(use_regex=False)   -> "qwen2"     (Qwen2/3; ours since train_bpe)
  Split(Llama-3's regex) + ByteLevel(use_regex=False) -> "llama-bpe"

Anything else has no llama.cpp equivalent and is a ValueError naming what was found: a GGUF
that silently pre-tokenizes differently would feed the model other ids than it was trained on.
An NFC normalizer (Qwen2 ships one) is accepted, as llama.cpp's converter accepts it; llama.cpp
does not normalize, so only text that is not already NFC could tokenize differently.
SentencePiece tokenizers (`tokenizer.model`, llama.cpp's `llama` vocab) are not supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxcore.data.tokenizer import QWEN2_PRETOKENIZE_REGEX

LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {QWEN2_PRETOKENIZE_REGEX: "qwen2", LLAMA3_PRETOKENIZE_REGEX: "llama-bpe"}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # ChatML first
# gguf.TokenType values (llama.cpp's token attributes)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    tokens: list[str]  # id -> token string (byte-level form), padded to the model's vocab_size
    types: list[int]  # id -> NORMAL / CONTROL (special added) / USER_DEFINED (other added) / UNUSED (padding)
    merges: list[str]  # "a b", in rank order
    pre: str  # llama.cpp pre-tokenizer name
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _describe(step: dict) -> str:
    args = ", ".join(f"{k}={v if not isinstance(v, dict) else next(iter(v.values()), v)!r}"
                     for k, v in step.items() if k not in ("type", "pretokenizers"))
    inner = ", ".join(_describe(s) for s in step.get("pretokenizers") or [])
    return f"{step.get('type')}[{inner}]" if inner else f"{step.get('type')}({args})"


def detect_pre(tokenizer_json: dict, where: str = "tokenizer.json") -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE tokenizer.json; ValueError otherwise."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{where}: a {model.get('type')} model (byte_fallback={model.get('byte_fallback')}); "
                         "GGUF export supports byte-level BPE tokenizers only")
    norm = tokenizer_json.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{where}: normalizer {_describe(norm)} has no llama.cpp equivalent")
    decoder = tokenizer_json.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(f"{where}: decoder {_describe(decoder)} is not byte-level; llama.cpp would decode differently")
    pre = tokenizer_json.get("pre_tokenizer") or {"type": None}
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    name = None
    if types == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        name = "gpt-2"
    elif types == ["Split", "ByteLevel"]:
        split, byte_level = steps
        regex = SPLIT_PRE.get((split.get("pattern") or {}).get("Regex"))
        if (regex and split.get("behavior") == "Isolated" and not split.get("invert")
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")):
            name = regex
    if name is not None:
        # llama.cpp ignores merges (a word that is a token stays whole) for llama-bpe, and only there
        if bool(model.get("ignore_merges")) != (name == "llama-bpe"):
            raise ValueError(f"{where}: pre-tokenizer {name} with ignore_merges={bool(model.get('ignore_merges'))}: "
                             f"llama.cpp's {name} has ignore_merges={name == 'llama-bpe'}")
        return name
    raise ValueError(f"{where}: pre-tokenizer {_describe(pre)} has no llama.cpp equivalent (supported: "
                     "ByteLevel(use_regex=True) = gpt-2, Split(Qwen2 regex)+ByteLevel = qwen2, "
                     "Split(Llama-3 regex)+ByteLevel = llama-bpe); llama.cpp would tokenize differently")


def read_vocab(tokenizer_dir: str | Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer in `tokenizer_dir`, for a model with `vocab_size` rows."""
    from mlxcore.data.tokenizer import load

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        kind = "a SentencePiece tokenizer (tokenizer.model)" if (path.parent / "tokenizer.model").is_file() else "no tokenizer.json"
        raise ValueError(f"{path.parent}: {kind}; GGUF export supports byte-level BPE tokenizer.json only")
    data = json.loads(path.read_text())
    pre = detect_pre(data, str(path))
    vocab: dict[str, int] = data["model"]["vocab"]
    added = data.get("added_tokens") or []
    n_tok = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    if n_tok > vocab_size:
        raise ValueError(f"{path}: {n_tok} tokens but the model has only {vocab_size} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    for a in added:
        tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]

    tok = load(tokenizer_dir)  # transformers: which special tokens, and what encode() really adds
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    for t in END_OF_TURN:
        if t in tok.get_vocab() and (template is None or t in template):
            ids["eot"] = tok.convert_tokens_to_ids(t)
            break
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    extra = len(full) - len(plain)
    return Vocab(tokens, types, merges, pre, {k: v for k, v in ids.items() if v is not None},
                 add_bos=extra > 0 and full[0] == tok.bos_token_id and full[1:1 + len(plain)] == plain,
                 add_eos=extra > 0 and full[-1] == tok.eos_token_id and full[-1 - len(plain):-1] == plain,
                 chat_template=template)


def add_to(writer, vocab: Vocab) -> None:
    """Write `vocab` into a gguf.GGUFWriter's metadata."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for key, token_id in vocab.special.items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
