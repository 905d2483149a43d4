"""The LLM judge against the loopback Ollama stand-in: prompts, score parsing, re-asking malformed
replies, transport faults the client retries, lost calls and a spent failure budget (None scores,
never an exception), both wire APIs, and the judge as a Scorer term."""

from __future__ import annotations

import re
import threading

import time

import pytest

from mlxcore.config import JUDGE_TEMPLATE, JudgeConfig, RewardSpec, TeacherConfig
from mlxcore.rl.judge import Judge, check_template, parse_score
from mlxcore.rl.rewards import Sample, Scorer
from tests.ollama_standin import OllamaStandin

FAST = dict(backoff_s=0.01, max_backoff_s=0.05, timeout_s=5, temperature=0.0, max_tokens=16)


def config(server, api: str = "ollama", **kw) -> JudgeConfig:
    judge = {k: kw.pop(k) for k in ("attempts", "max_score", "template") if k in kw}
    return JudgeConfig(teacher=TeacherConfig(url=server.url, api=api, **{**FAST, **kw}), **judge)


def completion_of(messages) -> str:
    """The completion the judge prompt (the default template) shows."""
    text = messages[-1]["content"]
    return re.search(r"\nAnswer:\n(.*)\n\nReply with the score only", text, re.S).group(1)


class Grader:
    """The stand-in's judge model: a completion "good N" scores N (in several reply styles),
    "vague" never gives a number, "flaky" only on its second ask, "huge" an out-of-range 15."""

    def __init__(self):
        self.asked: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, messages) -> str:
        c = completion_of(messages)
        with self.lock:
            self.asked[c] = self.asked.get(c, 0) + 1
            n = self.asked[c]
        if c.startswith("good "):
            v = c.split()[1]
            return {0: v, 1: f"Score: {v}/10", 2: f"**{v}**"}[len(c) % 3]
        if c == "vague":
            return "I think it's good"
        if c == "flaky":
            return "Hmm, hard to say." if n == 1 else "6"
        if c == "huge":
            return "15"
        return "0"


@pytest.fixture
def server():
    with OllamaStandin() as s:
        s.answer = Grader()
        yield s


def sample(completion: str, i: int = 0, answer: str | None = "42", prompt: str = "What is 6 x 7?") -> Sample:
    ref = {"answer": answer} if answer is not None else {}
    return Sample(id=f"q{i}/0", where=f"train.jsonl:{i + 1}", prompt=prompt,
                  messages=[{"role": "user", "content": prompt}], completion=completion, reference=ref,
                  completion_tokens=len(completion.split()), truncated=False, max_tokens=64)


GOOD = [sample(f"good {v}" + " pad" * i, i) for i, v in enumerate(["7", "3.5", "10", "0", "8", "2"])]
WANT = [0.7, 0.35, 1.0, 0.0, 0.8, 0.2]


def test_parse_score():
    for text, want in [("7", 7.0), ("Score: 7/10", 7.0), ("**8**", 8.0), ("7.5", 7.5), ("  10.\n", 10.0),
                       ("Rating: 0", 0.0), ("qwen3 says 4", 4.0), (".5", 0.5)]:
        assert parse_score(text, 10) == want, text
    for text in ["I think it's good", "", "11", "-1", "Score: -3", "10.5"]:
        assert parse_score(text, 10) is None, text
    assert parse_score("0.8", 1) == 0.8 and parse_score("5", 5) == 5.0


def test_template_placeholders_are_checked():
    check_template(JUDGE_TEMPLATE)
    check_template("{prompt} {completion:.10} {max_score:.1f} {{literal}}")
    with pytest.raises(ValueError, match=r"unknown placeholder \{answer\}"):
        check_template("{prompt} {answer}")
    with pytest.raises(ValueError, match="literal braces"):
        check_template("{prompt} {")


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_scores_of_every_sample_and_the_request(server, api):
    with Judge(config(server, api)) as judge:
        got = judge.score(GOOD)
        stats = judge.stats
    assert got == pytest.approx(WANT)
    assert stats | {"teacher": None} == {"asked": 6, "scored": 6, "malformed": 0, "reasks": 0, "failed": 0,
                                         "retries": 0, "gave_up": False, "last_error": None, "teacher": None}
    path = "/api/chat" if api == "ollama" else "/v1/chat/completions"
    assert {r.path for r in server.requests() if r.method == "POST"} == {path}
    body = next(b for b in server.chat_bodies() if b["messages"][0]["content"].endswith("good 7\n\n"
                                                                                         "Reply with the score only, as a number."))
    assert body["messages"] == [{"role": "user", "content": (
        "Rate the assistant's answer to the user's request on a scale of 0 to 10, where 10 is a fully correct, "
        "helpful answer.\n\nRequest:\nWhat is 6 x 7?\n\nReference answer: 42\n\nAnswer:\ngood 7\n\n"
        "Reply with the score only, as a number.")}]
    if api == "ollama":
        assert body["options"] == {"temperature": 0.0, "top_p": 0.9, "num_predict": 16}
    else:
        assert body["temperature"] == 0.0 and body["max_tokens"] == 16


