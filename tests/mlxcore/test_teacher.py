"""The distillation teacher client against a loopback Ollama stand-in (no real server needed)."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from mlxcore.clients.chat import Reply, Teacher, TeacherConfig, TeacherError, TeacherGaveUp, strip_think
from tests.fault_proxy import FaultProxy
from tests.ollama_standin import OllamaStandin, closed_url, count_tokens

FAST = dict(backoff_s=0.01, max_backoff_s=0.05, timeout_s=5)
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def server():
    with OllamaStandin() as s:
        yield s


def teacher(server_or_url, **kw) -> Teacher:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    return Teacher(url=url, **{**FAST, **kw})


def prompt_words(messages) -> int:
    return sum(count_tokens(m["content"]) for m in messages)


# ------------------------------------------------------------------------------ one request


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_chat_returns_the_answer_and_token_counts(server, api):
    server.answer = lambda messages: f"Paris, said the teacher to: {messages[-1]['content']}"
    with teacher(server, api=api) as t:
        reply = t.chat(MESSAGES)
        stats = t.stats
    assert isinstance(reply, Reply)
    assert reply.text == "Paris, said the teacher to: What is the capital of France?"
    assert reply.prompt_tokens == prompt_words(MESSAGES) == 9
    assert reply.completion_tokens == count_tokens(reply.text) == 11
    assert reply.attempts == 1 and reply.finish_reason == "stop" and reply.seconds > 0
    assert stats["requests"] == stats["ok"] == 1 and stats["retries"] == stats["failed"] == 0
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (9, 11)


def test_ollama_request_body_is_the_native_contract(server):
    with teacher(server, temperature=0.3, top_p=0.8, max_tokens=64) as t:
        t.chat(MESSAGES)
    [req] = server.log
    assert (req.method, req.path) == ("POST", "/api/chat")
    assert req.body == {"model": "qwen3:0.6b", "messages": MESSAGES, "stream": False, "think": False,
                        "options": {"temperature": 0.3, "top_p": 0.8, "num_predict": 64}}
    assert "authorization" not in req.headers


def test_openai_request_body_and_bearer_key(server, monkeypatch):
    # An OpenAI-style base URL ending in /v1 is accepted as well; the key comes from a named variable.
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    with teacher(server.url + "/v1/", api="openai", api_key_env="TEACHER_TEST_KEY", temperature=0.0, top_p=1.0,
                 max_tokens=32) as t:
        t.chat(MESSAGES)
    [req] = server.log
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.body == {"model": "qwen3:0.6b", "messages": MESSAGES, "temperature": 0.0, "top_p": 1.0,
                        "max_tokens": 32, "stream": False}
    assert req.headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_leading_think_block_is_stripped(server, api):
    server.answer = lambda m: "<think>\nThe user wants a capital. Paris.\n</think>\n\nParis."
    with teacher(server, api=api) as t:
        assert t.chat(MESSAGES).text == "Paris."


def test_strip_think_edge_cases():
    assert strip_think("  <think>a</think>b <think>c</think> d") == "d"  # what follows the last block
    assert strip_think("<think>a</think>\nAnswer: 4") == "Answer: 4"
    assert strip_think("<think>cut off by max_tokens") is None
    assert strip_think("<think>a</think> then <think>cut off") is None
    assert strip_think("plain") == "plain"


def test_max_tokens_cut_reports_length(server):
    server.answer = lambda m: "one two three four five six"
    with teacher(server, max_tokens=3) as t:
        reply = t.chat(MESSAGES)
    assert (reply.text, reply.completion_tokens, reply.finish_reason) == ("one two three", 3, "length")


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="num_predict"):
        TeacherConfig(num_predict=10)
    with pytest.raises(ValidationError):
        TeacherConfig(api="anthropic")
    with pytest.raises(ValidationError):
        TeacherConfig(workers=0)


class RawServer:
    """A loopback HTTP/1.1 server that answers every request with `respond(conn)`: the bytes a
    misbehaving server sends (keep-alive whitespace, a trickle, a body in a given shape)."""

    def __init__(self, respond):
        import socket

        self.respond, self.sock = respond, socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            try:
                self.respond(conn)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def json_answer(body: bytes):
    return lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("kind", ["keep-alive whitespace", "trickle"])
def test_an_attempt_ends_after_timeout_s_however_the_server_drips_its_answer(kind):
    """httpx's timeout bounds each read only: a server that sends keep-alive whitespace (as some
    OpenAI-compatible gateways do while generating) or one byte at a time would hold an attempt
    for ever. The attempt as a whole ends after timeout_s (plus one read) and is retried."""
    def drip(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(200):
            conn.sendall(b" " if kind == "keep-alive whitespace" else b"{")
            time.sleep(0.1)

    server = RawServer(drip)
    try:
        with teacher(server.url, api="openai", timeout_s=1.0, retries=1) as t:
            start = time.monotonic()
            with pytest.raises(TeacherError, match="no answer within 1s") as err:
                t.chat(MESSAGES)
            took = time.monotonic() - start
            stats = t.stats
    finally:
        server.close()
    assert err.value.kind == "timeout" and err.value.attempts == 2 and server.requests == 2
    assert stats["failures"]["timeout"] == 2 and stats["failed"] == 2
    assert took < 2 * (1.0 + 0.3) + 0.5, took  # two attempts of about timeout_s each (20 s of dripping unbounded)


def test_an_answer_over_the_size_cap_is_cut_off_and_retried(server, monkeypatch):
    import mlxcore.clients.chat as chat

    monkeypatch.setattr(chat, "_MAX_BODY", 4096)
    server.answer = lambda m: "word " * 2000  # 10 kB of content: a server that never stops
    with teacher(server, retries=1, max_tokens=100000) as t:
        with pytest.raises(TeacherError, match="passed 0 MiB; cut off") as err:
            t.chat(MESSAGES)
    assert err.value.kind == "malformed" and err.value.attempts == 2


@pytest.mark.parametrize("api, body", [
    ("openai", b'{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "length"}]}'),
    ("ollama", b'{"message": {"role": "assistant", "content": null}, "done": true, "done_reason": "length"}')])
def test_null_content_is_an_empty_reply_not_a_fault(api, body):
    """vLLM's reasoning parser answers `content: null` when thinking used up max_tokens: a valid,
    empty answer (the caller rejects it once), not a malformed one retried `retries` times."""
    server = RawServer(json_answer(body))
    try:
        with teacher(server.url, api=api, retries=3) as t:
            reply = t.chat(MESSAGES)
    finally:
        server.close()
    assert (reply.text, reply.finish_reason, reply.attempts, server.requests) == ("", "length", 1, 1)


def test_a_lone_surrogate_in_the_answer_becomes_a_replacement_character():
    """JSON may escape half a surrogate pair ("\ud83d"); such a string cannot be written as UTF-8,
    which crashed the row store on every re-run. It arrives as U+FFFD; a whole escaped pair stays
    the character it encodes."""
    import json

    body = b'{"message": {"role": "assistant", "content": "Paris \\ud83d. Lyon \\ud83d\\ude00"}, "done": true}'
    server = RawServer(json_answer(body))
    try:
        with teacher(server.url) as t:
            text = t.chat(MESSAGES).text
    finally:
        server.close()
    assert text == "Paris \ufffd. Lyon \U0001f600"
    text.encode("utf-8")
    json.dumps(text, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("fault, kind", [("500", "5xx"), ("503", "5xx"), ("429", "429"), ("timeout", "timeout"),
                                         ("malformed", "malformed"), ("incomplete", "malformed"),
                                         ("drop", "connection")])
def test_each_transient_fault_is_retried_until_it_succeeds(server, fault, kind):
    server.timeout_sleep_s = 1.0
    server.fail_next(2, fault)
    with teacher(server, retries=2, timeout_s=0.3) as t:
        reply = t.chat(MESSAGES)
        stats = t.stats
    assert reply.text == "echo: What is the capital of France?" and reply.attempts == 3
    assert [r.fault for r in server.log] == [fault, fault, None]
    assert stats["failures"][kind] == 2 and stats["failed"] == 2
    assert stats["retries"] == 2 and stats["requests"] == 3 and stats["ok"] == 1 and stats["errors"] == 0


def test_openai_malformed_answer_is_retried(server):
    server.fail_next(1, "malformed")
    with teacher(server, api="openai") as t:
        assert t.chat(MESSAGES).attempts == 2


def test_a_restarting_server_is_retried(server):
    url = server.url
    server.restart(down_s=0.3)
    with teacher(server, retries=8, backoff_s=0.05, max_backoff_s=0.2) as t:
        reply = t.chat(MESSAGES)
        stats = t.stats
    assert server.url == url and reply.text.startswith("echo:")
    assert reply.attempts >= 2 and stats["failures"]["connection"] == reply.attempts - 1
    assert len(server.log) == 1  # refused connections never reached the server


def test_retry_after_is_honoured(server):
    server.fail_next(1, "429", retry_after=0.3)
    with teacher(server, backoff_s=0.0, max_backoff_s=1) as t:
        slept, sleep = [], t._sleep
        t._sleep = lambda seconds, cancel: (slept.append(seconds), sleep(seconds, cancel))[1]
        reply = t.chat(MESSAGES)
    # the wait before the retry is the server's Retry-After (the backoff alone would be 0 s)
    assert slept == [0.3] and reply.attempts == 2


def test_retry_after_as_an_http_date_is_honoured_too():
    """RFC 9110 allows Retry-After as an HTTP date; it was ignored (the backoff alone applied)."""
    import email.utils

    def busy_then_ok(conn, state={"n": 0}):
        state["n"] += 1
        if state["n"] == 1:
            when = email.utils.formatdate(time.time() + 3, usegmt=True)
            conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: " + when.encode()
                         + b"\r\nContent-Length: 0\r\n\r\n")
        else:
            json_answer(b'{"message": {"role": "assistant", "content": "ok"}, "done": true}')(conn)

    server = RawServer(busy_then_ok)
    try:
        with teacher(server.url, backoff_s=0.0, max_backoff_s=10) as t:
            slept, sleep = [], t._sleep
            t._sleep = lambda seconds, cancel: (slept.append(seconds), sleep(seconds, cancel))[1]
            assert t.chat(MESSAGES).text == "ok"
    finally:
        server.close()
    assert len(slept) == 1 and 1.5 < slept[0] <= 3.0  # whole seconds: the date is rounded down to one


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_an_unknown_model_is_not_retried_and_the_error_names_it(server, api):
    with teacher(server, api=api, model="nope:1b", retries=4) as t:
        with pytest.raises(TeacherError) as info:
            t.chat(MESSAGES)
        stats = t.stats
    err = info.value
    assert err.status == 404 and err.kind == "4xx" and err.attempts == 1
    assert "nope:1b" in str(err) and "404" in str(err) and "ollama pull nope:1b" in str(err)
    assert len(server.log) == 1
    assert stats["retries"] == 0 and stats["errors"] == 1 and stats["failures"]["4xx"] == 1


def test_connection_refused_after_retries_says_to_start_ollama():
    url = closed_url()
    with teacher(url, retries=1) as t:
        with pytest.raises(TeacherError, match="ollama serve") as info:
            t.chat(MESSAGES)
    assert info.value.kind == "connection" and info.value.attempts == 2 and url in str(info.value)


# ------------------------------------------------------------------------------ many requests


def jobs(n: int, taken: list[int] | None = None):
    for i in range(n):
        if taken is not None:
            taken[0] += 1
        yield i, [{"role": "user", "content": f"question {i}"}]


def test_a_job_that_exhausts_its_retries_yields_its_error_and_the_others_succeed(server):
    server.fail_next(3, "500")
    with teacher(server, workers=1, retries=2) as t:  # one worker: job 0 meets all three faults
        results = dict(t.imap_unordered(jobs(5)))
        stats = t.stats
    err = results.pop(0)
    assert isinstance(err, TeacherError) and err.kind == "5xx" and err.status == 500 and err.attempts == 3
    assert "500" in str(err) and "llama runner" in str(err)
    assert {k: r.text for k, r in results.items()} == {i: f"echo: question {i}" for i in range(1, 5)}
    assert stats["ok"] == 4 and stats["errors"] == 1 and stats["failures"]["5xx"] == 3


def test_a_dead_teacher_spends_the_budget_in_unrecovered_calls_and_gives_up_with_a_report(server):
    server.fail_next(2, "429")
    server.fail_next(1000, "500")
    taken = [0]
    yielded = []
    with teacher(server, workers=2, retries=2, failure_budget=5) as t:
        with pytest.raises(TeacherGaveUp) as info:
            for key, result in t.imap_unordered(jobs(100, taken)):
                yielded.append((key, result))
        report = info.value.report
        requests_at_give_up = len(server.log)
        # Sticky: the next call raises at once, without a request.
        with pytest.raises(TeacherGaveUp):
            t.chat(MESSAGES)
        with pytest.raises(TeacherGaveUp):
            list(t.imap_unordered(jobs(3)))
        assert t.stats["gave_up"] is True
    # 6 calls (budget + 1) each lost all 3 attempts; the other worker's call stops before its next attempt
    assert report["unrecovered"] == report["window_unrecovered"] == report["window_calls"] == 6
    assert report["failure_budget"] == 5 and report["failure_window"] == 200
    assert report["ok"] == report["recovered"] == 0
    # 18 attempts, plus the other worker's call's: up to 3 sent (counted when an attempt starts; its
    # third may have failed, unrecorded as a lost call, just before the sixth loss gave up)
    assert 18 <= report["attempts"] <= 18 + 3  # every attempt failed; one may still have been in flight
    assert report["attempts"] - 1 <= report["failed"] <= report["attempts"]
    assert report["failures"] == {"429": 2, "5xx": report["failed"] - 2}
    assert "5xx: HTTP 500" in report["last_error"]
    msg = str(info.value)
    assert "6 of the last 6 calls failed unrecovered" in msg and "failure budget of 5 per 200 calls" in msg
    assert "429 2" in msg and "HTTP 500" in msg
    time.sleep(0.2)
    settled = len(server.log)
    # at most the other worker's call's attempts, up to 3 as `attempts` above allows (seen under load:
    # its third was in flight when the sixth loss gave up)
    assert requests_at_give_up <= settled <= 18 + 3 and settled <= report["attempts"] + 1
    time.sleep(0.2)
    assert len(server.log) == settled  # nothing issued after giving up
    assert taken[0] <= 2 * 2 + len(yielded) + 1
    assert len(yielded) == 5 and all(isinstance(r, TeacherError) and r.attempts == 3 for _, r in yielded)


def test_an_unreachable_teacher_gives_up_with_the_fix_in_the_report():
    url = closed_url()
    with teacher(url, workers=2, retries=1, failure_budget=3) as t:
        with pytest.raises(TeacherGaveUp) as info:
            list(t.imap_unordered(jobs(50)))
    report = info.value.report
    assert report["unrecovered"] == 4 and report["ok"] == 0 and report["failures"] == {"connection": report["failed"]}
    assert "ollama serve" in report["last_error"] and "failure budget of 3" in str(info.value)


def test_a_non_retryable_error_counts_once_per_call(server):
    with teacher(server, model="nope:1b", workers=1, retries=4, failure_budget=2) as t:
        with pytest.raises(TeacherGaveUp) as info:
            list(t.imap_unordered(jobs(10)))
    assert info.value.report["unrecovered"] == 3 and len(server.log) == 3  # one attempt per call, never retried
    assert "nope:1b" in info.value.report["last_error"]


def test_retried_faults_never_spend_the_budget_however_many(server):
    """A fifth of the attempts fail (500, 429, dropped, malformed, cut-off answers) through a
    fault proxy, far more failed attempts in all than the default budget of 50, every one
    recovered by a retry: the run ends with every answer, and its stats say what was counted."""
    with FaultProxy(server.url, seed=11) as proxy, teacher(proxy.url, workers=1) as t:
        proxy.random_faults(0.2, ("500", "429", "drop", "malformed", "incomplete"))
        assert t.config.failure_budget == 50  # the default
        results = dict(t.imap_unordered(jobs(300)))
        stats = t.stats
    assert {k: r.text for k, r in results.items()} == {i: f"echo: question {i}" for i in range(300)}
    assert stats["failed"] == sum(proxy.injected.values()) > 50  # a budget of failed attempts would have stopped it
    assert stats["retries"] == stats["failed"] and 50 < stats["recovered"] <= stats["failed"] and stats["ok"] == 300
    assert stats["unrecovered"] == stats["errors"] == stats["window_unrecovered"] == 0 and not stats["gave_up"]
    assert (stats["failure_budget"], stats["failure_window"], stats["window_calls"]) == (50, 200, 200)


def test_the_budget_looks_at_recent_calls_only(server):
    """Lost calls spread thinly over a long run never add up to a give-up; a burst of them does."""
    with teacher(server, workers=1, retries=0, failure_budget=2, failure_window=10) as t:
        for i in range(60):  # 6 lost calls in all, 3 x the budget, but never more than 1 in 10 calls
            if i % 10 == 0:
                server.fail_next(1, "500")
            try:
                t.chat(MESSAGES)
            except TeacherGaveUp:  # pragma: no cover - the failure this test guards against
                raise
            except TeacherError as e:
                assert i % 10 == 0 and e.kind == "5xx"
        assert t.stats["unrecovered"] == 6 and t.stats["window_unrecovered"] == 1 and not t.stats["gave_up"]
        server.fail_next(3, "500")
        for _ in range(2):
            with pytest.raises(TeacherError) as lost:
                t.chat(MESSAGES)
            assert not isinstance(lost.value, TeacherGaveUp)
        with pytest.raises(TeacherGaveUp) as info:  # the 3rd lost call of the last 10 (1 + 2 + this one > 2)
            t.chat(MESSAGES)
    assert info.value.report["window_unrecovered"] == 3 and info.value.report["unrecovered"] == 9


def test_workers_run_concurrently_and_never_more_than_workers_at_once(server):
    # Each request is held at the stand-in until 4 are in flight at once: 16 jobs pass only if
    # the client keeps 4 requests going together (counted at the server, no clock involved).
    together = threading.Barrier(4, timeout=60)
    server.answer = lambda messages: (together.wait(), "echo")[1]
    with teacher(server, workers=4) as t:
        results = dict(t.imap_unordered(jobs(16)))
    assert sorted(results) == list(range(16)) and all(isinstance(r, Reply) for r in results.values())
    assert not together.broken and server.max_in_flight == 4


def test_the_job_iterator_is_read_lazily_and_closing_stops_requests(server):
    server.delay_s = 0.05
    taken = [0]
    seen = 0
    with teacher(server, workers=2) as t:
        it = t.imap_unordered(jobs(1000, taken))
        for _key, result in it:
            assert isinstance(result, Reply)
            assert taken[0] - seen <= 2 * 2  # read-ahead bound: 2 x workers
            seen += 1
            if seen == 6:
                break
        it.close()
        after_close = len(server.log)
        time.sleep(0.2)
        assert len(server.log) <= after_close + 2  # only what was already in flight
    assert taken[0] <= 6 + 4


def test_run_hands_every_result_to_the_callback(server):
    got = {}
    with teacher(server, workers=3) as t:
        stats = t.run(jobs(7), lambda key, result: got.__setitem__(key, result.text))
    assert got == {i: f"echo: question {i}" for i in range(7)}
    assert stats["ok"] == 7 and stats["requests"] == 7


def test_chat_is_safe_from_many_threads(server):
    with teacher(server, workers=4) as t:
        out = [None] * 12

        def call(i):
            out[i] = t.chat([{"role": "user", "content": f"q{i}"}]).text

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert t.stats["ok"] == 12
    assert out == [f"echo: q{i}" for i in range(12)]


# ------------------------------------------------------------------------------ health


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_health_ok(server, api):
    with teacher(server, api=api) as t:
        info = t.health()
        assert t.stats["requests"] == 0  # probes are not counted
    assert info["model"] == "qwen3:0.6b" and info["models"] == ["qwen3:0.6b"]
    assert [r.path for r in server.log] == (["/api/tags"] if api == "ollama" else ["/v1/models"])


def test_health_on_a_closed_port_says_to_start_ollama():
    url = closed_url()
    with teacher(url) as t:
        with pytest.raises(TeacherError) as info:
            t.health()
    assert f"is `ollama serve` running at {url}?" in str(info.value) and info.value.kind == "connection"


def test_health_names_a_missing_model_and_the_available_ones(server):
    with teacher(server, model="llama3.2:1b") as t:
        with pytest.raises(TeacherError) as info:
            t.health()
    msg = str(info.value)
    assert "'llama3.2:1b'" in msg and "qwen3:0.6b" in msg and "ollama pull llama3.2:1b" in msg


def test_health_treats_an_untagged_name_as_latest():
    with OllamaStandin(models=("qwen3:latest", "gemma3:1b")) as s, teacher(s, model="qwen3") as t:
        assert t.health()["models"] == ["qwen3:latest", "gemma3:1b"]


def test_openai_health_without_v1_models_falls_back_to_a_tiny_chat(server):
    server.serve_v1_models = False
    with teacher(server, api="openai") as t:
        t.health()
    assert [(r.method, r.path) for r in server.log] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    assert server.log[1].body["max_tokens"] == 1


def test_openai_health_names_a_model_the_server_does_not_serve(server):
    with teacher(server, api="openai", model="gpt-x") as t:
        with pytest.raises(TeacherError) as info:
            t.health()
    assert "'gpt-x'" in str(info.value) and "qwen3:0.6b" in str(info.value) and info.value.status == 404
