"""A synchronous, thread-safe HTTP client for a teacher model (Ollama or OpenAI-compatible).

Two wire APIs, chosen by `TeacherConfig.api`:

  "ollama"  Ollama's native API.
            health: GET  /api/tags            -> {"models": [{"name": "qwen3:0.6b", ...}, ...]}
            chat:   POST /api/chat            {"model", "messages", "stream": false, "think": false,
                                               "options": {"temperature", "top_p", "num_predict"}}
                    -> {"message": {"role": "assistant", "content": ...}, "done": true,
                        "done_reason": "stop", "prompt_eval_count": n, "eval_count": m, ...}
            `think: false` turns a thinking model's reasoning off (harmless on other models).
  "openai"  The OpenAI-compatible API (Ollama serves it too, as do vLLM, llama.cpp, LM Studio).
            health: GET  /v1/models           (falls back to a one-token chat where it is missing)
            chat:   POST /v1/chat/completions {"model", "messages", "temperature", "top_p",
                                               "max_tokens", "stream": false}
                    -> {"choices": [{"message": {"content": ...}, "finish_reason": ...}],
                        "usage": {"prompt_tokens": n, "completion_tokens": m}}
            The key is sent as `Authorization: Bearer <key>`. A config only names it:
            `api_key_env` (an environment variable) or `api_key_secret` (a Prefect Secret block,
            read through the `resolve_secret` callable the caller passes); with neither, the
            openai API uses $OPENAI_API_KEY when it is set. A literal `api_key` is refused
            (configs are Prefect flow-run parameters); see mlxcore/clients/secrets.py.

A reply's `<think>...</think>` reasoning is stripped (`strip_think`: what follows the last
`</think>`); an unclosed block, cut off by `max_tokens`, leaves an empty text.

Retry policy. One call (`chat`, or one job of `imap_unordered`) makes up to 1 + `retries`
attempts. An attempt, its whole body included, ends after `timeout_s` (plus at most one
read): a server dripping keep-alive whitespace or a byte at a time cannot hold it; an answer over
64 MiB is cut off. Both count as transient (timeout, malformed). `content: null` is an empty
reply. Transient failures are retried: HTTP 5xx and 429, timeouts, refused or dropped
connections (httpx transport errors, e.g. RemoteProtocolError "server disconnected"), and
malformed answers (a 2xx whose body is not JSON or lacks the reply text: a teacher that is
restarting can answer garbage). Before retry k (1, 2, ...) the client sleeps an "equal jitter"
backoff: half of min(max_backoff_s, backoff_s * 2**(k-1)) plus a uniform random part of the other
half; a 429/503 `Retry-After` (seconds or an HTTP date) raises that sleep, capped at max_backoff_s. Other 4xx
answers (400 bad request, 401, 404 model not found, ...) are not retried: the call raises
`TeacherError` naming the status, the server's message and, for 404, the model. A call whose
attempts all failed raises `TeacherError` (in `imap_unordered` it is yielded for that job: the
caller decides what a lost example costs).

Failure budget. The budget counts UNRECOVERED calls: a call (one `chat`, one job) that ended in
a TeacherError because its retries ran out or its error is not retryable. A failed attempt that a
retry recovered costs nothing, so a long run against a flaky but working teacher (20% of attempts
failing, every one recovered) never stops, however long it runs. The count is over a sliding
window of the most recent `failure_window` completed calls (default 200): when more than
`failure_budget` of them (default 50) were unrecovered, the teacher gives up. A window rather
than a lifetime total, because rare lost calls (0.2**5 of calls at a 20% fault rate with 4
retries) must not add up to a give-up in a run of a million calls; a budget rather than a rate
alone, because a teacher that is down loses every call and must stop after budget + 1 of them,
not after a window's worth. So a dead teacher (always 5xx, refusing connections, answering 404)
costs about (failure_budget + 1) x (1 + retries) attempts; lower `failure_budget` or `retries`
where an attempt is expensive (a hung server costs `timeout_s` per attempt).
Giving up: no further requests are issued (calls in progress stop before their next attempt)
and `TeacherGaveUp` (a `TeacherError`) is raised, with a report: unrecovered calls in the
window and in all, the budget and window, calls recovered by retrying, attempts made, failed
attempts by kind (timeout, 5xx, 429, connection, malformed, 4xx) and the last error. The
give-up is sticky: later calls raise it at once; make a new Teacher to try again.

Concurrency. `imap_unordered(jobs)` runs `workers` requests at a time on a thread pool sharing one
httpx.Client, reads the job iterator lazily (at most 2 x workers jobs taken but not yet yielded)
and yields `(key, Reply | TeacherError)` as requests complete. `teacher.stats` gives counters
for progress reports. Health probes are not counted in `stats` nor against the budget.

This module is part of mlxcore: it must not import prefect.
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import ipaddress
import json
import random
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from mlxcore.bench.answers import strip_think
from mlxcore.distill.schema import TeacherConfig  # noqa: F401  (re-exported)
from mlxcore.clients.secrets import SecretResolver, resolve_api_key

_MAX_BODY = 64 << 20  # bytes of one answer; a reply of max_tokens tokens is a tiny fraction of it
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

FAILURE_KINDS = ("timeout", "5xx", "429", "connection", "malformed", "4xx")


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float                 # wall time of the whole call, retries and backoff included
    attempts: int
    finish_reason: str | None = None  # Ollama done_reason / OpenAI finish_reason ("stop", "length")


class TeacherError(RuntimeError):
    """A teacher call failed; `kind` is one of FAILURE_KINDS (or "model" from health())."""

    def __init__(self, message: str, *, kind: str | None = None, status: int | None = None,
                 attempts: int = 0) -> None:
        super().__init__(message)
        self.kind, self.status, self.attempts = kind, status, attempts


class TeacherGaveUp(TeacherError):
    """More recent calls ended unrecovered than the failure budget allows; `report` says what
    happened (see the module doc, "Failure budget")."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message, kind="gave_up", attempts=report["attempts"])
        self.report = report


