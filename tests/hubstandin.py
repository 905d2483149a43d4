"""A loopback stand-in for the Hugging Face Hub's file and upload API, for tests that must not go online.

Downloads. It serves in-memory files of dataset and model repos the way huggingface_hub (2.x)
asks for them:

  HEAD /datasets/<owner>/<name>/resolve/<revision>/<path>   get_hf_file_metadata, also the first
                                                           step of hf_hub_download
  GET  /datasets/<owner>/<name>/resolve/<revision>/<path>   the bytes (http_get), honouring
                                                           `Range: bytes=N-[M]` for resumes
  HEAD/GET /<owner>/<name>/resolve/<revision>/<path>       the same for model repos

The revision arrives URL-quoted with no safe characters (`refs%2Fpr%2F1`), the path quoted with
"/" kept. A file answers 200 with `X-Repo-Commit` (the commit the revision resolves to),
`ETag` (the sha256 for "LFS" files, the git blob sha1 otherwise), `Content-Length`, and for LFS
files also `X-Linked-Etag` / `X-Linked-Size` (which huggingface_hub prefers). Files are served
directly, never through a redirect to a CDN. Errors carry the `X-Error-Code` header that
huggingface_hub maps to its exceptions: RepoNotFound (404), RevisionNotFound (404),
EntryNotFound (404, with X-Repo-Commit). Anything else is a plain 404.

Uploads. `HfApi.create_repo` + `HfApi.upload_folder` (also `create_commit`, `upload_file`,
`create_branch`, `repo_info`) work against it. What huggingface_hub 2.x calls, in order:

  POST /api/repos/create                           {"name", "organization", "type"?, "visibility"?}:
                                                   200 {"url", "name", "id"}; 409 {"error", "url"}
                                                   when it exists (create_repo(exist_ok=True) accepts it)
  GET  /api/<type>s/<owner>/<name>[/revision/<r>]  repo_info: {"id", "sha", "private", "siblings"}
                                                   (create_repo asks after a 401/403; an upload
                                                   of nothing new asks for the head commit)
  POST /api/validate-yaml                          only when the folder has a README.md: no errors
  POST /api/<type>s/<owner>/<name>/preupload/<r>   {"files": [{path, sample, size}]}: every file
                                                   answers uploadMode "regular", so no LFS / Xet
                                                   transfer happens and the bytes arrive inline
                                                   in the commit; "oid" is the git blob sha1 of
                                                   the file already there (unchanged files are
                                                   then left out of the commit, as on the Hub)
  POST /api/<type>s/<owner>/<name>/commit/<r>      ndjson: a "header" line {summary, description,
                                                   parentCommit?}, then "file" lines {path,
                                                   content (base64), encoding}, "deletedFile" /
                                                   "deletedFolder" lines: 200 {"commitUrl",
                                                   "commitOid", "success", "pullRequestUrl"}.
                                                   "lfsFile" lines (never asked for) are a 400.
  GET  /api/<type>s/<owner>/<name>/tree/<r>[/<p>]  list_repo_tree (snapshot_download): files and
                                                   folders, `recursive` honoured, one page
  POST /api/<type>s/<owner>/<name>/branch/<b>      create_branch: from "startingPoint" or main; 409
                                                   when it exists

A created repo starts with one commit holding `.gitattributes`, as on the Hub. With `tokens`
set ({token: "write" | "read"}), every /api/ request needs `Authorization: Bearer <token>`: an
unknown or missing token answers 401 "Invalid credentials in Authorization header" (the Hub's
wording), a read token asking to write answers 403. Every /api/ request is recorded in
`hub.api_calls` (method, path, Authorization header), every commit in `hub.commits`.

    with HubStandin() as hub:
        commit = hub.add_file("owner/name", "data/x.jsonl", b"...")
        os.environ["HF_ENDPOINT"] = hub.endpoint
        hub.fail_next(2, 503)          # the next two requests, of any kind, answer 503
        ...
        hub.log                        # [("HEAD", "/datasets/owner/name/resolve/main/data/x.jsonl"), ...]
        hub.files("me/model")          # {path: bytes} at main of a model repo

It binds 127.0.0.1 on a free port and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"
_RESOLVE = re.compile(r"^/datasets/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_MODEL_RESOLVE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*$")
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(preupload|commit|branch|revision|tree)/(.+))?$")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        if self.lfs:
            return self.sha256
        return git_blob_sha1(self.data)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def default_commit(repo: str, revision: str = "main") -> str:
    return hashlib.sha1(f"hubstandin:{repo}@{revision}".encode()).hexdigest()


def closed_endpoint() -> str:
    """An http://127.0.0.1:PORT endpoint on which nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    return f"http://{HOST}:{port}"


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra or {}


