"""A loopback stand-in for an Ollama server, for tests that must not need a real one.

It serves the parts of Ollama's contract a teacher client uses:

  GET  /api/tags              {"models": [{"name": "qwen3:0.6b", "model": "qwen3:0.6b", "size", "digest",
                               "modified_at", "details": {...}}, ...]}
  POST /api/chat              stream false only: {"model", "created_at", "message": {"role": "assistant",
                               "content"}, "done": true, "done_reason": "stop", "total_duration",
                               "load_duration", "prompt_eval_count", "prompt_eval_duration",
                               "eval_count", "eval_duration"}; an unknown model answers
                               404 {"error": "model 'x' not found"}
  GET  /v1/models             {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}
  POST /v1/chat/completions   {"id", "object": "chat.completion", "created", "model", "system_fingerprint",
                               "choices": [{"index": 0, "message": {...}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}};
                               an unknown model answers 404 {"error": {"message", "type", ...}}

The reply text comes from `answer(messages) -> str` (default: "echo: <last user message>").
Token counts are whitespace-separated words (`count_tokens`): prompt_eval_count / prompt_tokens
counts every message's content, eval_count / completion_tokens the reply; "done_reason" /
"finish_reason" is "length" when the reply has more words than num_predict / max_tokens (the
reply is then cut to that many words).

    with OllamaStandin() as server:
        server.url                      # http://127.0.0.1:PORT
        server.delay_s = 0.2            # every chat request sleeps this long before answering
        server.fail_next(2, "500")      # the next two requests answer 500
        server.fail_next(1, "timeout")  # ... sleeps timeout_sleep_s, then closes without answering
        server.restart(down_s=0.3)      # stop listening now, come back on the same port later
        server.log                      # [Request(method, path, body, headers, fault, status), ...]
        server.max_in_flight            # most requests handled at once

Fault kinds: an HTTP status ("500", "503", "429", or an int; body {"error": ...}), "timeout",
"malformed" (200 with invalid JSON), "incomplete" (200 with valid JSON lacking the message),
"drop" (close the socket without answering). Faults hit requests in arrival order, any path,
or only paths starting with `path=`. One connection per request (HTTP/1.0), 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
FAULTS = ("timeout", "malformed", "incomplete", "drop")


def count_tokens(text: str) -> int:
    return len(text.split())


def echo_answer(messages: list[dict[str, Any]]) -> str:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"echo: {last}"


def closed_url() -> str:
    """An http://127.0.0.1:PORT URL on which nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    return f"http://{HOST}:{port}"


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops bursts of connects (1 s SYN retries)
    # allow_reuse_address (from HTTPServer) lets restart() bind the same port again at once


