"""A loopback HTTP reverse proxy that injects faults between a client and a real teacher server.

It sits between an HTTP client (httpx, keep-alive) and an upstream server (`mlx_lm.server`,
`ollama serve`, or tests/ollama_standin.py), forwards every request (any method, path, query,
body and end-to-end header; the upstream's status, headers such as Content-Type and body come
back) and, per request, can answer with a fault instead:

  "500"         500 with a JSON error body; the upstream is not called (any "4xx"/"5xx" status
                string works the same way)
  "429"         429 with `Retry-After: 0` and a JSON error body; the upstream is not called
  "timeout"     read the request, then hold the connection without answering for `hold_s`
                seconds (or until the proxy restarts or closes), then close it: the client's
                own read timeout has to fire
  "malformed"   forward to the upstream, then answer 200 with the first half of its body
                (not valid JSON), with a correct Content-Length: the connection stays usable
  "drop"        read the request, then close the connection without a byte of answer
                (httpx: RemoteProtocolError "Server disconnected without sending a response")
  "incomplete"  forward to the upstream, send 200 headers with the Content-Length of its whole
                body, half of the body, then close (httpx: RemoteProtocolError "peer closed
                connection without sending complete message body")

    with OllamaStandin() as teacher, FaultProxy(teacher.url, seed=0) as proxy:
        proxy.url                          # http://127.0.0.1:PORT: point the client here
        proxy.fail_next(2, "500")          # the next two requests (any path) answer 500
        proxy.fail_next(1, "drop", path="/api/chat")  # ... or only requests whose path starts so
        proxy.random_faults(0.3, ("500", "drop"))     # each chat request: a fault with p=0.3
        proxy.random_faults(0)             # off again
        proxy.restart_async(down_s=0.3)    # down now (refused), same port again in 0.3 s: a Thread
        proxy.restart(down_s=0.3)          # the same, returning once it listens again
        proxy.injected                     # Counter({"500": 2, "drop": 1, ...})
        proxy.forwarded, proxy.requests    # answered from the upstream unharmed / all requests
        proxy.log                          # [Proxied(method, path, fault, status), ...]

Queued faults (`fail_next`) hit requests in arrival order, any path (or those starting with
`path=`), and come before random ones. Random faults only hit requests whose path (without the
query) is in `only_paths` (default: the two chat endpoints; None: any path), never the health
paths (GET /api/tags, /api/version, /v1/models, /health), each independently with probability
`rate`, the kind drawn uniformly from `kinds`, all from one `random.Random(seed)`: the same
sequence of requests meets the same faults.

The upstream's answer is read whole before it is relayed (a streamed answer arrives in one
piece). An upstream that cannot be reached answers 502 with a JSON error (`upstream_errors`).
HTTP/1.1 with keep-alive towards the client, one upstream connection per request, plain http,
127.0.0.1 only. `close()` (or leaving the `with`) cuts every connection, held ones included, so
it never waits for a client or for `hold_s`.
"""

from __future__ import annotations

import errno
import http.client
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.ollama_standin import LoopbackListener

HOST = "127.0.0.1"
KINDS = ("500", "429", "timeout", "malformed", "drop", "incomplete")
CHAT_PATHS = ("/api/chat", "/v1/chat/completions")
HEALTH_PATHS = ("/api/tags", "/api/version", "/v1/models", "/health")

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself: never relayed.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host"}
_REQUEST_DROP = _HOP | {"accept-encoding"}         # http.client asks for identity: bodies stay cuttable
_RESPONSE_DROP = _HOP | {"server", "date"}         # send_response() writes its own


def fault_kind(kind: str | int) -> str:
    """The canonical name of a fault kind; ValueError for an unknown one."""
    kind = str(kind)
    if kind in KINDS or (kind.isdigit() and 400 <= int(kind) < 600):
        return kind
    raise ValueError(f"unknown fault kind {kind!r}: one of {', '.join(KINDS)} or an HTTP 4xx/5xx status")


@dataclass
class Proxied:
    method: str
    path: str                     # without the query
    fault: str | None = None
    status: int | None = None     # what the client was sent; None: no answer (timeout, drop)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False        # close() cuts the connections itself; never join their threads
    request_queue_size = 128      # the default backlog of 5 drops bursts of connects
    # allow_reuse_address (from HTTPServer) lets a restart bind the same port again at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a cut connection is the point here
            super().handle_error(request, client_address)


