"""Fetch a training data set: a file of a Hugging Face Hub dataset repo, or local files.

Spec strings: see `mlxcore.data.specs` (minimind:, gsm8k:, hf:, hfds:, catalog:, local paths).

What a fetch writes: `out_dir` is written atomically (`mlxcore.io.atomic_dir`: complete or
absent, and an existing one is replaced only on success) with a `manifest.json` of kind
"download" whose config is {"spec", "kind"} and which carries:

  hub file:    the file itself as out_dir/<basename> (a hard link to the blob in the Hugging
               Face cache when possible, else a copy; do not edit it in place), data_files =
               [<basename>], and source = {repo, repo_type, revision (the 40-hex commit the
               bytes came from), path, size, sha256, endpoint}. The sha256 is computed from the
               bytes and, when the hub's ETag is a sha256 (LFS files) or the cached blob is named
               by one, checked against it; a mismatch is an error and the corrupt blob is evicted
               from the cache.
  local files: nothing is copied; data_files = the absolute resolved paths and source =
               {files: [{path, size, sha256}]}, so the manifest digest changes whenever a file's
               content does.
  hfds: split: out_dir/<config>-<split>.jsonl and source = {repo, repo_type, config, split,
               revision, rows, bytes, sha256 (of the JSONL), endpoint, streamed}. Within
               `max_download_mb` (the split's data files, sized from the hub's tree listing) the
               dataset is prepared in the datasets cache and reused from there, also offline
               (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); above it, or when the hub cannot say, rows
               are streamed into the JSONL, which may not grow past the limit, and a split known to
               be bigger must name a row limit (`train[:N]`). Retries and the fall back to a
               prepared copy when the hub is unreachable work as for hub files.

Every manifest also carries `license` (a catalog entry's; else the `license:` of the hub repo's
card, README.md, from the cache or fetched once; else "unknown"; `gsm8k:` / `minimind:` files take
their catalog entry's) and the lineage fields `sources` / `licenses` (`mlxcore.lineage`), which
every later stage carries on. A `catalog:` fetch also records `catalog`, `format` and `columns`:
with a column mapping ({our field: their column}) the rows are rewritten to exactly those fields
(a hub file then becomes <name>.jsonl), and a row without a mapped column fails naming it.

`data_files(out_dir)` returns the absolute paths a fetched dir stands for.

Hub downloads go through `huggingface_hub` into the normal HF cache (`<cache>/datasets--owner--
name/{blobs,snapshots,refs}`), so `hf download`, `datasets` and this module share files. Before
any byte is downloaded the file's metadata (size, commit, ETag) is asked for, and a file bigger
than `max_download_mb` (1 MB = 10**6 bytes) is refused; a file already in the cache is never
downloaded again and is not subject to the limit. Transient failures (connection errors,
timeouts, HTTP 408/429/5xx) are retried `retries` times with exponential backoff and jitter
from `backoff_s`; a missing repo, revision or file and 401/403 (gated/private) fail at once. When
the hub cannot be reached (or keeps failing) the cached copy of that revision is used if there is
one, else one error says what is missing and how to get it.

Environment, read at each call (huggingface_hub itself reads these only when imported):

  HF_ENDPOINT                   hub or mirror URL (default https://huggingface.co)
  HF_HUB_OFFLINE                1/true/yes/on: never touch the network, use the cache only
                                (TRANSFORMERS_OFFLINE is honoured the same way)
  HF_HUB_CACHE                  the cache dir; else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub,
                                else $XDG_CACHE_HOME/huggingface/hub, else
                                ~/.cache/huggingface/hub
  HF_HUB_ETAG_TIMEOUT           seconds to wait for the metadata request (default 10)
  HF_TOKEN                      read by huggingface_hub for gated/private repos

While an online fetch runs, `huggingface_hub.constants.HF_HUB_OFFLINE` is set to False and
`HF_HUB_DISABLE_TELEMETRY` to True (both restored afterwards): a process started with
HF_HUB_OFFLINE=1 and switched online later can still download (the library would refuse every
request), and the library's user-agent probe, which calls `<endpoint at import>/api/agent-
harnesses`, never contacts a host other than HF_ENDPOINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, TypeVar

from mlxcore import lineage
from mlxcore.data import catalog, hfds
from mlxcore.data.errors import DataError
from mlxcore.data.files import saved_dataset_files
from mlxcore.io import atomic_dir, read_manifest, sha256_file, write_manifest
from mlxcore.data.specs import (  # noqa: F401  (re-exported: callers import them from here)
    GSM8K_FILES, GSM8K_REPO, MINIMIND_AUTO, MINIMIND_FILES, MINIMIND_REPO, PREFIXES, DownloadError, HubFile,
    LocalFiles, _bad, parse_spec)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
MB = 1_000_000
_TRUE = {"1", "ON", "YES", "TRUE"}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_BACKOFF_S = 60.0
_sleep = time.sleep  # tests replace it to see the backoff
T = TypeVar("T")

# ------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class _HubEnv:
    endpoint: str
    offline: bool
    cache_dir: Path
    etag_timeout: float

    @classmethod
    def from_environ(cls) -> "_HubEnv":
        env = os.environ
        offline = any((env.get(k) or "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache:
            home = env.get("HF_HOME") or os.path.join(
                env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
            cache = os.path.join(home, "hub")
        cache_dir = Path(os.path.expandvars(os.path.expanduser(cache))).absolute()
        try:
            timeout = float(env.get("HF_HUB_ETAG_TIMEOUT") or 10)
        except ValueError:
            timeout = 10.0
        return cls(endpoint, offline, cache_dir, timeout)


_ONLINE_LOCK = threading.Lock()
_ONLINE_USERS = 0
_SAVED_FLAGS: dict[str, Any] = {}
# While we download: requests allowed whatever HF_HUB_OFFLINE was at import, and no telemetry (its
# user-agent probe fetches <import-time endpoint>/api/agent-harnesses, which may be a host the
# caller never meant to contact).
_ONLINE_FLAGS = {"HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True}


@contextlib.contextmanager
def _library_online() -> Iterator[None]:
    """Let huggingface_hub make requests although its import-time HF_HUB_OFFLINE said not to."""
    global _ONLINE_USERS
    from huggingface_hub import constants

    with _ONLINE_LOCK:
        if _ONLINE_USERS == 0:
            for name, value in _ONLINE_FLAGS.items():
                _SAVED_FLAGS[name] = getattr(constants, name)
                setattr(constants, name, value)
        _ONLINE_USERS += 1
    try:
        yield
    finally:
        with _ONLINE_LOCK:
            _ONLINE_USERS -= 1
            if _ONLINE_USERS == 0:
                for name, value in _SAVED_FLAGS.items():
                    setattr(constants, name, value)


# ------------------------------------------------------------------------------- errors and retries


def _fmt_mb(nbytes: int | float) -> str:
    v = nbytes / MB
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def _where(hf: HubFile) -> str:
    return f"{hf.repo_type} repo {hf.repo}, file {hf.path!r}, revision {hf.revision or 'main'!r}"


def _transport_errors() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        types += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(types)


def _classify(err: BaseException, spec: str, hf: HubFile, endpoint: str) -> tuple[str, str]:
    """("transient" | "fatal", description) for an error raised by huggingface_hub."""
    from huggingface_hub import errors as hfe

    where = f"on {endpoint}"
    if isinstance(err, hfe.LocalEntryNotFoundError) and err.__cause__ is not None:
        return _classify(err.__cause__, spec, hf, endpoint)
    if isinstance(err, hfe.OfflineModeIsEnabled):
        return "fatal", f"huggingface_hub refused to go online: {err}"
    if isinstance(err, hfe.GatedRepoError):
        return "fatal", (f"access to {hf.repo_type} repo {hf.repo} {where} was denied (gated or private): accept its "
                         "terms on the hub, then set HF_TOKEN or run `hf auth login`")
    if isinstance(err, hfe.RepositoryNotFoundError):
        return "fatal", (f"{hf.repo_type} repo {hf.repo} not found {where} (or it is private: set HF_TOKEN or run "
                         "`hf auth login`)")
    if isinstance(err, hfe.RevisionNotFoundError):
        return "fatal", f"revision {hf.revision or 'main'!r} not found in {hf.repo_type} repo {hf.repo} {where}"
    if isinstance(err, (getattr(hfe, "RemoteEntryNotFoundError", hfe.EntryNotFoundError), hfe.EntryNotFoundError)):
        return "fatal", (f"file {hf.path!r} not found in {hf.repo_type} repo {hf.repo} at revision "
                         f"{hf.revision or 'main'!r} {where}")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return "fatal", (f"access to {hf.repo_type} repo {hf.repo} {where} was denied (HTTP {status}; gated or "
                         "private): set HF_TOKEN or run `hf auth login`")
    if status == 404:
        return "fatal", f"not found {where} (HTTP 404; repo, revision or file missing): {_where(hf)}"
    if status is not None and (status in (408, 429) or status >= 500):
        return "transient", f"HTTP {status} from {endpoint}"
    if isinstance(err, _transport_errors()):
        return "transient", f"{type(err).__name__}: {err}"
    if isinstance(err, OSError) and str(err).startswith("Consistency check failed"):
        return "transient", f"truncated download: {err}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return "fatal", f"{type(err).__name__}: {first}"


class _GaveUp(Exception):
    def __init__(self, attempts: int, last: str):
        super().__init__(last)
        self.attempts, self.last = attempts, last


def _retrying(fn: Callable[[], T], spec: str, hf: HubFile, env: _HubEnv, what: str,
              retries: int, backoff_s: float) -> T:
    """fn(), retried on transient errors; fatal ones raise DownloadError at once, exhaustion _GaveUp."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except DownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, never swallowed
            kind, desc = _classify(e, spec, hf, env.endpoint)
            if kind == "fatal":
                raise _bad(spec, f"{what} failed: {desc}") from e
            if attempt > retries:
                raise _GaveUp(attempt, desc) from e
            delay = min(_MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)) * random.uniform(1.0, 1.5)
            log.warning("%s: %s failed (%s); retry %d/%d in %.2fs", spec, what, desc, attempt, retries, delay)
            _sleep(delay)


