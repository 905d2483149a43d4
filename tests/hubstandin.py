"""A loopback stand-in for the Hugging Face Hub's file API, for tests that must not go online.

It serves in-memory files of dataset repos the way huggingface_hub (2.x) asks for them:

  HEAD /datasets/<owner>/<name>/resolve/<revision>/<path>   get_hf_file_metadata, also the first
                                                           step of hf_hub_download
  GET  /datasets/<owner>/<name>/resolve/<revision>/<path>   the bytes (http_get), honouring
                                                           `Range: bytes=N-[M]` for resumes

The revision arrives URL-quoted with no safe characters (`refs%2Fpr%2F1`), the path quoted with
"/" kept. A file answers 200 with `X-Repo-Commit` (the commit the revision resolves to),
`ETag` (the sha256 for "LFS" files, the git blob sha1 otherwise), `Content-Length`, and for LFS
files also `X-Linked-Etag` / `X-Linked-Size` (which huggingface_hub prefers). Files are served
directly, never through a redirect to a CDN. Errors carry the `X-Error-Code` header that
huggingface_hub maps to its exceptions: RepoNotFound (404), RevisionNotFound (404),
EntryNotFound (404, with X-Repo-Commit). Anything else is a plain 404.

    with HubStandin() as hub:
        commit = hub.add_file("owner/name", "data/x.jsonl", b"...")
        os.environ["HF_ENDPOINT"] = hub.endpoint
        hub.fail_next(2, 503)          # the next two requests, of any kind, answer 503
        ...
        hub.log                        # [("HEAD", "/datasets/owner/name/resolve/main/data/x.jsonl"), ...]

It binds 127.0.0.1 on a free port and nothing else.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOST = "127.0.0.1"
_RESOLVE = re.compile(r"^/datasets/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*$")


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
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


def default_commit(repo: str, revision: str = "main") -> str:
    return hashlib.sha1(f"hubstandin:{repo}@{revision}".encode()).hexdigest()


def closed_endpoint() -> str:
    """An http://127.0.0.1:PORT endpoint on which nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    return f"http://{HOST}:{port}"


class HubStandin:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, dict[str, str]] = {}               # repo -> revision -> commit
        self._commits: dict[str, dict[str, dict[str, StoredFile]]] = {}  # repo -> commit -> path -> file
        self._failures: list[int] = []
        self.log: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- content

    def add_file(self, repo: str, path: str, data: bytes, commit: str | None = None, revision: str = "main",
                 lfs: bool = True) -> str:
        """Put `data` at `path` of dataset `repo` in `commit`, and point `revision` at it; the commit.

        A new commit starts as a copy of the files the revision pointed at before (as git would).
        """
        with self._lock:
            refs = self._refs.setdefault(repo, {})
            commits = self._commits.setdefault(repo, {})
            commit = commit or refs.get(revision) or default_commit(repo, revision)
            assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
            if commit not in commits:
                commits[commit] = dict(commits.get(refs.get(revision, ""), {}))
            commits[commit][path] = StoredFile(bytes(data), lfs)
            refs[revision] = commit
            return commit

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
        with self._lock:
            self.log.append((h.command, unquote(raw)))
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return self._send(h, failure, {}, b"", head)

        m = _RESOLVE.match(raw)
        if not m:
            return self._send(h, 404, {}, b"Not Found", head)
        repo = f"{unquote(m.group(1))}/{unquote(m.group(2))}"
        revision, path = unquote(m.group(3)), unquote(m.group(4))
        with self._lock:
            refs, commits = self._refs.get(repo), self._commits.get(repo)
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

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