class FaultProxy(LoopbackListener):
    """A fault-injecting reverse proxy for `upstream_url` (http://127.0.0.1:PORT[/prefix], loopback only). Thread-safe."""

    def __init__(self, upstream_url: str, *, seed: int = 0, port: int = 0, hold_s: float = 30.0,
                 upstream_timeout_s: float = 120.0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self.upstream_url = upstream_url
        self._up_host, self._up_port = parts.hostname, parts.port or 80
        self._up_prefix = parts.path.rstrip("/")
        self.hold_s = hold_s                          # how long a "timeout" fault holds its connection
        self.upstream_timeout_s = upstream_timeout_s
        self.seed = seed

        self.requests = 0                             # every request read
        self.forwarded = 0                            # relayed from the upstream unharmed
        self.upstream_errors = 0                      # upstream unreachable: answered 502
        self.connections = 0                          # client connections accepted
        self.restarts = 0                             # times it came back after restart()
        self.injected: Counter[str] = Counter()       # faults by kind
        self.log: list[Proxied] = []

        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._queue: list[tuple[str, str | None]] = []
        self._rate = 0.0
        self._kinds: tuple[str, ...] = ()
        self._only_paths: frozenset[str] | None = None
        self._conns: dict[socket.socket, threading.Event] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self._stopping = threading.Event()
        self._restarts: list[threading.Thread] = []

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body go out in separate writes: without this, Nagle's algorithm meets
                # the client's delayed ACK and a keep-alive answer can stall for 40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.cut = proxy._track(self.connection, self.server)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    proxy._untrack(self.connection)

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _any

        self._handler = Handler

    # ---------------------------------------------------------------- control

    def fail_next(self, n: int, kind: str | int, path: str | None = None) -> None:
        """The next `n` requests (whose path starts with `path`, if given) meet fault `kind`."""
        kind = fault_kind(kind)
        with self._lock:
            self._queue += [(kind, path)] * n

    def random_faults(self, rate: float, kinds: Iterable[str | int] = KINDS,
                      only_paths: Iterable[str] | None = CHAT_PATHS, seed: int | None = None) -> None:
        """Each request to `only_paths` (None: any path but the health ones) meets a fault with
        probability `rate`, of a kind drawn uniformly from `kinds`. `rate` 0 turns it off;
        `seed` restarts the random sequence."""
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], not {rate}")
        kinds = tuple(fault_kind(k) for k in kinds)
        if rate and not kinds:
            raise ValueError("random faults need at least one kind")
        with self._lock:
            self._rate, self._kinds = float(rate), kinds
            self._only_paths = None if only_paths is None else frozenset(only_paths)
            if seed is not None:
                self.seed, self._rng = seed, random.Random(seed)

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._queue)

    def reset(self) -> None:
        """Forget queued faults, turn random faults off, zero the counters and the log."""
        with self._lock:
            self._queue.clear()
            self._rate = 0.0
            self.requests = self.forwarded = self.upstream_errors = 0
            self.injected.clear()
            self.log.clear()

    def restart_async(self, down_s: float = 0.3) -> threading.Thread:
        """Stop listening and cut every open connection now (new connections are refused), listen
        again on the same port after `down_s`. Returns once down; the returned thread brings the
        proxy back (join it to wait)."""
        self._go_down()
        t = threading.Thread(target=self._come_back, args=(down_s,), name="fault-proxy-restart", daemon=True)
        with self._lock:
            self._restarts.append(t)
        t.start()
        return t

    def restart(self, down_s: float = 0.3) -> None:
        """restart_async(down_s), returning once the proxy listens again."""
        self.restart_async(down_s).join()

    def _come_back(self, down_s: float) -> None:
        if self._stopping.wait(down_s):
            return
        deadline = time.monotonic() + 5
        while not self._stopping.is_set():
            with self._lock:
                if self._server is not None:  # another restart already brought it back
                    return
            try:
                self._listen(self._port)
            except OSError as e:  # a client socket may briefly hold the port (it is an ephemeral one)
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                self._stopping.wait(0.02)
                continue
            with self._lock:
                self.restarts += 1
            return

    # ---------------------------------------------------------------- serving

    @property
    def url(self) -> str:
        assert self._port, "not started"
        return f"http://{HOST}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> "FaultProxy":
        self._stopping.clear()
        self._listen(self._port)
        return self

    def close(self) -> None:
        """Stop for good: no restart comes back, every connection (held ones too) is cut."""
        self._stopping.set()
        with self._lock:
            restarts = list(self._restarts)
        for t in restarts:
            t.join(timeout=5)
        self._go_down()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _listen(self, port: int) -> None:
        self._start_listener(_Server((HOST, port), self._handler), "fault-proxy")

    def _go_down(self) -> None:
        self._close_listener()
        with self._lock:
            conns = list(self._conns.items())
        for sock, cut in conns:
            cut.set()  # wakes a held "timeout"
            _shutdown(sock)

    def _track(self, sock: socket.socket, server: Any) -> threading.Event:
        cut = threading.Event()
        with self._lock:
            self.connections += 1
            self._conns[sock] = cut
            stale = server is not self._server  # accepted while going down
        if stale:
            cut.set()
            _shutdown(sock)
        return cut

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.pop(sock, None)

    # ---------------------------------------------------------------- one request

    def _pick_fault(self, path: str) -> str | None:
        for i, (kind, prefix) in enumerate(self._queue):
            if prefix is None or path.startswith(prefix):
                del self._queue[i]
                return kind
        if (self._rate > 0 and path not in HEALTH_PATHS
                and (self._only_paths is None or path in self._only_paths)
                and self._rng.random() < self._rate):
            return self._rng.choice(self._kinds)
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        try:
            raw = _read_body(h)
        except (ValueError, OSError):
            h.close_connection = True
            return
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests += 1
            fault = self._pick_fault(path)
            if fault is not None:
                self.injected[fault] += 1
            entry = Proxied(h.command, path, fault)
            self.log.append(entry)

        if fault == "timeout":
            h.cut.wait(self.hold_s)  # type: ignore[attr-defined]
            return _drop(h)
        if fault == "drop":
            return _drop(h)
        if fault is not None and fault.isdigit():
            return self._status_fault(h, entry, int(fault), path)

        upstream = self._upstream(h, raw)
        if upstream is None:
            with self._lock:
                self.upstream_errors += 1
            body = json.dumps({"error": f"fault proxy: upstream {self.upstream_url} unreachable"}).encode()
            self._send(h, entry, 502, body, [("Content-Type", "application/json")])
            return
        status, headers, body = upstream
        if fault == "malformed":
            self._send(h, entry, 200, body[:len(body) // 2], _content_type(headers))
        elif fault == "incomplete":
            declared = max(len(body), 2)
            self._send(h, entry, 200, body[:declared // 2], _content_type(headers), length=declared)
            _drop(h)
        else:
            with self._lock:  # counted before the answer goes out: a client that has it sees the count
                self.forwarded += 1
            if not self._send(h, entry, status, body, headers):
                with self._lock:
                    self.forwarded -= 1  # the client was gone

    def _status_fault(self, h: BaseHTTPRequestHandler, entry: Proxied, status: int, path: str) -> None:
        message = f"fault proxy: injected HTTP {status}"
        error: Any = message
        if path.startswith("/v1/"):  # the OpenAI error shape; Ollama's is a plain string
            error = {"message": message, "type": "server_error" if status >= 500 else "rate_limit_error",
                     "param": None, "code": None}
        headers = [("Content-Type", "application/json")]
        if status in (429, 503):
            headers.append(("Retry-After", "0"))
        self._send(h, entry, status, json.dumps({"error": error}).encode(), headers)

    def _upstream(self, h: BaseHTTPRequestHandler, raw: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _REQUEST_DROP}
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=self.upstream_timeout_s)
        try:
            conn.request(h.command, self._up_prefix + h.path, body=raw or None, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _RESPONSE_DROP], body
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, entry: Proxied, status: int, body: bytes,
              headers: Iterable[tuple[str, str]] = (), length: int | None = None) -> bool:
        """Answer; False when the client is gone. `length` overrides Content-Length (a lie)."""
        entry.status = status
        try:
            h.send_response(status)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body) if length is None else length))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return True
        except OSError:
            h.close_connection = True
            return False


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size = int(h.rfile.readline(65537).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(h.rfile.read(size))
            h.rfile.readline(65537)
    length = int(h.headers.get("Content-Length") or 0)
    body = h.rfile.read(length) if length > 0 else b""
    if len(body) < length:
        raise ValueError("the client closed the connection mid-body")
    return body


def _content_type(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() == "content-type"] or [("Content-Type", "application/json")]


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a FIN: what is already written still arrives
    except OSError:
        pass


def _drop(h: BaseHTTPRequestHandler) -> None:
    h.close_connection = True
    _shutdown(h.connection)
