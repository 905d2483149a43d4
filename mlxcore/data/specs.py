"""What a data spec names: a file of a Hugging Face Hub dataset repo, one split of a hub dataset,
a catalog entry, or local files (`parse_spec`, used by `mlxcore.data.download.fetch`).

Spec strings (`parse_spec(spec, kind)`; `download.fetch(spec, out_dir, kind)` fetches them):

  minimind:smoke         lora_identity.jsonl     of jingyaogong/minimind_dataset (a hub dataset repo)
  minimind:small         lora_medical.jsonl      of the same repo
  minimind:dpo           dpo.jsonl               of the same repo (chosen / rejected conversations)
  minimind:auto          pretrain_hq.jsonl (kind="pretrain"), sft_mini_512.jsonl (kind="sft") or
                         dpo.jsonl (kind="preference")
  minimind:<file>        any other file of that repo; a bare file name, no directories
  gsm8k:train|test       main/{train,test}-00000-of-00001.parquet of openai/gsm8k
  hf:<owner>/<name>[@<revision>]/<path/in/repo>
                         any file of any hub dataset repo, at a branch, tag or 40-hex commit
                         (default: main); the revision may not contain "/" in this form
  hfds:<owner>/<name>[:<config>][@<revision>]:<split>[[:N]]
                         one split of a hub dataset through the `datasets` library, written as
                         JSONL (`mlxcore.data.hfds`; `[:N]`: the first N rows)
  catalog:<name>         an entry of the data catalog (`mlxcore/data/catalog.yaml`, `mlxflow data
                         list`): its hub file or hfds: split, its column mapping and its license
  anything else          a local file or glob (`data/*.jsonl`, `~` expanded, relative to the
                         current dir, `**` recursive); matches are sorted. A directory is an
                         error, not "all its files": write the glob you mean (`dir/*.jsonl`)
                         so that stray files (a manifest, a README) are never trained on.

A string that starts with an unknown `prefix:` (`s3:x`) and names no existing path is an error,
as is any hub spec with path traversal or junk in it (`..`, absolute paths, backslashes, empty
path components, control characters, bad repo ids, `..` in a revision): these are refused before
any network access.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass

from mlxcore.data import catalog, hfds

MINIMIND_REPO = "jingyaogong/minimind_dataset"
GSM8K_REPO = "openai/gsm8k"

MINIMIND_FILES = {"smoke": "lora_identity.jsonl", "small": "lora_medical.jsonl", "dpo": "dpo.jsonl"}
MINIMIND_AUTO = {"pretrain": "pretrain_hq.jsonl", "sft": "sft_mini_512.jsonl", "preference": "dpo.jsonl"}
GSM8K_FILES = {"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"}

_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


class DownloadError(RuntimeError):
    """A data set could not be fetched; the message names the spec and says what to do."""


@dataclass(frozen=True)
class HubFile:
    repo: str
    path: str
    revision: str | None
    repo_type: str = "dataset"
    columns: tuple[tuple[str, str], ...] = ()  # catalog: (our field, their column); empty: the file as it is
    license: str | None = None  # a catalog entry's license
    catalog: str | None = None
    format: str | None = None


@dataclass(frozen=True)
class LocalFiles:
    pattern: str


# ------------------------------------------------------------------------------- parsing


def _bad(spec: str, why: str) -> DownloadError:
    return DownloadError(f"data spec {spec!r}: {why}")


def _check_repo(spec: str, repo: str) -> None:
    parts = repo.split("/")
    ok = (len(parts) == 2 and all(_REPO_PART.fullmatch(p) for p in parts)
          and ".." not in repo and "--" not in repo and not repo.endswith(".git"))
    if not ok:
        raise _bad(spec, f"bad repo id {repo!r}: expected <owner>/<name> of letters, digits, '.', '_' "
                         "and '-' (no '..' or '--', no leading/trailing '.' or '-')")


def _check_path(spec: str, path: str) -> None:
    if not path:
        raise _bad(spec, "no file path in the repo")
    if "\\" in path:
        raise _bad(spec, f"backslash in path {path!r}; use '/'")
    if path.startswith("/"):
        raise _bad(spec, f"absolute path {path!r}; give a path inside the repo")
    parts = path.split("/")
    if any(p == "" for p in parts):
        raise _bad(spec, f"empty path component in {path!r}")
    if any(p in (".", "..") for p in parts):
        raise _bad(spec, f"'.' or '..' component in path {path!r}")


def _check_revision(spec: str, revision: str) -> None:
    if not _REVISION.fullmatch(revision) or ".." in revision:
        raise _bad(spec, f"bad revision {revision!r}: use a branch, tag or commit of letters, digits, "
                         "'.', '_' and '-' (no '..')")


PREFIXES = "minimind:, gsm8k:, hf:, hfds:, catalog: or a local path"


def _hfds_spec(spec: str, rest: str) -> hfds.HfDataset:
    try:
        repo, config, revision, split, rows = hfds.parse(rest)
    except hfds.SpecError as e:
        raise _bad(spec, str(e)) from None
    _check_repo(spec, repo)
    if revision is not None:
        _check_revision(spec, revision)
    return hfds.HfDataset(repo, split, config, revision, rows)


def _catalog_spec(spec: str, name: str, kind: str | None) -> HubFile | hfds.HfDataset:
    try:
        entry = catalog.get(name)
    except catalog.CatalogError as e:
        raise _bad(spec, str(e)) from None
    if entry.spec is None:
        raise _bad(spec, f"catalog entry {name!r} cannot be downloaded directly: {' '.join(entry.access.split())}")
    return dataclasses.replace(parse_spec(entry.spec, kind), columns=tuple(entry.columns.items()),
                               license=entry.license, catalog=name, format=entry.format)


def parse_spec(spec: str, kind: str | None = None) -> HubFile | LocalFiles | hfds.HfDataset:
    """What `spec` names (see the module docstring); raises DownloadError for a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), f"empty spec; use {PREFIXES}")
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise _bad(spec, "control character in spec")
    s = spec.strip()
    prefix, sep, rest = s.partition(":")

    if prefix == "minimind" and sep:
        if rest == "auto":
            if kind not in MINIMIND_AUTO:
                raise _bad(spec, f"minimind:auto needs kind 'pretrain', 'sft' or 'preference', got {kind!r}")
            name = MINIMIND_AUTO[kind]
        else:
            name = MINIMIND_FILES.get(rest, rest)
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise _bad(spec, f"minimind:<file> must be a bare file name of {MINIMIND_REPO} "
                                 f"(or smoke, small, auto), got {rest!r}")
        return HubFile(MINIMIND_REPO, name, None)

    if prefix == "gsm8k" and sep:
        if rest not in GSM8K_FILES:
            raise _bad(spec, f"unknown gsm8k split {rest!r}; choose one of "
                             + ", ".join(f"gsm8k:{k}" for k in GSM8K_FILES))
        return HubFile(GSM8K_REPO, GSM8K_FILES[rest], None)

    if prefix == "catalog" and sep:
        return _catalog_spec(spec, rest, kind)

    if prefix == "hfds" and sep:
        return _hfds_spec(spec, rest)

    if prefix == "hf" and sep:
        parts = rest.split("/", 2)
        if len(parts) < 3:
            raise _bad(spec, "expected hf:<owner>/<name>[@<revision>]/<path/in/repo>")
        owner, name_rev, path = parts
        name, at, revision = name_rev.partition("@")
        _check_repo(spec, f"{owner}/{name}")
        if at:
            _check_revision(spec, revision)
        _check_path(spec, path)
        return HubFile(f"{owner}/{name}", path, revision if at else None)

    pattern = os.path.expanduser(s)
    m = _PREFIX.match(s)
    if m and not os.path.lexists(pattern) and not (glob.has_magic(pattern) and glob.glob(pattern, recursive=True)):
        raise _bad(spec, f"unknown spec prefix '{m.group(1)}:'; use {PREFIXES}")
    return LocalFiles(pattern)
