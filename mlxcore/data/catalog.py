"""The data catalog: datasets known by name, with their licenses, and recommended pretraining mixes.

The catalog is package data (`catalog.yaml` beside this module; its header documents an entry's
fields). `catalog:NAME` is a download spec (`mlxcore.data.download`) that fetches the entry's hub
file or `hfds:` split and rewrites its rows to our column names; `mlxflow data list` / `data show`
print it; `mix_sources("recommended-10B")` turns a named mix into the weighted source dicts
`data.pretrain.sources` takes.

    >>> from mlxcore.data import catalog
    >>> catalog.get("gsm8k-train").license
    'mit'
    >>> catalog.mix_sources("recommended-1B")
    [{'spec': 'catalog:fineweb-edu-10bt', 'weight': 0.9, 'epochs': 1.0}, {'spec': 'catalog:slimpajama', ...}]
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CATALOG_FILE = "catalog.yaml"
KINDS = ("pretrain", "sft", "preference", "rl", "eval", "vlm")
FORMATS = ("text", "conversations", "instruction", "alpaca", "gsm8k", "ids",  # SourceConfig.format
           "pairs", "pair-messages", "kto", "scored",  # PreferenceSourceConfig.format
           "image-text")  # vlm: an image column + text / label / question+answer (mlxcore.vlm.hub)
SPEC_PREFIXES = ("hf:", "hfds:")


class CatalogError(ValueError):
    """An unknown catalog or mix name (the message lists close matches), or a malformed catalog."""


class Size(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    bytes: int | None = Field(None, gt=0)

    def __str__(self) -> str:
        parts = [f"{_human(self.rows)} rows" if self.rows else "", f"{_human(self.tokens)} tokens" if self.tokens else "",
                 f"{_human(self.bytes, 'B')}" if self.bytes else ""]
        return ", ".join(p for p in parts if p) or "?"


class Entry(BaseModel):
    """One dataset of the catalog."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = Field(min_length=1)
    kind: tuple[Literal["pretrain", "sft", "preference", "rl", "eval", "vlm"], ...] = Field(min_length=1)
    spec: str | None = None
    repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]
    columns: dict[str, str] = {}
    size: Size = Size()
    license: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9.+-]*$")
    terms: str | None = None
    gated: bool = False
    access: str | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kinds(cls, value):
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "Entry":
        if self.spec is None and not self.access:
            raise ValueError("an entry without a spec needs `access` (how to get the data)")
        if self.spec is not None:
            if not self.spec.startswith(SPEC_PREFIXES):
                raise ValueError(f"spec {self.spec!r} must be a hub spec ({' or '.join(SPEC_PREFIXES)})")
            if self.format is None:
                raise ValueError("an entry with a spec needs `format`")
        if self.license == "other" and not self.terms:
            raise ValueError("license 'other' needs `terms` (what the license or terms of use ask)")
        return self

    @property
    def downloadable(self) -> bool:
        return self.spec is not None

    def summary(self) -> dict:
        """The entry as a plain dict (what `mlxflow data show` prints)."""
        return {"name": self.name, **self.model_dump(exclude={"name", "size"}), "size": str(self.size)}


class Mix(BaseModel):
    """A named, weighted list of catalog entries, with why these weights at this budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    budget_tokens: int = Field(gt=0)
    weights: dict[str, float] = Field(min_length=1)
    epochs: dict[str, float] = {}
    reasoning: str = Field(min_length=1)

    @model_validator(mode="after")
    def _weights(self) -> "Mix":
        if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
            raise ValueError(f"weights must be >= 0 and sum to a positive number, got {self.weights}")
        if extra := sorted(set(self.epochs) - set(self.weights)):
            raise ValueError(f"epochs name entries that are not in the weights: {extra}")
        if any(e <= 0 for e in self.epochs.values()):
            raise ValueError("epochs must be positive")
        return self


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    datasets: dict[str, Entry]
    mixes: dict[str, Mix] = {}

    @model_validator(mode="after")
    def _mixes_name_entries(self) -> "Catalog":
        for mix in self.mixes.values():
            unknown = sorted(set(mix.weights) - set(self.datasets))
            if unknown:
                raise ValueError(f"mix {mix.name}: no catalog entry named {', '.join(unknown)}")
        return self


def _human(n: int, unit: str = "") -> str:
    for factor, suffix in ((10**12, "T"), (10**9, "G" if unit else "B"), (10**6, "M"), (10**3, "K")):
        if n >= factor:
            v = n / factor
            return f"{v:.3g}{' ' if unit else ''}{suffix}{unit}"
    return f"{n:,}{' ' + unit if unit else ''}"


def parse(text: str, source: str = CATALOG_FILE) -> Catalog:
    """A catalog from YAML text; CatalogError naming `source` and the entry for anything malformed."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CatalogError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"{source}: expected a mapping with `datasets` and `mixes`")
    data = {"datasets": {n: {"name": n, **(e or {})} for n, e in (raw.get("datasets") or {}).items()},
            "mixes": {n: {"name": n, **(m or {})} for n, m in (raw.get("mixes") or {}).items()},
            **{k: v for k, v in raw.items() if k not in ("datasets", "mixes")}}
    try:
        return Catalog.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise CatalogError("invalid catalog:\n  " + "\n  ".join(lines)) from None


@functools.lru_cache(maxsize=1)
def load() -> Catalog:
    """The catalog shipped with mlxcore (read once per process)."""
    return parse(resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8"))


def unknown_name(what: str, name: str, known: list[str]) -> CatalogError:
    """The error for an unknown name, with the close matches among `known`."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
    return CatalogError(f"unknown {what} {name!r}; {hint} (`mlxflow data list` shows the catalog)")


def entries(kind: str | None = None) -> list[Entry]:
    """Every entry (of `kind`), in catalog order."""
    if kind is not None and kind not in KINDS:
        raise CatalogError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return [e for e in load().datasets.values() if kind is None or kind in e.kind]


def get(name: str) -> Entry:
    """The entry called `name`; CatalogError with close matches when there is none."""
    cat = load()
    if name not in cat.datasets:
        raise unknown_name("catalog dataset", name, list(cat.datasets))
    return cat.datasets[name]


def mix(name: str) -> Mix:
    cat = load()
    if name not in cat.mixes:
        raise unknown_name("mix", name, list(cat.mixes))
    return cat.mixes[name]


def mixes_with(name: str) -> list[str]:
    """Names of the mixes that use entry `name`."""
    return [m.name for m in load().mixes.values() if name in m.weights]


def mix_sources(name: str) -> list[dict]:
    """A named mix as weighted source dicts, `[{"spec": "catalog:NAME", "weight": w, "epochs": e}, ...]`,
    in the mix's order: what `data.pretrain.sources` takes. Weights are the mix's own (not normalised)."""
    m = mix(name)
    return [{"spec": f"catalog:{entry}", "weight": float(w), "epochs": float(m.epochs.get(entry, 1.0))}
            for entry, w in m.weights.items()]
