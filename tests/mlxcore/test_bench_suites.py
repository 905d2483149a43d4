"""mlxcore.bench: deterministic suite generation, reply scoring and the random baseline."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from mlxcore.bench.scoring import Score, normalise, score
from mlxcore.bench.suites import (CATEGORIES, KNOWLEDGE, SUITES, Example, baseline, example,
                                  make)


def _first(suite: str, category: str, seed: int = 0) -> Example:
    return next(ex for i in range(500) if (ex := example(suite, seed, i)).category == category)


def _within_binomial(hits: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(hits / n - p) <= sds * math.sqrt(p * (1 - p) / n)


# --- generation ---------------------------------------------------------------------------------

def test_suites_and_categories_are_declared_for_each_other():
    assert SUITES == ("math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy")
    assert set(CATEGORIES) == set(SUITES)


@pytest.mark.parametrize("suite", SUITES)
def test_example_is_a_pure_function_of_suite_seed_index(suite):
    a, b = example(suite, 3, 17), example(suite, 3, 17)
    assert a == b and a.id == f"{suite}-3-17" and a.suite == suite
    assert make([suite], 5) == make([suite], 50)[:5]
    assert make([suite], 4, seed=1) == [example(suite, 1, i) for i in range(4)]
    assert make([suite], 20, seed=0) != make([suite], 20, seed=1)
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()
    assert Example.from_dict(a.to_dict()) == a


def test_examples_are_identical_in_a_fresh_process():
    code = ("import json; from mlxcore.bench.suites import SUITES, make; "
            "print(json.dumps([e.to_dict() for e in make(SUITES, 6, seed=7)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [e.to_dict() for e in make(SUITES, 6, seed=7)]


def test_make_keeps_suite_order_and_rejects_unknown_suites():
    exs = make(["copy", "sort"], 3)
    assert [e.suite for e in exs] == ["copy"] * 3 + ["sort"] * 3
    assert [e.id for e in exs[:3]] == ["copy-0-0", "copy-0-1", "copy-0-2"]
    with pytest.raises(ValueError, match=r"'nope'.*math_mcq.*copy"):
        make(["qa", "nope"], 2)
    with pytest.raises(ValueError, match="nope"):
        example("nope", 0, 0)


@pytest.mark.parametrize("suite", SUITES)
def test_every_category_appears_within_200_examples(suite):
    seen = {e.category for e in make([suite], 200)}
    assert seen == set(CATEGORIES[suite])


@pytest.mark.parametrize("suite", SUITES)
def test_every_gold_answer_scores_correct(suite):
    for ex in make([suite], 300, seed=11):
        s = score(ex, ex.answer)
        assert s.valid and s.correct, (ex, s)


def test_math_mcq_has_four_distinct_options_with_the_true_value():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a // b}
    for ex in make(["math_mcq"], 300):
        a, op, b = re.match(r"What is (\d+) ([-+*/]) (\d+)\?", ex.prompt).groups()
        value = ops[op](int(a), int(b))
        if op == "/":
            assert int(a) % int(b) == 0
        assert len(ex.options) == 4 and len(set(ex.options)) == 4
        assert ex.options["ABCD".index(ex.answer)] == str(value)
        assert ex.prompt.endswith("Answer with the letter only.")
        assert f"{ex.answer}) {value}\n" in ex.prompt


def test_knowledge_bank_is_large_and_unique():
    assert len(KNOWLEDGE) >= 40
    questions = [q for _, q, _ in KNOWLEDGE]
    assert len(set(questions)) == len(questions)
    assert {c for c, _, _ in KNOWLEDGE} == set(CATEGORIES["knowledge"])
    assert ("geography", "What is the capital of France?", "Paris") in KNOWLEDGE


def test_training_templates_are_exact():
    for ex in make(["sort"], 50):
        m = re.fullmatch(r"Sort these numbers in ascending order: ((?:\d+ ){7}\d+)", ex.prompt)
        nums = [int(t) for t in m.group(1).split()]
        assert all(0 <= v <= 9 for v in nums)
        assert ex.answer == " ".join(map(str, sorted(nums)))
    for ex in make(["copy"], 50):
        s = ex.answer
        assert ex.prompt == f"Copy this string exactly:\n{s}"
        assert re.fullmatch(r"[a-z]{4,10}", s) and (len(s) <= 7) == (ex.category == "short")


def test_json_and_logic_golds_are_computed_right():
    for ex in make(["json"], 50):
        a, b = map(int, re.match(r"Let a = (-?\d+) and b = (-?\d+)\.", ex.prompt).groups())
        assert json.loads(ex.answer) == {"sum": a + b, "diff": a - b, "prod": a * b}
    for ex in make(["logic"], 100):
        body = ex.prompt.split("\n")[0]
        if ex.category == "boolean":
            expr = body.removeprefix("Evaluate this boolean expression: ")
            py = expr.replace("true", "True").replace("false", "False")
            assert ex.answer == str(eval(py)).lower()  # only True/False/and/or/not/parens
        else:
            taller = {}
            for hi, rel, lo in re.findall(r"(\w+) is (taller|shorter) than (\w+)\.", body):
                hi, lo = (hi, lo) if rel == "taller" else (lo, hi)
                taller[hi] = lo
            people = set(taller) | set(taller.values())
            tallest, shortest = people - set(taller.values()), people - set(taller)
            want = tallest if "tallest" in ex.prompt else shortest
            assert {ex.answer} == want and 3 <= len(people) <= 5


# --- scoring ------------------------------------------------------------------------------------

CHOICE = Example(id="t-0-0", suite="math_mcq", category="add", kind="choice", answer="B",
                 prompt="What is 37 + 45?\nA) 83\nB) 82\nC) 28\nD) 92\n"
                        "Answer with the letter only.",
                 options=("83", "82", "28", "92"), candidates=tuple("ABCD"))


@pytest.mark.parametrize("reply", ["B", "b", "(B)", "B)", "B.", "Answer: B", "The answer is B",
                                   "**B**", "The correct answer is (B).", "82", "B) 82",
                                   "I think it's B.", "  B\n"])
def test_choice_right_answers(reply):
    assert score(CHOICE, reply) == Score(correct=True, valid=True, parsed="B")


@pytest.mark.parametrize("reply,letter", [("A", "A"), ("(C)", "C"), ("92", "D"), ("D) 92", "D")])
def test_choice_wrong_answers_are_valid(reply, letter):
    assert score(CHOICE, reply) == Score(correct=False, valid=True, parsed=letter)


@pytest.mark.parametrize("reply", ["E", "A or B", "", "   ", "82 or 83", "B) 83", "no idea",
                                   "<think>it is B"])
def test_choice_malformed_replies_are_invalid(reply):
    assert score(CHOICE, reply) == Score(correct=False, valid=False, parsed=None)


SORT = example("sort", 0, 0)
GOLD_INTS = SORT.answer.split()


def test_ints_scoring():
    assert score(SORT, ", ".join(GOLD_INTS)).correct
    assert score(SORT, f"Sorted: [{','.join(GOLD_INTS)}]").correct
    assert score(SORT, f"{SORT.prompt}\n{SORT.answer}").correct  # last N integers
    wrong = score(SORT, " ".join(reversed(GOLD_INTS)))
    assert wrong.valid and not wrong.correct
    negative = score(SORT, " ".join(["-1", *GOLD_INTS[1:]]))
    assert negative.valid and not negative.correct and negative.parsed.startswith("-1 ")
    assert score(SORT, " ".join(GOLD_INTS[:7])) == Score(False, False, None)
    assert not score(SORT, "no numbers").valid


def test_a_reply_that_only_restates_the_prompt_is_invalid():
    already_sorted = next(ex for i in range(20000) if (ex := example("sort", 0, i)).prompt.endswith(ex.answer))
    for ex in (SORT, already_sorted, CHOICE, JSON, EXACT):
        for reply in (ex.prompt, f"  {ex.prompt}\n", f"<think>hmm</think>{ex.prompt}", f"**{ex.prompt}**"):
            assert score(ex, reply) == Score(False, False, None), (ex.id, reply)
    # the prompt's own numbers are never the answer, even when they are already in order
    assert score(already_sorted, f"{already_sorted.prompt}\nSorted: {already_sorted.answer}").correct
    assert score(already_sorted, already_sorted.answer).correct
    assert score(SORT, f"You asked: {SORT.prompt}\nLet me think.") == Score(False, False, None)


JSON = Example(id="t-0-1", suite="json", category="json", kind="json", prompt="",
               answer=json.dumps({"sum": 12, "diff": -2, "prod": 35}))


@pytest.mark.parametrize("reply", ['{"sum": 12, "diff": -2, "prod": 35}',
                                   '```json\n{"prod": 35, "sum": 12, "diff": -2}\n```',
                                   'Sure! {"sum": 12.0, "diff": -2, "prod": 35.0} Hope it helps.',
                                   '{oops} then {"sum": 12, "diff": -2, "prod": 35}'])
def test_json_right_answers(reply):
    assert score(JSON, reply).correct


@pytest.mark.parametrize("reply", ['{"sum": "12", "diff": -2, "prod": 35}',
                                   '{"sum": 12, "diff": 2, "prod": 35}',
                                   '{"sum": 12, "diff": -2}',
                                   '{"sum": 12, "diff": -2, "prod": 35, "x": 1}',
                                   '{"sum": true, "diff": -2, "prod": 35}'])
def test_json_wrong_answers_are_valid(reply):
    s = score(JSON, reply)
    assert s.valid and not s.correct and json.loads(s.parsed)


@pytest.mark.parametrize("reply", ["{sum: 1}", "not json", "", "[12, -2, 35]", '{"sum": 12'])
def test_json_malformed_replies_are_invalid(reply):
    assert score(JSON, reply) == Score(False, False, None)


EXACT = Example(id="t-0-2", suite="knowledge", category="geography", kind="exact",
                prompt="What is the capital of France?", answer="Paris")


@pytest.mark.parametrize("reply", ["Paris", "paris", " Paris. ", "**Paris**", '"Paris"', "`Paris`",
                                   "Answer: Paris", "The answer is Paris.", "**Answer:** Paris"])
def test_exact_right_answers(reply):
    assert score(EXACT, reply) == Score(True, True, "paris")


def test_exact_wrong_and_malformed():
    assert score(EXACT, "Lyon") == Score(False, True, "lyon")
    assert score(EXACT, "Paris, France") == Score(False, True, "paris, france")
    for reply in ["", "   ", "**", '""', "."]:
        assert score(EXACT, reply) == Score(False, False, None)
    assert normalise("  The   answer is:  'New  York'. ") == "new york"


def test_think_blocks_are_dropped_before_scoring():
    assert score(EXACT, "<think>Maybe Lyon? No.</think>\nParis") == Score(True, True, "paris")
    assert score(EXACT, "<think>Paris</think>Lyon").parsed == "lyon"
    assert score(CHOICE, "<think>A or C... 37+45=82</think>B").correct
    assert score(JSON, '<think>{"sum": 1}</think>{"sum": 12, "diff": -2, "prod": 35}').correct
    assert score(SORT, f"<think>{SORT.prompt}</think>{SORT.answer}").correct
    for ex in (EXACT, CHOICE, JSON, SORT):  # reasoning cut off: no answer
        assert score(ex, f"<think>{ex.answer}") == Score(False, False, None)


# --- baseline -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suite", SUITES)
def test_baseline_replies_are_always_valid(suite):
    rng = random.Random(0)
    for ex in make([suite], 300, seed=5):
        assert score(ex, baseline(ex, rng)).valid, ex


def _baseline_accuracy(exs: list[Example]) -> tuple[int, int]:
    rng = random.Random(1234)
    return sum(score(ex, baseline(ex, rng)).correct for ex in exs), len(exs)


def test_baseline_accuracy_is_chance_level():
    hits, n = _baseline_accuracy(make(["math_mcq"], 2000))
    assert _within_binomial(hits, n, 0.25), hits / n
    boolean = [e for e in make(["logic"], 6000) if e.category == "boolean"][:2000]
    assert len(boolean) == 2000
    hits, n = _baseline_accuracy(boolean)
    assert _within_binomial(hits, n, 0.5), hits / n
    for suite in ("sort", "copy"):
        hits, n = _baseline_accuracy(make([suite], 2000))
        assert hits / n < 0.01, (suite, hits)


def test_baseline_guesses_from_the_examples_answer_space():
    rng = random.Random(7)
    letters = Counter(baseline(ex, rng) for ex in make(["math_mcq"], 2000))
    assert set(letters) == set("ABCD")
    assert all(_within_binomial(k, 2000, 0.25) for k in letters.values())
    for ex in make(["qa", "logic", "knowledge"], 100):
        guesses = Counter(baseline(ex, rng) for _ in range(50))
        assert set(guesses) <= set(ex.candidates) and ex.answer in ex.candidates
    for ex in make(["sort"], 20):
        assert sorted(map(int, baseline(ex, rng).split())) == list(map(int, ex.answer.split()))
    for ex in make(["copy"], 20):
        assert re.fullmatch(f"[a-z]{{{len(ex.answer)}}}", baseline(ex, rng))
    for ex in make(["json"], 20):
        assert set(json.loads(baseline(ex, rng))) == {"sum", "diff", "prod"}