def test_no_reference_custom_template_and_max_score(server):
    server.answer = lambda m: "4" if "R:-" in m[-1]["content"] else "nope"
    judge = Judge(config(server, template="Q:{prompt} R:-{reference}- A:{completion} /{max_score}", max_score=5))
    assert judge.score([sample("x", answer=None), sample("y", 1, answer="")]) == [0.8, 0.8]
    assert sorted(b["messages"][0]["content"] for b in server.chat_bodies()) == \
        ["Q:What is 6 x 7? R:-- A:x /5", "Q:What is 6 x 7? R:-- A:y /5"]


def test_identical_judge_prompts_are_asked_once(server):
    judge = Judge(config(server))
    got = judge.score([sample("good 9"), sample("good 9"), sample("good 9", 1), sample("good 1")])
    assert got == [0.9, 0.9, 0.9, 0.1]
    assert judge.stats["asked"] == 2 and judge.stats["scored"] == 4


@pytest.mark.parametrize("fault", ["500", "503", "timeout", "malformed", "incomplete", "drop"])
def test_transport_faults_are_retried_by_the_client(server, fault):
    server.timeout_sleep_s = 0.6
    server.fail_next(2, fault)
    judge = Judge(config(server, timeout_s=0.25, workers=2))
    assert judge.score(GOOD) == pytest.approx(WANT)
    stats = judge.stats
    assert stats["retries"] == 2 and stats["failed"] == 0 and stats["malformed"] == 0 and not stats["gave_up"]
    assert server.pending_faults() == 0


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_replies_without_a_score_are_asked_again_then_none(server, api):
    judge = Judge(config(server, api, attempts=3))
    samples = [sample("vague", 0), sample("good 5", 1), sample("flaky", 2), sample("huge", 3)]
    assert judge.score(samples) == [None, 0.5, 0.6, None]
    grader = server.answer
    assert grader.asked == {"vague": 3, "good 5": 1, "flaky": 2, "huge": 3}
    stats = judge.stats
    assert (stats["asked"], stats["malformed"], stats["reasks"], stats["scored"], stats["failed"]) == (9, 7, 5, 2, 2)
    assert stats["last_error"].startswith("malformed: no score in 0..10")


def test_an_unrecovered_call_leaves_only_its_sample_unscored(server):
    server.fail_next(1, "500")
    judge = Judge(config(server, retries=0, failure_budget=5, workers=1))
    got = judge.score(GOOD)
    assert got[0] is None and got[1:] == pytest.approx(WANT[1:])
    assert judge.stats["failed"] == 1 and not judge.stats["gave_up"] and "HTTP 500" in judge.stats["last_error"]


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_spent_failure_budget_leaves_the_rest_unscored_without_raising(server, api):
    server.fail_next(1000, "500")
    judge = Judge(config(server, api, retries=1, failure_budget=0, workers=2))
    samples = [sample(f"good {i}", i) for i in range(10)]
    assert judge.score(samples) == [None] * 10
    stats = judge.stats
    assert stats["gave_up"] and stats["failed"] == 10 and stats["scored"] == 0
    assert "gave up" in stats["last_error"] and stats["asked"] < 10
    # a request the other worker already had in flight may still land (a give-up does not wait for it)
    sent, deadline = -1, time.monotonic() + 10
    while sent != len(server.requests()) or server.in_flight:
        sent = len(server.requests())
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # the give-up is sticky: later calls get None at once, without asking the dead judge
    assert judge.score(samples[:3]) == [None] * 3 and len(server.requests()) == sent
    assert judge.stats["failed"] == 13


def test_a_closed_port_gives_up_too(server):
    from tests.ollama_standin import closed_url

    judge = JudgeConfig(teacher=TeacherConfig(url=closed_url(), **{**FAST, "retries": 0, "failure_budget": 1}))
    with Judge(judge) as j:
        assert j.score([sample(f"good {i}", i) for i in range(5)]) == [None] * 5
        assert j.stats["gave_up"]


def test_the_scorer_weights_the_judge_and_marks_failures(server):
    specs = [RewardSpec(name="numeric_match"), RewardSpec(name="judge", weight=0.5)]
    samples = [sample("good 8\n#### 42", 0), sample("vague", 1), sample("good 4\n#### 41", 2)]
    with Scorer(specs, judge=config(server)) as scorer:
        got = scorer.score(samples)
        stats = scorer.judge_stats
    assert got[0] == {"reward": pytest.approx(1.4), "rewards": {"numeric_match": 1.0, "judge": 0.8},
                      "correct": 1.0, "judge_failed": False}
    assert got[1] == {"reward": None, "rewards": {"numeric_match": 0.0, "judge": None}, "correct": 0.0,
                      "judge_failed": True}
    assert got[2]["reward"] == pytest.approx(0.2) and not got[2]["judge_failed"]
    assert stats["failed"] == 1 and stats["malformed"] == 2
    with pytest.raises(Exception, match="closed"):
        scorer.judge.teacher.chat([{"role": "user", "content": "x"}])
