"""Push a directory (an export, a checkpoint) to a Hugging Face Hub model repo.

    push(folder, repo_id, *, token=None, endpoint=None, private=False, revision="main",
         path_in_repo="", commit_message=..., repo_type="model") -> dict

Through `huggingface_hub`: `HfApi(endpoint=..., token=...)`, `create_repo(exist_ok=True)` (an
existing repo is fine; `private` applies only to a new one), `create_branch(exist_ok=True)` for a
revision other than main, then `upload_folder` (one commit, or several for very large folders;
files already on the hub with the same content are left out of the commit). Temp files of
writers still running (`.tmp-*`) and `.git` / `.cache/huggingface` are never uploaded.

Environment, read at each call:

  HF_ENDPOINT      the hub (default https://huggingface.co) when `endpoint` is not given
  HF_TOKEN         the token when `token` is not given (else the one `hf auth login` stored)
  HF_HUB_OFFLINE   1/true/yes/on: refuse to push (nothing is sent)

While a push runs, huggingface_hub's import-time offline flag is lifted and its telemetry off
(`mlxcore.data.download`'s switch, shared so concurrent downloads and pushes agree).

Every failure is a `PushError` (a RuntimeError) whose one-line message names the folder, the repo
and the endpoint and says what to do: no token, a rejected token (401), no write access (403),
the hub unreachable, another HTTP error with the hub's own message.

The result (JSON-able): {"repo_id", "repo_type", "url", "endpoint", "revision", "path_in_repo",
"commit" (the commit's sha), "commit_url", "files" (paths in the repo), "bytes"}.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
IGNORE = [".tmp-*", "**/.tmp-*"]  # our writers' temp files; huggingface_hub adds .git and its cache
_TRUE = {"1", "ON", "YES", "TRUE"}


class PushError(RuntimeError):
    """A push failed; the message says which folder, repo and endpoint, and what to do."""


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")


def _token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    try:
        from huggingface_hub import get_token

        return get_token()  # a stored `hf auth login`
    except Exception:
        return None


def _is_transport(err: BaseException) -> bool:
    """A connection failure or timeout, from httpx / requests / the standard library."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        names = {c.__name__ for c in type(err).__mro__}
        if names & {"TransportError", "TimeoutException", "ConnectError", "ConnectTimeout", "ReadTimeout"}:
            return True
        err = err.__cause__ or err.__context__
    return False


def _files(folder: Path, ignore: Sequence[str] = (), allow: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(path relative to `folder`, size) of what upload_folder sends: the same filter it applies."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    rel = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    kept = filter_repo_objects(list(rel), allow_patterns=list(allow) or None,
                               ignore_patterns=[*IGNORE, *ignore, *DEFAULT_IGNORE_PATTERNS])
    return [(k, rel[k]) for k in kept]


def push(folder, repo_id: str, *, token: str | None = None, endpoint: str | None = None, private: bool = False,
         revision: str = "main", path_in_repo: str = "", commit_message: str = "Upload with mlxcore",
         repo_type: str = "model", ignore: Sequence[str] = (), allow: Sequence[str] = ()) -> dict:
    """Upload every file of `folder` (only those matching `allow`'s glob patterns, when given; never
    `ignore`'s) to `repo_id` (created if missing) at `revision`, under `path_in_repo`."""
    folder = Path(folder)
    where = _endpoint(endpoint)
    target = f"{repo_type} repo {repo_id} on {where}"
    if not REPO_ID.match(repo_id or ""):
        raise PushError(f"cannot push {folder}: {repo_id!r} is not a repo id (owner/name)")
    if not folder.is_dir():
        raise PushError(f"cannot push {folder} to {target}: not a directory")
    files = _files(folder, ignore, allow)
    if not files:
        raise PushError(f"cannot push {folder} to {target}: the folder has no files to upload")
    prefix = path_in_repo.strip("/")
    if ".." in prefix.split("/") or "\\" in prefix:
        raise PushError(f"cannot push {folder} to {target}: path_in_repo {path_in_repo!r} leaves the repo")
    if (os.environ.get("HF_HUB_OFFLINE") or "").strip().upper() in _TRUE:
        raise PushError(f"cannot push {folder} to {target}: HF_HUB_OFFLINE is set; unset it to upload")
    secret = _token(token)
    if not secret:
        raise PushError(f"cannot push {folder} to {target}: no token; set HF_TOKEN (a write token from "
                        f"{where}/settings/tokens), pass token=, or run `hf auth login`")

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from mlxcore.data.download import _library_online

    api = HfApi(endpoint=where, token=secret)
    step = "creating the repo"
    try:
        with _library_online():
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
            if revision != "main":
                step = f"creating branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
            step = "uploading"
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=prefix or None,
                                     commit_message=commit_message, revision=revision, repo_type=repo_type,
                                     allow_patterns=list(allow) or None, ignore_patterns=[*IGNORE, *ignore])
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        said = (getattr(e, "server_message", None) or "").strip().replace("\n", " ")
        said = f" (the hub said: {said})" if said else ""
        if status == 401:
            raise PushError(f"cannot push {folder} to {target}: the token was rejected (HTTP 401 while {step})"
                            f"{said}; check HF_TOKEN / token= (a valid write token for {where})") from None
        if status == 403:
            raise PushError(f"cannot push {folder} to {target}: the token may not write there (HTTP 403 while "
                            f"{step}){said}; use a write token with access to {repo_id.split('/')[0]}") from None
        raise PushError(f"cannot push {folder} to {target}: HTTP {status} while {step}{said}") from None
    except OfflineModeIsEnabled as e:
        raise PushError(f"cannot push {folder} to {target}: huggingface_hub is offline ({e})") from None
    except Exception as e:
        if _is_transport(e):
            raise PushError(f"cannot push {folder} to {target}: the hub cannot be reached while {step} "
                            f"({type(e).__name__}: {e}); check HF_ENDPOINT and the network") from None
        raise
    paths = [f"{prefix}/{p}" if prefix else p for p, _ in files]
    return {"repo_id": repo_id, "repo_type": repo_type, "url": str(url), "endpoint": where, "revision": revision,
            "path_in_repo": prefix, "commit": info.oid, "commit_url": info.commit_url, "files": paths,
            "bytes": sum(n for _, n in files)}