def _missing_error(spec: str, hf: HubFile, env: _HubEnv, reason: str) -> DownloadError:
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=hf.repo, repo_type=hf.repo_type)
    rev = f" --revision {hf.revision}" if hf.revision else ""
    name = PurePosixPath(hf.path).name
    return DownloadError(
        f"data spec {spec!r}: {_where(hf)} is not in the Hugging Face cache at {env.cache_dir}, and {reason}.\n"
        "To fix it, do one of:\n"
        "  - run once with network access (unset HF_HUB_OFFLINE) so it is downloaded into that cache;\n"
        f"  - on a machine with network access run `hf download {hf.repo} {hf.path} --repo-type {hf.repo_type}{rev}`,\n"
        f"    then copy its cache folder (<its HF cache, default ~/.cache/huggingface/hub>/{folder})\n"
        f"    to {env.cache_dir / folder} here (or set HF_HUB_CACHE to where you put it);\n"
        f"  - set HF_ENDPOINT to a reachable Hub mirror (now: {env.endpoint});\n"
        f"  - or point the spec at a local copy of the file (e.g. data/{name})."
    )


# ------------------------------------------------------------------------------- the HF cache


def _storage(hf: HubFile, env: _HubEnv) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return env.cache_dir / repo_folder_name(repo_id=hf.repo, repo_type=hf.repo_type)


