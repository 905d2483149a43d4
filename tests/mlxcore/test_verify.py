"""Final-answer extraction: a reply must state its answer; restating the question is no answer.

Tricky cases for `verify.extract_answer` / `check` (the rule is in verify.py's module doc), and an
exhaustive pass over a prompt bank answered by the sloppy known teacher (tests/known_teacher.py):
every right answer in every accepted style is kept, every wrong one is rejected as wrong, and
every restated question is rejected as `no_answer`.
"""

from __future__ import annotations

import collections

import pytest

from mlxcore.distill import prompts as prompt_gen
from mlxcore.bench.answers import final_answer, final_number, strip_think
from mlxcore.distill.verify import NO_ANSWER, check, extract_answer
from tests.known_teacher import NUMBER_STYLES, WORD_STYLES, KnownTeacher, is_right, restates, spell, wrong_value

STATED = [
    # explicit markers
    ("Work.\nAnswer: 42", "42"),
    ("Work.\n#### 42", "42"),
    ("Work gives $\\boxed{42}$.", "42"),
    ("**Answer: 42**", "42"),
    ("**Answer:** 42 apples", "42"),
    ("Final answer: 42", "42"),
    ("Answer:\n\n42", "42"),
    # markdown bold and lone values
    ("Adding it all up:\n\n**42**", "42"),
    ("So she keeps **42 apples** in the end.", "42"),
    ("Six sevens.\n42", "42"),
    ("Change due:\n$1,234.00", "1234"),
    # answer / result phrases, concluding statements
    ("After simplifying, the answer is 42.", "42"),
    ("The answer is 42.\n\nHope this helps! Let me know if anything is unclear.", "42"),
    ("Therefore, the final answer is 42 km.", "42"),
    ("Combining the steps, the result is 42.", "42"),
    ("Each step checks out, so the total is 42.", "42"),
    ("The total is $1,234.00.", "1234"),
    ("First 3 apples, then 5 more, so 8 apples in total.", "8"),
    ("So the total is 42 apples, which is 6 more than yesterday.", "42"),
    ("So 3 + 4 is 7, and 7 × 6 is 42.", "42"),
    ("That's 42.", "42"),
    ("The lcm of 28 and 56 is 56.", "56"),  # the answer is a number from the question: fine when stated
    ("So she pays 12.50 dollars.", "12.5"),
    ("Thus it drops to −3 degrees.", "-3"),
    # "= N" concluding a computation
    ("17 + 25 = 42", "42"),
    ("Step 1: 92 - 74 = 18.\nStep 2: 18 - 8 = 10.\nStep 3: 10 + 35 = 45.", "45"),
    ("Therefore x = −3.", "-3"),
    ("k = 3 × 4 = 12", "12"),
    # numbers: unicode minus, fractions, commas, decimals, percent
    ("So the result is −12.", "-12"),
    ("So the answer is 3/4.", "0.75"),
    ("So the answer is $\\frac{3}{4}$.", "0.75"),
    ("So the answer is 1/3.", "1/3"),
    ("So the population is 21,140.", "21140"),
    ("The answer is 2,000,000.", "2000000"),
    ("So the percentage is 24.8%.", "24.8"),
    ("So the price is 12.50 dollars.", "12.5"),
    # think blocks: the answer follows the closing tag
    ("<think>Answer: 5</think>\nRechecking, the total is 6.", "6"),
    ("<think>\nsteps\n</think>\n\n**42**", "42"),
]

NOT_STATED = [
    # restated questions, with the right number among their numbers
    "To find 17 + 25 we add 17 and 25.",
    "It depends; compute lcm(28, 56) first, then …",
    "It depends on whether you count 56 or 28; the lcm of 28 and 56 is 56.",
    "So we need lcm(28, 56).",
    "So we take the lcm of 28 and 56.",
    "So the question is whether lcm(28, 56) is 56.",
    "What is the least common multiple of 28 and 56?",
    "The numbers to look at are 28, 56, 56.",
    "We need to use 28 and 56 and 56.",
    "To find this we take 28, 56, 56",
    "Let me restate it. Find the LCM of 9 and 99. The numbers to look at are 9, 99, 99.",
    # replies ending mid-computation
    "First, 28 + 14 = 42, and then",
    "I need to compute 17 + 25 =",
    "The total so far is 42, then we subtract the discount of",
    "We start with 42 apples and …",
    "The result is 42 but wait, let me recompute...",
    # a bare last number is no statement
    "It drops by 7 degrees, to -3",
    "she pays 12.50 dollars",
    "So we add 17 to 25.",
    "The difference is 6 times as large.",
    "I'm not sure how to solve this.",
    "",
    # think blocks
    "<think>So the total is 42.",
    "<think>Answer: 42</think>\nHmm, I would need to recheck 42 and",
    # a marker that states no number
    "I tried 5 and 6.\nAnswer: it cannot be computed",
]


@pytest.mark.parametrize("text,want", STATED, ids=[str(i) for i in range(len(STATED))])
def test_a_stated_final_answer_is_found(text, want):
    assert extract_answer(text, "arithmetic") == want
    assert final_number(text) == want


@pytest.mark.parametrize("text", NOT_STATED, ids=[str(i) for i in range(len(NOT_STATED))])
def test_a_reply_that_states_no_answer_has_none(text):
    assert extract_answer(text, "gcd_lcm") is None


