"""The fault-injecting proxy (tests/fault_proxy.py) in front of the Ollama stand-in: every fault
reaches httpx as the failure it is meant to be, and the teacher client's retries get through."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from mlxcore.clients.chat import Reply, Teacher, TeacherConfig
from tests.fault_proxy import KINDS, FaultProxy
from tests.ollama_standin import OllamaStandin, closed_url

MODEL = "qwen3:0.6b"
TIMEOUT_S = 5.0         # for requests that must get through, even on a loaded machine
CLIENT_TIMEOUT_S = 0.5  # for requests meant to meet a "timeout" fault (it costs the test this long)
HOLD_S = 2.0            # a "timeout" fault outlasts the client's timeout, and close() cuts it anyway


def chat_body(text: str = "hi") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": False}


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def make_teacher(proxy: FaultProxy, **kw) -> Teacher:
    base = dict(url=proxy.url, api="ollama", model=MODEL, workers=1, timeout_s=TIMEOUT_S, retries=3,
                backoff_s=0.01, max_backoff_s=0.05)
    return Teacher(TeacherConfig(**{**base, **kw}))


def wait_until(cond: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll until `cond()` holds; the timeout only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


@pytest.fixture
def standin():
    with OllamaStandin() as s:
        yield s


@pytest.fixture
def proxy(standin):
    with FaultProxy(standin.url, seed=0, hold_s=HOLD_S) as p:
        yield p


@pytest.fixture
def client(proxy):
    with httpx.Client(base_url=proxy.url, timeout=TIMEOUT_S) as c:
        yield c


# ------------------------------------------------------------------------------ forwarding


def test_forwards_requests_and_answers_over_one_keep_alive_connection(standin, proxy, client):
    assert proxy.url.startswith("http://127.0.0.1:") and proxy.url != standin.url
    tags = client.get("/api/tags")
    assert tags.status_code == 200 and tags.headers["content-type"].startswith("application/json")
    assert [m["name"] for m in tags.json()["models"]] == [MODEL]

    r = client.post("/api/chat?trace=1", json=chat_body("hello there"), headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.json()["message"]["content"] == "echo: hello there"
    r = client.post("/v1/chat/completions", json=chat_body("again"))
    assert r.json()["choices"][0]["message"]["content"] == "echo: again"
    missing = client.get("/nope")  # the upstream's errors are relayed as they are
    assert (missing.status_code, missing.text, missing.headers["content-type"]) == (404, "404 page not found",
                                                                                     "text/plain")
    unknown = client.post("/api/chat", json={**chat_body(), "model": "nope:1b"})
    assert unknown.status_code == 404 and unknown.json() == {"error": "model 'nope:1b' not found"}

    seen = standin.requests()
    assert [(r.method, r.path) for r in seen] == [("GET", "/api/tags"), ("POST", "/api/chat"),
                                                  ("POST", "/v1/chat/completions"), ("GET", "/nope"),
                                                  ("POST", "/api/chat")]
    assert seen[1].body == chat_body("hello there") and seen[1].headers["authorization"] == "Bearer k"
    assert (proxy.requests, proxy.forwarded, sum(proxy.injected.values())) == (5, 5, 0)
    assert proxy.connections == 1  # keep-alive: all five on one connection
    assert [(p.path, p.fault, p.status) for p in proxy.log][:2] == [("/api/tags", None, 200), ("/api/chat", None, 200)]


def test_an_unreachable_upstream_answers_502():
    with FaultProxy(closed_url()) as p, httpx.Client(base_url=p.url, timeout=TIMEOUT_S) as c:
        r = c.post("/api/chat", json=chat_body())
        assert r.status_code == 502 and "unreachable" in r.json()["error"]
        assert (p.requests, p.forwarded, p.upstream_errors) == (1, 0, 1)


def test_unknown_fault_kinds_are_refused(proxy):
    with pytest.raises(ValueError):
        proxy.fail_next(1, "explode")
    with pytest.raises(ValueError):
        proxy.random_faults(0.5, ("500", "nope"))
    with pytest.raises(ValueError):
        proxy.random_faults(1.5, ("500",))


# ------------------------------------------------------------------------------ each fault, seen by httpx


def expect_status(status: int, retry_after: str | None = None):
    def check(r: httpx.Response) -> None:
        assert r.status_code == status and r.headers.get("retry-after") == retry_after
        assert r.json()["error"] == f"fault proxy: injected HTTP {status}"
    return check


def expect_not_json(r: httpx.Response) -> None:
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json") and r.content
    with pytest.raises(ValueError):
        json.loads(r.content)


# kind -> (what the client sees: a check of the response or the exception, upstream calls)
HTTPX_CASES = {
    "500": (expect_status(500), 0),
    "429": (expect_status(429, "0"), 0),
    "timeout": (httpx.ReadTimeout, 0),
    "malformed": (expect_not_json, 1),
    "drop": (httpx.RemoteProtocolError, 0),
    "incomplete": (httpx.RemoteProtocolError, 1),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_reaches_httpx_as_its_failure_and_the_next_request_works(standin, proxy, client, kind):
    assert client.get("/api/tags").status_code == 200  # an open keep-alive connection meets the fault
    standin.reset()
    expected, upstream_calls = HTTPX_CASES[kind]
    proxy.fail_next(1, kind)
    if isinstance(expected, type):
        with pytest.raises(expected):
            client.post("/api/chat", json=chat_body(), timeout=CLIENT_TIMEOUT_S)
    else:
        expected(client.post("/api/chat", json=chat_body()))
    # "timeout": the client's own timeout fired (ReadTimeout) while the proxy still held the
    # connection: had the proxy let go first, httpx would have raised RemoteProtocolError
    assert proxy.injected == {kind: 1}
    assert len(standin.requests("/api/chat")) == upstream_calls

    r = client.post("/api/chat", json=chat_body("after"))
    assert r.status_code == 200 and r.json()["message"]["content"] == "echo: after"
    assert proxy.injected == {kind: 1} and proxy.requests == 3 and proxy.forwarded == 2
    assert [p.fault for p in proxy.log] == [None, kind, None]


def test_status_faults_on_openai_paths_use_the_openai_error_shape(proxy, client):
    proxy.fail_next(1, 503)
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503 and r.headers["retry-after"] == "0"
    assert r.json()["error"]["message"] == "fault proxy: injected HTTP 503"


# ------------------------------------------------------------------------------ each fault, seen by the teacher


TEACHER_KINDS = {"500": "5xx", "429": "429", "timeout": "timeout", "malformed": "malformed",
                 "drop": "connection", "incomplete": "connection"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_teacher_classifies_each_fault_and_its_retries_recover(proxy, kind):
    proxy.fail_next(2, kind)
    with make_teacher(proxy, retries=2, timeout_s=CLIENT_TIMEOUT_S if kind == "timeout" else TIMEOUT_S) as t:
        reply = t.chat(messages("capital of France?"))
        stats = t.stats
    assert reply.text == "echo: capital of France?" and reply.attempts == 3
    assert stats["failures"] == {**dict.fromkeys(stats["failures"], 0), TEACHER_KINDS[kind]: 2}
    assert (stats["requests"], stats["ok"], stats["retries"], stats["errors"]) == (3, 1, 2, 0)
    assert proxy.injected == {kind: 2} and proxy.forwarded == 1


def test_the_teacher_gives_the_call_up_when_faults_outlast_its_retries(proxy):
    proxy.fail_next(3, "drop")
    with make_teacher(proxy, retries=1) as t:
        with pytest.raises(Exception) as err:
            t.chat(messages("q"))
        assert err.value.kind == "connection" and err.value.attempts == 2
        assert t.chat(messages("q")).attempts == 2  # the third drop, then an answer
    assert proxy.injected == {"drop": 3}


# ------------------------------------------------------------------------------ random faults


def test_random_faults_spare_health_paths_and_queued_faults_do_not(proxy, client):
    proxy.random_faults(1.0, ("500",))
    for _ in range(5):
        assert client.get("/api/tags").status_code == 200
        assert client.get("/v1/models").status_code == 200
    assert client.post("/api/chat", json=chat_body()).status_code == 500
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 500
    proxy.fail_next(1, "429")
    assert client.get("/api/tags").status_code == 429
    proxy.fail_next(1, "500", path="/api/chat")  # a path filter skips other requests
    assert client.get("/api/tags").status_code == 200
    proxy.random_faults(0)
    assert client.post("/api/chat", json=chat_body()).status_code == 500  # the queued one
    assert client.post("/api/chat", json=chat_body()).status_code == 200
    assert proxy.injected == {"500": 3, "429": 1} and proxy.pending_faults() == 0


def test_random_faults_follow_the_seed(standin):
    def faults(seed: int) -> list[str | None]:
        with FaultProxy(standin.url, seed=seed) as p, httpx.Client(base_url=p.url, timeout=TIMEOUT_S) as c:
            p.random_faults(0.5, ("500", "429", "503"))
            for _ in range(30):
                c.post("/api/chat", json=chat_body())
            return [e.fault for e in p.log]

    first = faults(7)
    assert first == faults(7) and first != faults(8)
    assert 5 < sum(f is not None for f in first) < 25 and set(first) - {None} == {"500", "429", "503"}


def test_random_faults_at_30_percent_the_teacher_still_gets_every_reply(standin, proxy):
    proxy.random_faults(0.3, KINDS)
    jobs = [(k, messages(f"question {k}")) for k in range(40)]
    # timeout_s: a "timeout" fault costs its worker this long; normal answers must come within it
    with make_teacher(proxy, workers=4, retries=8, failure_budget=200, timeout_s=1.0) as t:
        assert t.health()["models"] == [MODEL]  # health probes are never faulted at random
        results = dict(t.imap_unordered(jobs))
        stats = t.stats
    assert sorted(results) == list(range(40))
    for k, reply in results.items():
        assert isinstance(reply, Reply) and reply.text == f"echo: question {k}"

    injected, total = proxy.injected, sum(proxy.injected.values())
    chat_requests = proxy.requests - 1  # less the health probe
    assert 0.15 <= total / chat_requests <= 0.45, (total, chat_requests)
    assert set(injected) <= set(KINDS) and len(injected) >= 3
    assert proxy.forwarded == 41 and stats["ok"] == 40
    assert stats["requests"] == chat_requests and stats["failed"] == stats["retries"] == total
    assert stats["failures"] == {
        "timeout": injected["timeout"], "5xx": injected["500"], "429": injected["429"],
        "connection": injected["drop"] + injected["incomplete"], "malformed": injected["malformed"], "4xx": 0}
    # the upstream saw each forwarded request, and each malformed / incomplete one
    assert len(standin.requests("/api/chat")) == 40 + injected["malformed"] + injected["incomplete"]


# ------------------------------------------------------------------------------ restart and close


def test_restart_refuses_connections_then_serves_on_the_same_port(proxy, client):
    url = proxy.url
    assert client.get("/api/tags").status_code == 200
    back = proxy.restart_async(down_s=0.4)
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as fresh:
        with pytest.raises(httpx.ConnectError):
            fresh.get("/api/tags")
    with pytest.raises(httpx.TransportError):  # the kept-alive connection was cut as well
        client.post("/api/chat", json=chat_body())
    back.join(timeout=5)
    assert not back.is_alive() and proxy.url == url and proxy.restarts == 1
    assert client.post("/api/chat", json=chat_body("back")).json()["message"]["content"] == "echo: back"
    proxy.restart(down_s=0.05)  # the blocking form
    assert client.get("/api/tags").status_code == 200 and proxy.restarts == 2


def test_restart_cuts_a_held_connection(standin):
    with FaultProxy(standin.url, hold_s=30) as p:
        p.fail_next(1, "timeout")
        outcome: list = []

        def call() -> None:
            try:
                httpx.post(p.url + "/api/chat", json=chat_body(), timeout=10)
            except httpx.HTTPError as e:
                outcome.append(e)

        th = threading.Thread(target=call)
        th.start()
        wait_until(lambda: p.injected["timeout"] == 1)
        p.restart(down_s=0.05)
        th.join()  # at most the client's 10 s timeout
        [error] = outcome
        # cut by the restart: a hold (30 s) that ran its course would have met the client's own
        # 10 s timeout first (ReadTimeout); no clock needed to tell them apart
        assert isinstance(error, httpx.RemoteProtocolError) and p.restarts == 1


def test_the_teacher_rides_out_a_restart(proxy):
    with make_teacher(proxy, retries=30) as t:
        assert t.chat(messages("before")).attempts == 1
        back = proxy.restart_async(down_s=0.3)
        reply = t.chat(messages("during"))
        back.join()
        stats = t.stats
    assert reply.text == "echo: during" and reply.attempts > 1 and proxy.restarts == 1
    assert stats["failures"]["connection"] == reply.attempts - 1 == stats["failed"]
    assert sum(proxy.injected.values()) == 0


def test_close_does_not_wait_for_held_connections(standin):
    p = FaultProxy(standin.url, hold_s=30).start()
    url = p.url
    p.fail_next(3, "timeout")
    errors: list = []

    def call() -> None:
        try:
            httpx.post(url + "/api/chat", json=chat_body(), timeout=10)
        except httpx.HTTPError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for th in threads:
        th.start()
    wait_until(lambda: p.injected["timeout"] == 3)
    p.close()
    for th in threads:
        th.join()  # at most the clients' 10 s timeout
    # close() cut the held connections: had it waited for the 30 s holds, every client would have
    # met its own 10 s timeout first (ReadTimeout), so the error kind shows it, without a clock
    assert len(errors) == 3 and all(isinstance(e, httpx.RemoteProtocolError) for e in errors)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/tags", timeout=TIMEOUT_S)