def _commit_of(snapshot_path: str | Path, hf: HubFile, env: _HubEnv) -> str:
    return Path(snapshot_path).relative_to(_storage(hf, env) / "snapshots").parts[0]


def _cached(hf: HubFile, env: _HubEnv) -> tuple[str, str] | None:
    """(snapshot path, commit) of the file in the HF cache at hf.revision, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    if not env.cache_dir.is_dir():
        return None
    path = try_to_load_from_cache(hf.repo, hf.path, cache_dir=str(env.cache_dir),
                                  revision=hf.revision or "main", repo_type=hf.repo_type)
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    return path, _commit_of(path, hf, env)


def _evict(snapshot_path: str, blob: Path) -> None:
    for p in (blob, Path(snapshot_path)):
        with contextlib.suppress(OSError):
            p.unlink()


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link src to dst (same bytes, no space); copy when that fails or dst would not be writable."""
    try:
        os.link(src, dst)
        if os.access(dst, os.W_OK):  # atomic_dir fsyncs through a writable handle
            return
        dst.unlink()
    except OSError:
        pass
    shutil.copy2(src, dst)
    os.chmod(dst, 0o644)


# ------------------------------------------------------------------------------- fetch


def repo_card_license(repo: str, repo_type: str, commit: str, env: _HubEnv, online: bool) -> str | None:
    """The `license:` of a hub repo's card (README.md) at `commit`: from the HF cache, else (`online`)
    fetched once, without retries; None when there is no card or it names no license."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    path = None
    if env.cache_dir.is_dir():
        hit = try_to_load_from_cache(repo, "README.md", cache_dir=str(env.cache_dir), revision=commit,
                                     repo_type=repo_type)
        if hit is not None and not isinstance(hit, str):  # known to have no card at this commit
            return None
        path = hit
    if path is None and online:
        try:
            with _library_online():
                path = hf_hub_download(repo, "README.md", repo_type=repo_type, revision=commit,
                                       cache_dir=str(env.cache_dir), endpoint=env.endpoint, library_name="mlxflow",
                                       etag_timeout=env.etag_timeout)
        except Exception:  # noqa: BLE001 - no card (or no answer): the license is unknown, not an error
            return None
    return lineage.card_license(path)


def _catalog_entry(hf: HubFile) -> catalog.Entry | None:
    """The catalog entry a hub file is (gsm8k:train is catalog:gsm8k-train), if any."""
    for entry in catalog.entries():
        if entry.spec and entry.spec.startswith("hf:"):
            other = parse_spec(entry.spec)
            if (other.repo, other.path) == (hf.repo, hf.path):
                return entry
    return None


def _catalog_fields(hf) -> dict:
    if hf.catalog is None:
        return {}
    return {"catalog": hf.catalog, "format": hf.format, "columns": dict(hf.columns)}


def _origin(spec: str, hf, commit: str, card: str | None) -> tuple[str, dict]:
    """(license, lineage source) of a hub file or split: the catalog entry's license, else the card's."""
    entry = catalog.get(hf.catalog) if hf.catalog else _catalog_entry(hf) if isinstance(hf, HubFile) else None
    license_id = hf.license or (entry.license if entry else None) or card or lineage.UNKNOWN
    source = {"name": entry.name if entry else hf.repo, "kind": "dataset", "license": license_id, "spec": spec,
              "repo": hf.repo}
    source |= {"path": hf.path} if isinstance(hf, HubFile) else {"config": hf.config or "default",
                                                                   "split": hf.split_expr}
    source["revision"] = commit
    if entry is not None and entry.terms:
        source["terms"] = " ".join(entry.terms.split())
    return license_id, source


def _mapped_rows(path: str | Path):
    """The rows of a data file (any format records reads), as dicts."""
    from mlxcore.data import records

    text = records.file_kind(Path(path)) == "txt"
    for chunk, _ in records.read_chunks(path):
        for lineno, payload in records.chunk_items(chunk):
            yield records.decode_row(str(path), lineno, payload, text)


def _publish(spec: str, kind: str | None, hf: HubFile, env: _HubEnv, snapshot_path: str, commit: str,
             etag: str | None, out_dir: Path, card: str | None = None) -> dict:
    blob = Path(os.path.realpath(snapshot_path))
    size = blob.stat().st_size
    digest = sha256_file(blob)
    expected = next((e for e in (etag, blob.name) if e and _HEX64.fullmatch(e)), None)
    if expected is not None and digest != expected:
        _evict(snapshot_path, blob)
        raise _bad(spec, f"sha256 mismatch for {_where(hf)} at commit {commit}: expected {expected}, the file has "
                         f"{digest}; the corrupt copy was removed from the cache at {blob.parent}, fetch again")
    name = PurePosixPath(hf.path).name
    if name == "manifest.json":
        raise _bad(spec, "a data file named manifest.json would clash with the stage manifest")
    source = {"repo": hf.repo, "repo_type": hf.repo_type, "revision": commit, "path": hf.path,
              "size": size, "sha256": digest, "endpoint": env.endpoint}
    card = card or repo_card_license(hf.repo, hf.repo_type, commit, env, online=False)
    license_id, origin = _origin(spec, hf, commit, card)
    extra = {"license": license_id, **lineage.fields(lineage.of_sources(origin)), **_catalog_fields(hf)}
    with atomic_dir(out_dir, replace=True) as tmp:
        if hf.columns:  # the rows rewritten to our fields
            name = PurePosixPath(name).stem + ".jsonl"
            try:
                hfds.write_jsonl(_mapped_rows(snapshot_path), tmp / name, dict(hf.columns), hf.path)
            except (hfds.RowError, ValueError) as e:
                raise _bad(spec, str(e)) from None
        else:
            _link_or_copy(blob, tmp / name)
        return write_manifest(tmp, "download", {"spec": spec, "kind": kind}, source=source, data_files=[name],
                              **extra)


def _fetch_hub(spec: str, kind: str | None, hf: HubFile, out_dir: Path, max_download_mb: float,
               retries: int, backoff_s: float) -> dict:
    env = _HubEnv.from_environ()
    revision = hf.revision or "main"

    if env.offline or _HEX40.fullmatch(revision):
        hit = _cached(hf, env)
        if hit is not None:  # offline, or a commit (immutable) that is already here: no network
            return _publish(spec, kind, hf, env, hit[0], hit[1], None, out_dir)
        if env.offline:
            raise _missing_error(spec, hf, env, "HF_HUB_OFFLINE is set, so the hub is not contacted")

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(hf.repo, hf.path, repo_type=hf.repo_type, revision=revision, endpoint=env.endpoint)

    def fall_back(g: _GaveUp, what: str) -> dict:
        hit = _cached(hf, env)
        if hit is not None:
            log.warning("%s: %s failed after %d attempts (%s); using the cached copy at commit %s",
                        spec, what, g.attempts, g.last, hit[1])
            return _publish(spec, kind, hf, env, hit[0], hit[1], None, out_dir)
        raise _missing_error(spec, hf, env, f"{what} at {env.endpoint} failed after {g.attempts} attempts "
                                            f"(last error: {g.last})") from g

    with _library_online():
        try:
            meta = _retrying(lambda: get_hf_file_metadata(url, timeout=env.etag_timeout, endpoint=env.endpoint,
                                                          library_name="mlxflow"),
                             spec, hf, env, "asking the hub for the file's metadata", retries, backoff_s)
        except _GaveUp as g:
            return fall_back(g, "asking the hub for the file's metadata")
        if not meta.commit_hash or not meta.etag:
            raise _bad(spec, f"{env.endpoint} answered for {_where(hf)} without a commit or ETag; "
                             "is HF_ENDPOINT a Hugging Face Hub (or mirror)?")

        storage = _storage(hf, env)
        pointer = storage / "snapshots" / meta.commit_hash / hf.path
        in_cache = pointer.is_file() or (storage / "blobs" / meta.etag).is_file()
        limit = max_download_mb * MB
        if not in_cache:
            if meta.size is None:
                log.warning("%s: the hub did not report the size of %s; the size limit is checked after download",
                            spec, hf.path)
            elif meta.size > limit:
                raise _bad(spec, f"{_where(hf)} is {_fmt_mb(meta.size)} MB ({meta.size:,} bytes), over the limit of "
                                 f"{max_download_mb:g} MB; raise data.max_download_mb to download it")
        card = None if hf.license else repo_card_license(hf.repo, hf.repo_type, meta.commit_hash, env, online=True)

        try:
            path = _retrying(lambda: hf_hub_download(hf.repo, hf.path, repo_type=hf.repo_type, revision=revision,
                                                     cache_dir=str(env.cache_dir), endpoint=env.endpoint,
                                                     local_files_only=False, library_name="mlxflow"),
                             spec, hf, env, "downloading the file", retries, backoff_s)
        except _GaveUp as g:
            return fall_back(g, "downloading the file")

    commit = _commit_of(path, hf, env)
    etag = meta.etag if commit == meta.commit_hash else None
    if not in_cache and os.path.getsize(path) > limit:  # the size was unknown, or the repo moved meanwhile
        raise _bad(spec, f"{_where(hf)} is {_fmt_mb(os.path.getsize(path))} MB, over the limit of "
                         f"{max_download_mb:g} MB; raise data.max_download_mb to use it")
    return _publish(spec, kind, hf, env, path, commit, etag, out_dir, card if commit == meta.commit_hash else None)


def _hfds_not_cached(spec: str, ds: hfds.HfDataset, env: _HubEnv, reason: str) -> DownloadError:
    return DownloadError(
        f"data spec {spec!r}: split {ds.split_expr!r} of dataset {ds.repo} is not prepared in the datasets cache at "
        f"{hfds.datasets_cache()}, and {reason}.\nTo fix it, do one of:\n"
        "  - run once with network access (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so it is prepared there;\n"
        f"  - on a machine with network access run `{hfds.how_to_cache(ds)}`,\n"
        "    then copy its datasets cache and hub cache here (or set HF_HOME to where you put them);\n"
        f"  - set HF_ENDPOINT to a reachable Hub mirror (now: {env.endpoint});\n"
        "  - or write the rows to a local JSONL file and give its path as the spec.")


def _hfds_builder(spec: str, ds: hfds.HfDataset, env: _HubEnv, cache: Path, offline: bool, retries: int,
                  backoff_s: float, hf: HubFile):
    """(builder, offline): the dataset's builder from the hub (retried), else from the datasets cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def load():
        try:
            return hfds.builder(ds, cache)
        except LocalEntryNotFoundError as e:  # datasets drops the cause: the hub did not answer (transient)
            raise ConnectionError(f"the hub did not answer for {ds.repo}: {str(e).splitlines()[0]}") from e

    try:
        if offline:
            return hfds.builder(ds, cache), True
        return _retrying(load, spec, hf, env, "asking the hub for the dataset", retries, backoff_s), False
    except _GaveUp as g:  # the hub is unreachable: a copy prepared earlier will do
        try:
            with hfds.settings(env.endpoint, env.cache_dir, True):
                return hfds.builder(ds, cache), True
        except Exception as e:
            raise _hfds_not_cached(spec, ds, env, f"the hub at {env.endpoint} failed after {g.attempts} attempts "
                                                  f"(last error: {g.last})") from e
    except DownloadError:
        raise
    except Exception as e:  # offline with nothing cached, or a repo the library cannot read
        if offline:
            raise _hfds_not_cached(spec, ds, env, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so the hub is not "
                                                  "contacted") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _bad(spec, f"the datasets library cannot load {ds.repo}: {type(e).__name__}: {first}") from e