@pytest.mark.parametrize("text", ["Answer: -7 or -6", "Answer: either -7 or 100", "Answer: -7, -6, -5, 0, 1, 2",
                                  "Answer: -7 if we round, otherwise 4", "The answer is -7 or maybe -6."])
def test_a_hedged_number_states_no_answer(text):
    """Several different numbers offered as the answer are no answer: a teacher hedging "-7 or -6"
    was kept as verified right when the truth was -7 (the first number won)."""
    assert extract_answer(text, "arithmetic") is None
    assert final_number(text) is None


@pytest.mark.parametrize("text,want", [("Answer: 42 (6 times 7)", "42"), ("Answer: $1,200.", "1200"),
                                       ("Answer: x = -3", "-3"), ("Answer: 3 + 4 = 7", "7")])
def test_one_number_with_its_working_is_still_the_answer(text, want):
    assert extract_answer(text, "arithmetic") == want


@pytest.mark.parametrize("text,want", [("Answer: yes or no", None), ("Answer: No. Yes.", None), ("Answer: Yes.", "yes"),
                                       ("Answer: No, not at all", "no")])
def test_a_yes_no_answer_that_says_both_states_neither(text, want):
    assert final_answer(text, "choice", ["yes", "no", "cannot tell"]) == want


def test_a_final_statement_copied_from_the_prompt_is_no_answer():
    q = "Find k if 5k - 66 = -31."
    assert extract_answer(q, "linear") == "-31"  # without the prompt it reads as "k ... = -31"
    assert extract_answer(q, "linear", prompt=q + "\n\nThink it through.") is None
    assert extract_answer("Find k if 5k - 66 = -31.\nSo k = 7.", "linear", prompt=q) == "7"
    assert extract_answer("56", "gcd_lcm", prompt="What is the lcm of 28 and 56?") == "56"  # a lone value stands


def _prompt(kind, truth, text="Compute it.", **meta):
    category = next(c for c, kinds in prompt_gen.KINDS.items() if kind in kinds)
    return prompt_gen.Prompt(id=f"t-{kind}", category=category, kind=kind,
                             messages=[{"role": "user", "content": text}], truth=truth, meta=meta)


def test_check_counts_no_answer_apart_from_wrong_answers():
    lcm = _prompt("gcd_lcm", "56", "What is the least common multiple of 28 and 56?")
    assert check(lcm, "It depends; compute lcm(28, 56) first, then …").reason == NO_ANSWER
    assert check(lcm, "The question asks for the lcm of 28 and 56, which involves 28 and 56.").reason == NO_ANSWER
    assert check(lcm, "What is the least common multiple of 28 and 56?").reason == NO_ANSWER
    ok = check(lcm, "Multiples of 56 are multiples of 28, so the lcm is 56.")
    assert ok.ok and ok.reason == "correct" and ok.extracted == "56"
    wrong = check(lcm, "Multiply them, so the lcm is 1,568.")
    assert not wrong.ok and wrong.reason == "wrong answer: got '1568', expected '56'"
    syl = _prompt("syllogism", "yes")
    assert check(syl, "It depends on the premises; yes and no are both possible.").reason == NO_ANSWER
    assert check(syl, "Reasoning.\n**Answer: Yes**").reason == "correct"


def _styles_test_prompts():
    return [p for p in prompt_gen.prompts(prompt_gen.PromptConfig(seed=3), 0, 400) if p.truth is not None]


@pytest.mark.parametrize("style", range(len(NUMBER_STYLES)))
def test_every_number_style_is_accepted_when_right_and_rejected_as_wrong_otherwise(style):
    seen = collections.Counter()
    for p in _styles_test_prompts():
        if prompt_gen.ANSWER_TYPES[p.kind] != "number":
            continue
        right, wrong = (strip_think(NUMBER_STYLES[style](spell(v, style))) for v in (p.truth, wrong_value(p)))
        assert check(p, right).reason == "correct", (p.kind, p.truth, right)
        assert check(p, wrong).reason.startswith("wrong answer"), (p.kind, p.truth, wrong)
        seen["neg" if p.truth.startswith("-") else "big" if abs(float(p.truth)) >= 1000 else
             "dec" if "." in p.truth else "int"] += 1
    assert len(seen) == 4, seen  # negatives (unicode minus), thousands commas, decimals (fractions), integers


@pytest.mark.parametrize("style", range(len(WORD_STYLES)))
def test_every_word_style_is_accepted_when_right_and_rejected_as_wrong_otherwise(style):
    for p in _styles_test_prompts():
        if prompt_gen.ANSWER_TYPES[p.kind] == "number":
            continue
        right, wrong = (strip_think(WORD_STYLES[style](v)) for v in (p.truth, wrong_value(p)))
        assert check(p, right).reason == "correct", (p.kind, right)
        assert check(p, wrong).reason.startswith("wrong answer"), (p.kind, wrong)


def test_a_restating_teacher_is_never_verified_and_nothing_right_is_lost():
    teacher = KnownTeacher(prompt_gen.PromptConfig(seed=5), n=1500, restate=0.25, styled=True)
    got = collections.Counter()
    for p in teacher.bank.values():
        if p.truth is None:
            continue
        want = NO_ANSWER if restates(p, 0.25) else "correct" if is_right(p) else "wrong answer"
        reason = check(p, strip_think(teacher.reply(p))).reason.split(":")[0]
        assert reason == want, (p.kind, p.truth, teacher.reply(p))
        got[reason] += 1
    assert min(got.values()) > 100, got  # each outcome well represented