class LoopbackListener:
    """Runs one ThreadingHTTPServer at a time in a thread; `self._lock` guards the fields."""

    _server: ThreadingHTTPServer | None
    _thread: threading.Thread | None
    _port: int

    def _start_listener(self, server: ThreadingHTTPServer, name: str) -> None:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, name=name, daemon=True)
        with self._lock:
            self._server, self._thread = server, thread
            self._port = server.server_address[1]
        thread.start()

    def _close_listener(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@dataclass
class Request:
    method: str
    path: str
    body: Any                       # parsed JSON, the raw text if not JSON, None if empty
    headers: dict[str, str]
    fault: str | None = None
    status: int | None = None       # None: no answer (timeout, drop)


@dataclass
class _Fault:
    kind: str
    path: str | None
    retry_after: float | None = None


@dataclass
class OllamaStandin(LoopbackListener):
    models: tuple[str, ...] = ("qwen3:0.6b",)
    answer: Callable[[list[dict[str, Any]]], str] = echo_answer
    delay_s: float = 0.0              # sleep per chat request (concurrency tests)
    timeout_sleep_s: float = 2.0      # how long a "timeout" fault holds the request
    serve_v1_models: bool = True      # False: GET /v1/models answers 404 (servers without it)
    log: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._restarts: list[threading.Thread] = []

    # ---------------------------------------------------------------- control

    def fail_next(self, n: int, kind: str | int, path: str | None = None, retry_after: float | None = None) -> None:
        kind = str(kind)
        assert kind in FAULTS or (kind.isdigit() and 400 <= int(kind) < 600), kind
        with self._lock:
            self._faults += [_Fault(kind, path, retry_after) for _ in range(n)]

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if path is None or r.path == path]

    def chat_bodies(self) -> list[Any]:
        return [r.body for r in self.requests() if r.method == "POST"]

    def reset(self) -> None:
        """Clear the log, the counters and any faults not yet used."""
        with self._lock:
            self.log.clear()
            self._faults.clear()
            self.in_flight = self.max_in_flight = 0

    def restart(self, down_s: float = 0.3, wait: bool = False) -> threading.Thread:
        """Stop listening now (connections are refused), listen again on the same port after
        `down_s`. Requests being answered finish. Returns the thread that brings it back."""
        self._close_listener()
        t = threading.Thread(target=self._come_back, args=(down_s,), name="ollama-standin-restart", daemon=True)
        self._restarts.append(t)
        t.start()
        if wait:
            t.join()
        return t

    def _come_back(self, down_s: float) -> None:
        if not self._stopping.wait(down_s):
            self._listen(self._port)

    # ---------------------------------------------------------------- serving

    @property
    def url(self) -> str:
        assert self._port, "not started"
        return f"http://{HOST}:{self._port}"

    def start(self) -> "OllamaStandin":
        self._stopping.clear()
        self._listen(0)
        return self

    def stop(self) -> None:
        self._stopping.set()  # also cuts "timeout" sleeps short
        for t in self._restarts:
            t.join(timeout=5)
        self._close_listener()

    def __enter__(self) -> "OllamaStandin":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _listen(self, port: int) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                standin._handle(self)

            def do_POST(self) -> None:
                standin._handle(self)

        server = _Server((HOST, port), Handler)
        server.daemon_threads = True
        self._start_listener(server, "ollama-standin")

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = h.path.split("?", 1)[0]
        req = Request(h.command, path, body, {k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.log.append(req)
            fault = next((f for f in self._faults if f.path is None or path.startswith(f.path)), None)
            if fault is not None:
                self._faults.remove(fault)
                req.fault = fault.kind
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if fault is not None:
                self._fault(h, req, fault)
            else:
                self._route(h, req)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _fault(self, h: BaseHTTPRequestHandler, req: Request, fault: _Fault) -> None:
        if fault.kind == "timeout":
            self._stopping.wait(self.timeout_sleep_s)
            return self._drop(h)
        if fault.kind == "drop":
            return self._drop(h)
        if fault.kind == "malformed":
            return self._send(h, req, 200, b'{"model": "qwen3:0.6b", "message": {"role": "assis')
        if fault.kind == "incomplete":
            return self._send(h, req, 200, json.dumps({"model": "qwen3:0.6b", "done": True}).encode())
        status = int(fault.kind)
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        messages = {429: "too many requests", 500: "llama runner process has terminated", 503: "server busy"}
        self._json(h, req, status, {"error": messages.get(status, f"standin fault {status}")}, headers)

    @staticmethod
    def _drop(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _route(self, h: BaseHTTPRequestHandler, req: Request) -> None:
        route = (req.method, req.path)
        if route == ("GET", "/api/tags"):
            return self._json(h, req, 200, {"models": [self._tag(m) for m in self.models]})
        if route == ("GET", "/api/version"):
            return self._json(h, req, 200, {"version": "0.0.0-standin"})
        if route == ("GET", "/v1/models") and self.serve_v1_models:
            return self._json(h, req, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "library"} for m in self.models]})
        if route in (("POST", "/api/chat"), ("POST", "/v1/chat/completions")):
            return self._chat(h, req, openai=req.path.startswith("/v1/"))
        self._send(h, req, 404, b"404 page not found", "text/plain")

    def _chat(self, h: BaseHTTPRequestHandler, req: Request, openai: bool) -> None:
        body = req.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(h, req, 400, "invalid request body", openai)
        model = body.get("model")
        if model not in self.models:
            msg = (f'model "{model}" not found, try pulling it first' if openai else f"model '{model}' not found")
            return self._error(h, req, 404, msg, openai)
        if body.get("stream", True):  # Ollama streams by default; this stand-in only answers whole
            return self._error(h, req, 400, "ollama standin: only stream=false is supported", openai)
        if self.delay_s:
            self._stopping.wait(self.delay_s)

        text = self.answer(body["messages"])
        limit = body.get("max_tokens") if openai else (body.get("options") or {}).get("num_predict")
        finish = "stop"
        if isinstance(limit, int) and limit > 0 and count_tokens(text) > limit:
            text, finish = " ".join(text.split()[:limit]), "length"
        prompt = sum(count_tokens(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict))
        completion = count_tokens(text)
        now = datetime.now(timezone.utc)
        if openai:
            digest = hashlib.sha1(f"{now.timestamp()}{text}".encode()).hexdigest()[:8]
            return self._json(h, req, 200, {
                "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(now.timestamp()),
                "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}})
        self._json(h, req, 200, {
            "model": model, "created_at": now.isoformat().replace("+00:00", "Z"),
            "message": {"role": "assistant", "content": text}, "done": True, "done_reason": finish,
            "total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": prompt,
            "prompt_eval_duration": 200_000, "eval_count": completion, "eval_duration": 700_000})

    @staticmethod
    def _tag(name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        family = name.split(":")[0]
        return {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z", "size": 522_653_767,
                "digest": digest, "details": {"parent_model": "", "format": "gguf", "family": family,
                                              "families": [family], "parameter_size": "751.63M",
                                              "quantization_level": "Q4_K_M"}}

    def _error(self, h: BaseHTTPRequestHandler, req: Request, status: int, message: str, openai: bool) -> None:
        if openai:
            err: Any = {"message": message, "type": "api_error" if status >= 500 else "invalid_request_error",
                        "param": None, "code": None}
        else:
            err = message
        self._json(h, req, status, {"error": err})

    def _json(self, h: BaseHTTPRequestHandler, req: Request, status: int, data: Any,
              headers: dict[str, str] | None = None) -> None:
        self._send(h, req, status, json.dumps(data).encode(), "application/json; charset=utf-8", headers)

    def _send(self, h: BaseHTTPRequestHandler, req: Request, status: int, body: bytes,
              content_type: str = "application/json; charset=utf-8", headers: dict[str, str] | None = None) -> None:
        req.status = status
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass  # the client went away (it timed out)
