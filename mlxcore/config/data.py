"""Data: synthetic tasks, sources (files, downloads, weighted mixtures), filters, the tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlxcore.config.base import _Strict


# copy, sort and the bench suites' formats (json_calc: the bench's json suite); arithmetic, json: own formats
SyntheticTask = Literal["copy", "sort", "arithmetic", "json", "math_mcq", "qa", "logic", "knowledge", "json_calc"]


class SyntheticConfig(_Strict):
    """Deterministic synthetic tasks: every example is a function of (seed, split, index)."""

    tasks: list[SyntheticTask] | dict[SyntheticTask, float] = Field(
        ["copy", "copy", "sort", "arithmetic", "json"],
        description="A list (a task listed twice comes twice as often) or {task: weight}: tasks come in exactly "
                    "these proportions (mlxcore/data/proportional.py).")
    working: bool = Field(False, description="Reading (qa) and logic answers show their working in a <think> "
                                             "block: the asked people's facts copied, a boolean expression "
                                             "reduced a level at a time, an ordering as 'taller > shorter' pairs.")
    pretrain_docs: int = Field(24000, gt=0, description="Plain-text documents for pretraining.")
    sft_examples: int = Field(8000, gt=0, description="User/assistant conversations for SFT.")
    val_examples: int = Field(400, gt=0, description="Held-out documents and conversations each.")
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, value):
        if not value or (isinstance(value, dict) and not any(w > 0 for w in value.values())):
            raise ValueError("name at least one task (with a weight > 0)")
        if isinstance(value, dict) and any(not w >= 0 or w == float("inf") for w in value.values()):
            raise ValueError("task weights are finite numbers >= 0")
        return value


ROW_FORMAT = Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids"]


class MixSource(_Strict):
    """One source of a weighted mixture (`sources` of `data.pretrain` / `data.sft`): mlxcore/data/mixture.py.

    A data catalog's named mixes are lists of these dicts ({spec, weight, format, columns, epochs})."""

    spec: str = Field(min_length=1, description="A download spec of its files (as in train).")
    weight: float = Field(1.0, ge=0, description="Its share of the training sequences: weight / the sum of the weights.")
    epochs: float | None = Field(None, gt=0, description="At most this many passes over it: a run whose steps and "
                                                         "weights need more fails before training; null: no limit.")
    format: ROW_FORMAT | None = Field(None, description="Its row schema; null: the section's format.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our field <- its column, e.g. {text: body} "
                                                                      "or {prompt: question, response: solution}.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="Its name in reports and cursors; default: <index>-<file name in the spec>.")


def _source_name(spec: str, index: int) -> str:
    """`1-web` for `data/web/*.jsonl`, `0-books` for `hf:o/n/books.parquet`: index + the spec's last name."""
    import re

    for part in reversed(re.split(r"[/:@\\]", spec)):
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", re.sub(r"[*?\[\]]", "", part).split(".")[0]).strip("-_")[:40]
        if slug:
            return f"{index}-{slug}"
    return f"{index}-source"


class SourceConfig(_Strict):
    """Where one kind of data (pretrain text or SFT chats) comes from and how rows become examples.

    `train` / `val` take download specs: `minimind:smoke|small|auto|<file>`, `gsm8k:train|test`,
    `hf:<owner>/<name>[@revision]/<path>` (hub datasets), or local files and globs (JSONL, a JSON
    array, parquet, or .txt whose blank-line-separated paragraphs are documents). Instead of
    `train`, `sources` is a weighted mixture of such specs (README: "Data mixtures and filters").
    """

    train: list[str] = Field([], description="Specs of the training files (one source); or set sources.")
    val: list[str] = Field([], description="Specs of held-out files; empty: hold out val_fraction of train.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Train rows held out when val is empty (fixed by row number).")
    val_max_rows: int = Field(1000, gt=0, description="At most this many held-out rows.")
    format: Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids"] = Field(
        "auto", description="Row schema; auto: detected from each file's first row.")
    text_field: str = Field("text", description="text format: the field holding the document.")
    prompt_field: str | None = Field(None, description="instruction format: the prompt's field; default: the first of "
                                                       "prompt, instruction, question, query the row has (Dolly's "
                                                       "context and Alpaca's input added to it).")
    response_field: str = Field("response", description="instruction format: the response's field.")
    prompt_format: str | None = Field(None, description="Template over the row's fields for the user turn, e.g. 'Q: {question}'.")
    response_format: str | None = Field(None, description="Template over the row's fields for the assistant turn.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_tokens: int | None = Field(None, gt=1, description="Per-document token limit; SFT default: its seq_len + 1.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What happens to documents over max_tokens.")
    sources: list[MixSource] = Field([], description="A weighted mixture instead of train: per source its spec, "
                                                     "weight, epochs, format, columns; each holds out val_fraction.")

    @field_validator("sources")
    @classmethod
    def _weights(cls, value: list[MixSource]) -> list[MixSource]:
        if value and not sum(s.weight for s in value) > 0:
            raise ValueError(f"the weights of the sources sum to {sum(s.weight for s in value):g}: "
                             "give at least one source a positive weight")
        names = [s.name or _source_name(s.spec, i) for i, s in enumerate(value)]
        if len(set(names)) != len(names):
            raise ValueError(f"sources need distinct names, got {names}")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "SourceConfig":
        if bool(self.train) == bool(self.sources):
            raise ValueError("set train (one source) or sources (a weighted mixture)"
                             + (", not both" if self.train else ""))
        if self.sources and self.val:
            raise ValueError("val: with sources, each source holds out val_fraction of its rows; val files are not taken")
        return self

    def mixture(self) -> list[dict]:
        """The sources as plain dicts, each with its name (what the stages and the loader record)."""
        return [{"name": s.name or _source_name(s.spec, i), "spec": s.spec, "weight": s.weight, "epochs": s.epochs,
                 "format": s.format, "columns": dict(s.columns)} for i, s in enumerate(self.sources)]

    @field_validator("prompt_format", "response_format")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            from mlxcore.data.records import template_fields

            try:
                if not template_fields(value):
                    raise ValueError("it uses no {field} of the row")
            except ValueError as e:
                raise ValueError(f"bad template {value!r}: {e}") from None
        return value

    def options(self) -> dict:
        """The format options pretokenize and tokenizer training take."""
        return self.model_dump(exclude={"train", "val", "max_tokens", "sources"})


class FilterConfig(_Strict):
    """Row filters between download and pretokenize (mlxcore/data/filters.py) over every real source of
    a kind (not the synthetic tasks). All off by default, and then no filter stage runs at all."""

    min_chars: int = Field(0, ge=0, description="Drop rows with fewer characters of text; 0: no lower bound.")
    max_chars: int | None = Field(None, gt=0, description="Drop rows with more characters; null: no upper bound "
                                                           "(a token bound: max_tokens with overlong: drop).")
    drop_control: bool = Field(False, description="Drop rows with control characters (but tab, newline, CR), "
                                                  "lone surrogates or U+FFFD (bytes that were not text).")
    scripts: list[Literal["latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "cjk"]] = Field(
        [], description="Keep rows whose letters are mostly of these scripts; empty: off.")
    min_script_fraction: float = Field(0.5, gt=0, le=1, description="The share of a row's letters that must be in "
                                                                     "`scripts`.")
    exact_dedup: bool = Field(False, description="Drop rows whose content equals an earlier row's (a content hash).")
    near_dedup: bool = Field(False, description="Drop near-duplicates of earlier rows (MinHash LSH, datasketch).")
    near_dup_threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity of two rows' "
                                                                    "shingles that makes one a near-duplicate.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a closer estimate, slower).")
    shingle: Literal["words", "chars"] = Field("words", description="Shingles of words, or of characters (text "
                                                                    "without spaces between words).")
    shingle_size: int = Field(5, gt=0, description="Words (or characters) per shingle.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bounds(self) -> "FilterConfig":
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars={self.max_chars} is below min_chars={self.min_chars}")
        return self

    @property
    def active(self) -> bool:
        """Whether any filter is on (else the pipeline runs no filter stage)."""
        return bool(self.min_chars or self.max_chars is not None or self.drop_control or self.scripts
                    or self.exact_dedup or self.near_dedup)


class DataConfig(_Strict):
    """Training data: real sources per kind, or (when unset) the synthetic tasks below."""

    synthetic: SyntheticConfig = SyntheticConfig()
    pretrain: SourceConfig | None = Field(None, description="Pretraining text; unset: synthetic.")
    sft: SourceConfig | None = Field(None, description="SFT conversations; unset: synthetic.")
    max_download_mb: float = Field(2048, gt=0, description="Refuse hub files larger than this (checked before downloading).")
    workers: int = Field(0, ge=0, description="Pretokenize processes; 0: every core (one process for small inputs).")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Row filters (dedup, near-dup, length, "
                                                                            "charset) before pretokenize; off by default.")

    @property
    def uses_synthetic(self) -> bool:
        return self.pretrain is None or self.sft is None


class TokenizerConfig(_Strict):
    path: str | None = Field(None, description="A local Hugging Face tokenizer dir; unset: train a BPE.")
    vocab_size: int = Field(1024, ge=300, description="Size of the byte-level BPE to train.")
    min_frequency: int = Field(2, ge=1)
    train_mb: float = Field(256, gt=0, description="Train the BPE on at most this much text (MB) of the train files.")