class _Transient(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.status, self.retry_after = kind, message, status, retry_after


class _Cancelled(Exception):
    """The imap_unordered run this call belongs to was closed; nobody reads the result."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_message(raw: bytes | bytearray) -> str:
    try:
        data = json.loads(bytes(raw))
    except ValueError:
        return bytes(raw).decode("utf-8", "replace").strip()[:500] or "(empty body)"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err if err else data)[:500]


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in seconds, or as an HTTP date (RFC 9110) counted from now; None when absent or unreadable."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Teacher:
    """One teacher server. Thread-safe; use as a context manager or call close().

    The API key is read here, once, in this process: `config.api_key_env` from the environment,
    `config.api_key_secret` through `resolve_secret` (a Prefect Secret block's name -> its value;
    mlxcore cannot import prefect). Raises mlxcore.clients.secrets.SecretError when it cannot be found.
    """

    def __init__(self, config: TeacherConfig | None = None, *, resolve_secret: SecretResolver | None = None,
                 **overrides: Any) -> None:
        if config is None:
            config = TeacherConfig(**overrides)
        elif overrides:
            config = TeacherConfig(**{**config.model_dump(), **overrides})
        self.config = config
        key = resolve_api_key(config.api_key_env, config.api_key_secret, resolver=resolve_secret,
                              default_env="OPENAI_API_KEY" if config.api == "openai" else None,
                              who=f"teacher {config.model!r}")
        url = config.url.rstrip("/")
        if config.api == "openai" and url.endswith("/v1"):
            url = url[:-3]  # accept an OpenAI-style base URL; paths below carry /v1
        self.url = url
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=2 * config.workers + 2, max_keepalive_connections=config.workers),
            follow_redirects=False,
            trust_env=not _is_loopback(urlsplit(url).hostname),  # never send loopback through a proxy
            # plain http needs no CA bundle (loading it costs ~45 ms per client); https verifies as usual
            verify=urlsplit(url).scheme == "https",
        )
        self._lock = threading.Lock()
        self._halt = threading.Event()  # set on give-up and on close: wakes backoff sleeps
        self._closed = False
        self._gave_up: TeacherGaveUp | None = None
        self._last_error = ""
        self._window: collections.deque[bool] = collections.deque(maxlen=config.failure_window)  # True: unrecovered
        self._stats: dict[str, Any] = {
            "requests": 0, "ok": 0, "retries": 0, "recovered": 0, "errors": 0, "unrecovered": 0,
            "window_unrecovered": 0, "window_calls": 0, "failure_budget": config.failure_budget,
            "failure_window": config.failure_window, "failed": 0,
            "failures": dict.fromkeys(FAILURE_KINDS, 0),
            "prompt_tokens": 0, "completion_tokens": 0, "gave_up": False,
        }

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed = True
        self._halt.set()
        self._client.close()

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: requests (attempts sent), ok (calls answered), retries (attempts that were
        retried), recovered (calls answered after at least one failed attempt), errors and
        unrecovered (the same: calls that ended in a TeacherError), window_unrecovered of
        window_calls (the most recent calls, what failure_budget is held against),
        failure_budget, failure_window, failed (failed attempts, recovered or not), failures (failed
        attempts by kind), prompt/completion tokens, gave_up."""
        with self._lock:
            return {**self._stats, "failures": dict(self._stats["failures"])}

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """Check the server answers and serves the model; {"api", "url", "model", "models"}.

        One attempt per probe, no retries; raises TeacherError with a message meant for people.
        """
        model = self.config.model
        if self.config.api == "ollama":
            data = self._probe_get("/api/tags")
            entries = data.get("models") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise TeacherError(f"the server at {self.url} answered GET /api/tags without a model list: is it "
                                   "Ollama? (for an OpenAI-compatible server set api: openai)", kind="malformed")
            names = [str(e.get("name") or e.get("model")) for e in entries if isinstance(e, dict)]
            if not any(_same_ollama_model(model, n) for n in names):
                raise TeacherError(
                    f"model {model!r} is not available on the Ollama server at {self.url} "
                    f"(it has: {', '.join(names) or 'no models'}); run `ollama pull {model}`", kind="model")
            return {"api": "ollama", "url": self.url, "model": model, "models": names}

        try:
            data = self._probe_get("/v1/models")
        except TeacherError as e:
            # no model listing here (or a broken one: mlx_lm.server answers 200 with an empty body
            # when it has no Hugging Face cache to scan): a tiny chat proves the model answers
            if e.status not in (404, 405, 501) and e.kind != "malformed":
                raise
            self._probe_chat([])
            return {"api": "openai", "url": self.url, "model": model, "models": []}
        entries = data.get("data") if isinstance(data, dict) else None
        ids = [str(e.get("id")) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        if model not in ids:
            # Some servers list a file name but answer to any model name: ask the model itself.
            self._probe_chat(ids)
        return {"api": "openai", "url": self.url, "model": model, "models": ids}

    def _probe_get(self, path: str) -> Any:
        try:
            resp = self._client.get(path)
        except httpx.TimeoutException as e:
            raise TeacherError(f"the teacher at {self.url} did not answer GET {path} within "
                               f"{self.config.timeout_s:g}s ({type(e).__name__})", kind="timeout") from e
        except httpx.TransportError as e:
            raise TeacherError(f"cannot reach the teacher at {self.url} ({type(e).__name__}: {e}): "
                               f"{self._running_hint()}", kind="connection") from e
        if resp.status_code >= 400:
            raise TeacherError(f"the teacher at {self.url} answered GET {path} with HTTP {resp.status_code}: "
                               f"{_server_message(resp.content)}", kind=_status_kind(resp.status_code),
                               status=resp.status_code)
        try:
            return resp.json()
        except ValueError as e:
            raise TeacherError(f"the teacher at {self.url} answered GET {path} with invalid JSON: "
                               f"{resp.text[:200]!r}", kind="malformed") from e

    def _probe_chat(self, listed: list[str]) -> None:
        path, body = self._request([{"role": "user", "content": "Say OK."}], max_tokens=1)
        try:
            self._attempt(path, body)
        except _Transient as e:
            raise TeacherError(f"health check chat failed: {e.message}", kind=e.kind, status=e.status) from None
        except TeacherError as e:
            if e.status == 404:
                raise TeacherError(f"model {self.config.model!r} is not served at {self.url} (it lists: "
                                   f"{', '.join(listed) or 'no models'}): {e}", kind="model", status=404) from None
            raise

    def _running_hint(self) -> str:
        if self.config.api == "ollama":
            return f"is `ollama serve` running at {self.url}?"
        return f"is `ollama serve` (or the OpenAI-compatible server) running at {self.url}?"

    # ------------------------------------------------------------------ one call

    def chat(self, messages: list[dict[str, Any]]) -> Reply:
        """One chat completion, retried per the module's policy. Raises TeacherError / TeacherGaveUp."""
        return self._chat(messages, None)

    def _request(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> tuple[str, dict]:
        c = self.config
        n = max_tokens or c.max_tokens
        if c.api == "ollama":
            return "/api/chat", {"model": c.model, "messages": messages, "stream": False, "think": False,
                                 "options": {"temperature": c.temperature, "top_p": c.top_p, "num_predict": n}}
        return "/v1/chat/completions", {"model": c.model, "messages": messages, "temperature": c.temperature,
                                        "top_p": c.top_p, "max_tokens": n, "stream": False}

    def _attempt(self, path: str, body: dict) -> tuple[str, int, int, str | None]:
        """One HTTP request: (text, prompt_tokens, completion_tokens, finish_reason).

        The whole attempt, body included, ends after `timeout_s` (httpx's timeout alone bounds each
        read, so a server sending keep-alive whitespace or trickling bytes could hold it forever),
        and a body over `_MAX_BODY` bytes is cut off: both are retried as transient.
        Raises _Transient for what a retry may cure, TeacherError for what it will not.
        """
        limit = self.config.timeout_s
        deadline = time.monotonic() + limit
        try:
            with self._client.stream("POST", path, json=body) as resp:
                raw = bytearray()
                for chunk in resp.iter_bytes():
                    raw += chunk
                    if len(raw) > _MAX_BODY:
                        raise _Transient("malformed", f"the answer to POST {path} passed {_MAX_BODY >> 20} MiB; "
                                         "cut off", status=resp.status_code)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the whole answer took too long")
        except httpx.TimeoutException as e:
            raise _Transient("timeout", f"no answer within {limit:g}s ({type(e).__name__})") from e
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as e:
            raise TeacherError(f"cannot send a request to {self.url}: {e}", kind="4xx") from e
        except httpx.ConnectError as e:
            raise _Transient("connection", f"cannot connect to {self.url} ({e}): {self._running_hint()}") from e
        except httpx.TransportError as e:
            raise _Transient("connection", f"connection to {self.url} lost ({type(e).__name__}: {e})") from e
        except httpx.DecodingError as e:
            raise _Transient("malformed", f"undecodable response body ({e})") from e

        status = resp.status_code
        if status == 429 or status >= 500:
            raise _Transient(_status_kind(status), f"HTTP {status} from POST {path}: {_server_message(raw)}",
                             status=status, retry_after=_retry_after(resp))
        if status >= 300:
            msg = f"the teacher answered HTTP {status} to POST {path}: {_server_message(raw)}"
            if status == 404:
                msg += f" (model {self.config.model!r}: is it pulled? `ollama pull {self.config.model}`)"
            raise TeacherError(msg, kind="4xx", status=status)
        try:
            data = json.loads(bytes(raw))
        except ValueError:
            raise _Transient("malformed", f"invalid JSON from POST {path}: {bytes(raw[:200])!r}",
                             status=status) from None
        try:
            if self.config.api == "ollama":
                text, finish = data["message"].get("content"), data.get("done_reason")
                prompt, completion = _int(data.get("prompt_eval_count")), _int(data.get("eval_count"))
            else:
                choice = data["choices"][0]
                text, finish = choice["message"].get("content"), choice.get("finish_reason")
                usage = data.get("usage") or {}
                prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
            if text is None:  # a valid answer with no text, e.g. a reasoning model that spent max_tokens thinking
                text = ""
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Transient("malformed", f"unexpected answer shape from POST {path} ({type(e).__name__}: {e}): "
                             f"{json.dumps(data)[:200]}", status=status) from None
        # JSON can carry a lone surrogate ("\ud83d"), which no UTF-8 file can hold: U+FFFD in its place
        text = _LONE_SURROGATE.sub("\ufffd", text)
        return strip_think(text) or "", prompt, completion, finish if isinstance(finish, str) else None

    def _chat(self, messages: list[dict[str, Any]], cancel: threading.Event | None) -> Reply:
        path, body = self._request(messages)
        c = self.config
        start = time.monotonic()
        attempts = 0
        while True:
            self._check_go(cancel)
            attempts += 1
            with self._lock:
                self._stats["requests"] += 1
            try:
                text, prompt, completion, finish = self._attempt(path, body)
            except _Transient as e:
                self._record_failure(e.kind, e.message)
                self._check_gave_up()
                if attempts > c.retries:
                    self._record_call(unrecovered=True)
                    self._check_gave_up()
                    raise TeacherError(f"teacher request failed after {attempts} attempts: {e.message}",
                                       kind=e.kind, status=e.status, attempts=attempts) from None
                with self._lock:
                    self._stats["retries"] += 1
                self._sleep(self._backoff(attempts, e.retry_after), cancel)
                continue
            except TeacherError as e:
                self._record_failure(e.kind or "4xx", str(e))
                self._check_gave_up()
                self._record_call(unrecovered=True)
                self._check_gave_up()
                e.attempts = attempts
                raise
            with self._lock:
                self._stats["ok"] += 1
                self._stats["recovered"] += attempts > 1
                self._stats["prompt_tokens"] += prompt
                self._stats["completion_tokens"] += completion
            self._record_call(unrecovered=False)
            return Reply(text, prompt, completion, time.monotonic() - start, attempts, finish)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        c = self.config
        ceiling = min(c.max_backoff_s, c.backoff_s * 2 ** (retry - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, c.max_backoff_s))
        return delay

    def _sleep(self, seconds: float, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._halt.is_set() or (cancel is not None and cancel.is_set()):
                return
            self._halt.wait(min(left, 0.05))

    def _check_gave_up(self) -> None:
        g = self._gave_up
        if g is not None:
            raise TeacherGaveUp(str(g), g.report)  # a fresh instance: threads raise it concurrently

    def _check_go(self, cancel: threading.Event | None) -> None:
        self._check_gave_up()
        if self._closed:
            raise TeacherError("the teacher client is closed")
        if cancel is not None and cancel.is_set():
            raise _Cancelled()

    def _record_failure(self, kind: str, message: str) -> None:
        """One failed attempt (retried or not): counted by kind, never against the budget."""
        with self._lock:
            self._stats["failures"][kind] = self._stats["failures"].get(kind, 0) + 1
            self._stats["failed"] += 1
            self._last_error = f"{kind}: {message}"

    def _record_call(self, unrecovered: bool) -> None:
        """One finished call; an unrecovered one may exhaust the failure budget (module doc)."""
        c = self.config
        with self._lock:
            st = self._stats
            if len(self._window) == self._window.maxlen and self._window[0]:
                st["window_unrecovered"] -= 1
            self._window.append(unrecovered)
            st["window_unrecovered"] += unrecovered
            st["window_calls"] = len(self._window)
            if unrecovered:
                st["errors"] += 1
                st["unrecovered"] += 1
            if not unrecovered or st["window_unrecovered"] <= c.failure_budget or self._gave_up is not None:
                return
            st["gave_up"] = True
            failures = {k: v for k, v in st["failures"].items() if v}
            report = {"unrecovered": st["unrecovered"], "window_unrecovered": st["window_unrecovered"],
                      "window_calls": st["window_calls"], "failure_budget": c.failure_budget,
                      "failure_window": c.failure_window, "ok": st["ok"], "recovered": st["recovered"],
                      "attempts": st["requests"], "retries": st["retries"], "failed": st["failed"],
                      "failures": failures, "last_error": self._last_error}
            counts = ", ".join(f"{k} {v}" for k, v in failures.items())
            self._gave_up = TeacherGaveUp(
                f"teacher at {self.url} gave up: {report['window_unrecovered']} of the last {report['window_calls']} "
                f"calls failed unrecovered (retries exhausted or not retryable), over the failure budget of "
                f"{c.failure_budget} per {c.failure_window} calls; {report['ok']} calls answered "
                f"({report['recovered']} of them after retrying), {report['attempts']} attempts, failed attempts by "
                f"kind: {counts}; last error: {self._last_error}", report)
        self._halt.set()

    # ------------------------------------------------------------------ many calls

    def imap_unordered(self, jobs: Iterable[tuple[Hashable, list[dict[str, Any]]]]
                       ) -> Iterator[tuple[Hashable, Reply | TeacherError]]:
        """Run `(key, messages)` jobs, `workers` at a time; yield `(key, Reply | TeacherError)` as
        they complete. Reads `jobs` lazily (at most 2 x workers taken and not yet yielded).
        Raises TeacherGaveUp once the failure budget is spent (results already completed in
        the same round are yielded first). Closing the iterator early stops issuing requests.
        """
        self._check_gave_up()
        workers = self.config.workers
        limit = 2 * workers
        it = iter(jobs)
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher")
        pending: dict[Future, Hashable] = {}
        exhausted = finished = False
        try:
            while True:
                while not exhausted and len(pending) < limit and self._gave_up is None:
                    try:
                        key, messages = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[pool.submit(self._chat, messages, cancel)] = key
                if not pending:
                    self._check_gave_up()
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                gave_up: TeacherGaveUp | None = None
                for fut in done:
                    key = pending.pop(fut)
                    try:
                        result: Reply | TeacherError = fut.result()
                    except TeacherGaveUp as e:
                        gave_up = e
                        continue
                    except TeacherError as e:
                        result = e
                    yield key, result
                if gave_up is not None:
                    raise gave_up
            finished = True
        finally:
            cancel.set()
            # Normal end: nothing is running. Otherwise do not wait for requests in flight
            # (up to timeout_s): they stop before their next attempt and their results are dropped.
            pool.shutdown(wait=finished, cancel_futures=True)

    def run(self, jobs: Iterable[tuple[Hashable, list[dict[str, Any]]]],
            callback: Callable[[Hashable, Reply | TeacherError], None]) -> dict[str, Any]:
        """imap_unordered, handing each result to `callback`; the final stats."""
        for key, result in self.imap_unordered(jobs):
            callback(key, result)
        return self.stats


def _status_kind(status: int) -> str:
    return "429" if status == 429 else "5xx" if status >= 500 else "4xx"


def _same_ollama_model(wanted: str, listed: str) -> bool:
    """Ollama names without a tag mean ":latest"."""
    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    return norm(wanted) == norm(listed)