class HubStandin:
    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        # (repo_type, repo) -> revision -> commit; -> commit -> path -> file
        self._refs: dict[tuple[str, str], dict[str, str]] = {}
        self._commits: dict[tuple[str, str], dict[str, dict[str, StoredFile]]] = {}
        self._private: dict[tuple[str, str], bool] = {}
        self._failures: list[int] = []
        self.tokens = tokens
        self.log: list[tuple[str, str]] = []
        self.api_calls: list[dict] = []
        self.commits: list[dict] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- content

    def add_file(self, repo: str, path: str, data: bytes, commit: str | None = None, revision: str = "main",
                 lfs: bool = True, repo_type: str = "dataset") -> str:
        """Put `data` at `path` of `repo` (a dataset repo unless `repo_type`) in `commit`, and point
        `revision` at it; the commit.

        A new commit starts as a copy of the files the revision pointed at before (as git would).
        """
        key = (repo_type, repo)
        with self._lock:
            refs = self._refs.setdefault(key, {})
            commits = self._commits.setdefault(key, {})
            self._private.setdefault(key, False)
            commit = commit or refs.get(revision) or default_commit(repo if repo_type == "dataset"
                                                                    else f"{repo_type}:{repo}", revision)
            assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
            if commit not in commits:
                commits[commit] = dict(commits.get(refs.get(revision, ""), {}))
            commits[commit][path] = StoredFile(bytes(data), lfs)
            refs[revision] = commit
            return commit

    def files(self, repo: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """{path: bytes} of `repo` at `revision` (a branch or a commit)."""
        key = (repo_type, repo)
        with self._lock:
            refs, commits = self._refs.get(key, {}), self._commits.get(key, {})
            commit = refs.get(revision) or revision
            return {p: f.data for p, f in commits.get(commit, {}).items()}

    def repo_exists(self, repo: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo) in self._refs

    def is_private(self, repo: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._private[(repo_type, repo)]

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests (any method, any path) with `status` and an empty body."""
        with self._lock:
            self._failures += [status] * n

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str]]:
        with self._lock:
            return [(m, p) for m, p in self.log if (method is None or m == method) and contains in p]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.api_calls.clear()

    # ---------------------------------------------------------------- serving

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "not started"
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> "HubStandin":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: simple and deterministic

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

            def do_POST(self) -> None:
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="hubstandin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "HubStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        raw = urlsplit(h.path).path
        body = b""
        if h.command == "POST":
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.log.append((h.command, unquote(raw)))
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return self._send(h, failure, {}, b"", head)
        if raw.startswith("/api/"):
            return self._api(h, raw, body)
        if h.command == "POST":
            return self._send(h, 404, {}, b"Not Found", head)

        m = _RESOLVE.match(raw)
        repo_type = "dataset"
        if not m and (m := _MODEL_RESOLVE.match(raw)) is not None:
            repo_type = "model"
        if not m:
            return self._send(h, 404, {}, b"Not Found", head)
        repo = f"{unquote(m.group(1))}/{unquote(m.group(2))}"
        revision, path = unquote(m.group(3)), unquote(m.group(4))
        key = (repo_type, repo)
        with self._lock:
            refs, commits = self._refs.get(key), self._commits.get(key)
            if refs is None:
                return self._send(h, 404, {"X-Error-Code": "RepoNotFound",
                                           "X-Error-Message": "Repository not found"}, b"", head)
            commit = refs.get(revision) or (revision if revision in commits else None)
            if commit is None:
                return self._send(h, 404, {"X-Error-Code": "RevisionNotFound",
                                           "X-Error-Message": "Invalid rev id"}, b"", head)
            f = commits[commit].get(path)
        if f is None:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                       "X-Repo-Commit": commit}, b"", head)

        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(len(f.data))}
        status, body = 200, f.data
        rng = h.headers.get("Range")
        if rng and not head:
            r = _RANGE.match(rng)
            start = int(r.group(1)) if r else len(f.data)
            end = min(int(r.group(2)) if r and r.group(2) else len(f.data) - 1, len(f.data) - 1)
            if not r or start >= len(f.data) or start > end:
                return self._send(h, 416, {"Content-Range": f"bytes */{len(f.data)}"}, b"", head)
            status, body = 206, f.data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
        self._send(h, status, headers, body, head)

    # ---------------------------------------------------------------- the upload API

    def _api(self, h: BaseHTTPRequestHandler, raw: str, body: bytes) -> None:
        auth = h.headers.get("Authorization")
        with self._lock:
            self.api_calls.append({"method": h.command, "path": unquote(raw), "authorization": auth})
        try:
            status, payload = self._route(h.command, raw, body, auth, parse_qs(urlsplit(h.path).query))
        except _ApiError as e:
            headers = {"X-Error-Message": e.message, "Content-Type": "application/json"}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            return self._send(h, e.status, headers, json.dumps({"error": e.message, **e.extra}).encode(), False)
        self._send(h, status, {"Content-Type": "application/json"}, json.dumps(payload).encode(), False)

    def _check_token(self, auth: str | None, write: bool) -> None:
        if self.tokens is None:
            return
        token = auth[len("Bearer "):] if auth and auth.startswith("Bearer ") else None
        if token not in self.tokens:
            raise _ApiError(401, "Invalid credentials in Authorization header")
        if write and self.tokens[token] != "write":
            raise _ApiError(403, "You don't have the rights to write to this repo: the token is read-only")

    def _route(self, method: str, raw: str, body: bytes, auth: str | None, query: dict) -> tuple[int, object]:
        if raw == "/api/validate-yaml" and method == "POST":
            self._check_token(auth, write=False)
            return 200, {"errors": [], "warnings": []}
        if raw == "/api/repos/create" and method == "POST":
            self._check_token(auth, write=True)
            return self._create_repo(json.loads(body or b"{}"))
        m = _API_REPO.match(raw)
        if not m:
            raise _ApiError(404, f"no such API route: {method} {raw}")
        repo_type, repo = _TYPES[m.group(1)], f"{unquote(m.group(2))}/{unquote(m.group(3))}"
        action, arg = m.group(4), unquote(m.group(5)) if m.group(5) else None
        key = (repo_type, repo)
        if method == "GET" and action == "tree":
            self._check_token(auth, write=False)
            revision, _, under = m.group(5).partition("/")
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            return self._tree(key, unquote(revision), unquote(under).strip("/"), recursive)
        if method == "GET" and action in (None, "revision"):
            self._check_token(auth, write=False)
            return self._repo_info(key, arg or "main")
        if method != "POST" or action in (None, "revision"):
            raise _ApiError(405, f"{method} {raw} is not supported")
        self._check_token(auth, write=True)
        with self._lock:
            if key not in self._refs:
                raise _ApiError(404, "Repository not found", "RepoNotFound")
        if action == "preupload":
            return self._preupload(key, arg, json.loads(body or b"{}"))
        if action == "commit":
            return self._commit(key, arg, body)
        return self._branch(key, arg, json.loads(body or b"{}"))

    def _url(self, key: tuple[str, str]) -> str:
        repo_type, repo = key
        return f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"

    def _create_repo(self, req: dict) -> tuple[int, object]:
        name, org = req.get("name"), req.get("organization")
        if not name or not org:
            raise _ApiError(400, "name and organization are required")
        key = (req.get("type") or "model", f"{org}/{name}")
        with self._lock:
            if key in self._refs:
                raise _ApiError(409, "You already created this repo", extra={"url": self._url(key)})
            commit = hashlib.sha1(f"hubstandin:init:{key}".encode()).hexdigest()
            self._refs[key] = {"main": commit}
            self._commits[key] = {commit: {".gitattributes": StoredFile(GITATTRIBUTES, False)}}
            self._private[key] = req.get("visibility") == "private" or bool(req.get("private"))
        return 200, {"url": self._url(key), "name": key[1], "id": key[1]}

    def _resolve(self, key: tuple[str, str], revision: str) -> str:
        with self._lock:
            refs, commits = self._refs.get(key), self._commits.get(key)
        if refs is None:
            raise _ApiError(404, "Repository not found", "RepoNotFound")
        commit = refs.get(revision) or (revision if revision in commits else None)
        if commit is None:
            raise _ApiError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_info(self, key: tuple[str, str], revision: str) -> tuple[int, object]:
        commit = self._resolve(key, revision)
        with self._lock:
            files = sorted(self._commits[key][commit])
            private = self._private[key]
        return 200, {"id": key[1], "sha": commit, "private": private, "siblings": [{"rfilename": f} for f in files]}

    def _tree(self, key: tuple[str, str], revision: str, under: str, recursive: bool) -> tuple[int, object]:
        commit = self._resolve(key, revision)
        with self._lock:
            files = self._commits[key][commit]
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder,
                                    "oid": hashlib.sha1(f"tree:{commit}:{folder}".encode()).hexdigest()})
            if recursive or len(rest) == 1:
                f = files[path]
                entry = {"type": "file", "path": path, "size": len(f.data), "oid": git_blob_sha1(f.data)}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                entries.append(entry)
        if under and not entries:
            raise _ApiError(404, f"{under} does not exist at {revision}", "EntryNotFound", commit)
        return 200, entries

    def _preupload(self, key: tuple[str, str], revision: str, req: dict) -> tuple[int, object]:
        commit = self._resolve(key, revision)
        with self._lock:
            current = self._commits[key][commit]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                       "oid": current[f["path"]].etag if f["path"] in current else None}
                      for f in req.get("files", [])]
        return 200, {"files": answer, "commitOid": commit}

    def _commit(self, key: tuple[str, str], revision: str, body: bytes) -> tuple[int, object]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _ApiError(400, "the first ndjson line must be the header")
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            k, v = line.get("key"), line.get("value", {})
            if k == "file":
                if v.get("encoding") != "base64":
                    raise _ApiError(400, f"unsupported encoding {v.get('encoding')!r}")
                added[v["path"]] = base64.b64decode(v["content"])
            elif k in ("deletedFile", "deletedFolder"):
                deleted.append(v["path"])
            else:
                raise _ApiError(400, f"unsupported commit operation {k!r} (this stand-in takes regular files only)")
        parent = self._resolve(key, revision)
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise _ApiError(412, "parentCommit is not the head of the revision")
        with self._lock:
            files = dict(self._commits[key][parent])
            for path in deleted:
                files = {p: f for p, f in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            files |= {p: StoredFile(data, False) for p, data in added.items()}
            oid = hashlib.sha1(parent.encode() + body).hexdigest()
            self._commits[key][oid] = files
            self._refs[key][revision] = oid
            self.commits.append({"repo": key[1], "repo_type": key[0], "revision": revision, "oid": oid,
                                 "parent": parent, "summary": header.get("summary"),
                                 "description": header.get("description"), "added": added, "deleted": deleted})
        return 200, {"commitUrl": f"{self._url(key)}/commit/{oid}", "commitOid": oid, "success": True,
                     "pullRequestUrl": None}

    def _branch(self, key: tuple[str, str], branch: str, req: dict) -> tuple[int, object]:
        start = self._resolve(key, req.get("startingPoint") or "main")
        with self._lock:
            if branch in self._refs[key]:
                raise _ApiError(409, f"Branch {branch} already exists")
            self._refs[key][branch] = start
        return 200, {}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