def _hfds_write(spec: str, ds: hfds.HfDataset, builder, streamed: bool, path: Path, limit: float,
                env: _HubEnv, convert=None) -> tuple[int, int, str, dict]:
    try:
        rows = hfds.rows(ds, builder, streamed)
        conv = convert(path.parent, getattr(rows, "features", None) or builder.info.features, dict(ds.columns),
                       f"{ds.repo} {ds.split_expr}") if convert is not None else None
        n, nbytes, digest = hfds.write_jsonl(rows, path, {} if conv is not None else dict(ds.columns),
                                             f"{ds.repo} {ds.split_expr}", limit if streamed else None, conv)
    except hfds.RowError as e:
        more = f"; take fewer rows ({ds.split}[:N]) or raise data.max_download_mb" if "limit" in str(e) else ""
        raise _bad(spec, f"{e}{more}") from None
    except FileNotFoundError as e:  # offline, and this split was never prepared
        raise _hfds_not_cached(spec, ds, env, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set") from e
    if n == 0:
        raise _bad(spec, f"split {ds.split_expr!r} of {ds.repo} has no rows")
    return n, nbytes, digest, conv.summary() if conv is not None else {}


def _fetch_hfds(spec: str, kind: str | None, ds: hfds.HfDataset, out_dir: Path, max_download_mb: float,
                retries: int, backoff_s: float, convert=None) -> dict:
    """One split of a hub dataset through `datasets`, as JSONL (see the module docstring)."""
    env = _HubEnv.from_environ()
    hf = HubFile(ds.repo, f"{ds.config or 'default'}:{ds.split}", ds.revision)  # names the split in errors
    limit, offline = max_download_mb * MB, env.offline or hfds.offline_from_env()

    def retried(fn, what: str):
        try:
            return _retrying(fn, spec, hf, env, what, retries, backoff_s)
        except _GaveUp as g:
            raise _bad(spec, f"{what} at {env.endpoint} failed after {g.attempts} attempts (last error: {g.last})") from g

    with hfds.settings(env.endpoint, env.cache_dir, offline, _library_online()) as cache:
        builder, offline = _hfds_builder(spec, ds, env, cache, offline, retries, backoff_s, hf)
        try:
            urls = hfds.split_files(ds, builder)
        except hfds.SpecError as e:
            raise _bad(spec, str(e)) from None
        commit = hfds.commit_of(builder) or ds.revision or "unknown"
        if offline and ds.revision and _HEX40.fullmatch(ds.revision) and commit != ds.revision:
            raise _hfds_not_cached(spec, ds, env, f"the cache holds commit {commit}, not the pinned {ds.revision}")
        size = None if offline else retried(lambda: hfds.split_bytes(ds, env.endpoint, commit, urls),
                                            "asking the hub for the split's size")
        streamed = not offline and (size is None or size > limit)
        if streamed and size is not None and not ds.rows:
            raise _bad(spec, f"split {ds.split!r} of {ds.repo} is {_fmt_mb(size)} MB ({size:,} bytes) of data files, "
                             f"over the limit of {max_download_mb:g} MB; raise data.max_download_mb, or stream its "
                             f"first rows with {ds.split}[:N]")
        if not offline and not streamed:
            retried(lambda: hfds.prepare(builder), "downloading the dataset")
        card = repo_card_license(ds.repo, "dataset", commit, env, online=False)  # datasets fetched the card
        license_id, origin = _origin(spec, ds, commit, card)
        with atomic_dir(out_dir, replace=True) as tmp:
            write = lambda: _hfds_write(spec, ds, builder, streamed, tmp / ds.file_name, limit, env,  # noqa: E731
                                        convert)
            n, nbytes, digest, written = retried(write, "streaming the rows") if streamed else write()
            source = {"repo": ds.repo, "repo_type": "dataset", "config": builder.config.name, "split": ds.split_expr,
                      "revision": commit, "rows": n, "bytes": nbytes, "sha256": digest, "endpoint": env.endpoint,
                      "streamed": streamed, **written}
            config = {"spec": spec, "kind": kind} | ({"columns": dict(ds.columns)} if convert and ds.columns else {})
            return write_manifest(tmp, "download", config, source=source,
                                  data_files=[ds.file_name], license=license_id, **_catalog_fields(ds),
                                  **lineage.fields(lineage.of_sources(origin)))


def match_local(spec: str, pattern: str) -> list[Path]:
    if glob.has_magic(pattern):
        matches = glob.glob(pattern, recursive=True)
    else:
        matches = [pattern] if os.path.lexists(pattern) else []
    if not matches:
        raise _bad(spec, f"no file matches {pattern!r} (and it is not a minimind:, gsm8k:, hf:, hfds: or catalog: spec)")
    files = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            try:
                files += saved_dataset_files(p)
            except DataError as e:
                raise _bad(spec, str(e)) from None
            continue
        if not p.is_file():
            raise _bad(spec, f"{m!r} is not a readable regular file (a broken link?)")
        files.append(p.resolve())
    return sorted(set(files))


def _fetch_local(spec: str, kind: str | None, local: LocalFiles, out_dir: Path) -> dict:
    files = match_local(spec, local.pattern)
    entries = [{"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
    origin = {"name": spec, "kind": "file", "license": lineage.UNKNOWN, "files": len(files)}
    with atomic_dir(out_dir, replace=True) as tmp:
        return write_manifest(tmp, "download", {"spec": spec, "kind": kind}, source={"files": entries},
                              data_files=[str(p) for p in files], license=lineage.UNKNOWN,
                              **lineage.fields(lineage.of_sources(origin)))


def fetch(spec: str, out_dir: str | os.PathLike, kind: str | None = None, max_download_mb: float = 2048,
          retries: int = 4, backoff_s: float = 1.0, columns: dict[str, str] | None = None, convert=None) -> dict:
    """Fetch `spec` into `out_dir` (see the module docstring) and return its manifest.

    `kind` ("pretrain" / "sft") picks the file of `minimind:auto` and is recorded. On any error
    `out_dir` is left as it was (absent if it was absent). `columns` (hfds: and catalog: specs)
    replaces the spec's column mapping. `convert` (hfds: splits only): `convert(out_dir, features,
    columns, where)` returns the per-row rewrite `hfds.write_jsonl` applies (it maps the columns
    itself), with `bytes` and `summary()` (merged into the manifest's source); the image-text rows
    of `mlxcore.vlm.hub` are written this way.
    """
    if retries < 0 or backoff_s < 0 or not max_download_mb > 0:
        raise _bad(spec, f"need retries >= 0, backoff_s >= 0 and max_download_mb > 0 "
                         f"(got {retries}, {backoff_s}, {max_download_mb})")
    parsed = parse_spec(spec, kind)
    out = Path(out_dir)
    if columns is not None and not isinstance(parsed, LocalFiles):
        parsed = dataclasses.replace(parsed, columns=tuple(columns.items()))
    if convert is not None and not isinstance(parsed, hfds.HfDataset):
        raise _bad(spec, "only hfds: splits (or catalog: entries that name one) can be converted row by row")
    if isinstance(parsed, LocalFiles):
        return _fetch_local(spec, kind, parsed, out)
    if isinstance(parsed, hfds.HfDataset):
        return _fetch_hfds(spec, kind, parsed, out, max_download_mb, retries, backoff_s, convert)
    return _fetch_hub(spec, kind, parsed, out, max_download_mb, retries, backoff_s)


def data_files(fetched_dir: str | os.PathLike) -> list[Path]:
    """Absolute paths of the data files a fetched dir stands for, in manifest order."""
    root = Path(fetched_dir).resolve()
    manifest = read_manifest(root, "download")
    spec = (manifest.get("config") or {}).get("spec", "?")
    paths = [Path(e) if os.path.isabs(e) else root / e for e in manifest.get("data_files", [])]
    for p in paths:
        if not p.is_file():
            raise _bad(spec, f"{p} (listed in {root / 'manifest.json'}) no longer exists; fetch again")
    return paths
