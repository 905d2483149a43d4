"""The data side of distillation: seeded prompts with checkable truths, answer extraction and
acceptance checks, and the crash-safe JSONL row store."""

from __future__ import annotations

import ast
import collections
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from pydantic import ValidationError

import mlxcore.data.rows as rows_mod
from mlxcore.distill.prompts import CATEGORIES, KINDS, PromptConfig, prompt, prompts
from mlxcore.bench.answers import strip_think
from mlxcore.distill.verify import CategoryPolicy, VerifyPolicy, check, extract_answer
from mlxcore.data.rows import RowStore, RowStoreLocked, iter_rows, make_row, prompt_hash, read_new

REPO = Path(__file__).resolve().parents[2]
EVERY = PromptConfig(weights={c: 1.0 for c in CATEGORIES}, seed=3)


# ----------------------------------------------------------------------------------- prompts

def test_same_seed_and_index_give_the_same_prompt_regardless_of_global_state():
    cfg = PromptConfig(seed=7)
    idx = [0, 1, 17, 999, 123_456]
    random.seed(1)
    a = [prompt(cfg, i) for i in idx]
    random.seed(2)
    random.random()
    b = [prompt(PromptConfig(seed=7), i) for i in reversed(idx)][::-1]
    assert a == b
    assert list(prompts(cfg, 15, 5)) == [prompt(cfg, i) for i in range(15, 20)]
    assert a[0].id != a[1].id and str(cfg.seed) in a[0].id


def test_prompts_are_identical_in_a_fresh_interpreter_with_another_hash_seed():
    code = ("import json; from mlxcore.distill.prompts import PromptConfig, prompts\n"
            "print(json.dumps([p.to_dict() for p in prompts(PromptConfig(seed=5), 0, 150)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    here = [p.to_dict() for p in prompts(PromptConfig(seed=5), 0, 150)]
    assert json.loads(out.stdout) == json.loads(json.dumps(here))


def test_different_seeds_give_different_prompts():
    a = [p.text for p in prompts(PromptConfig(seed=0), 0, 200)]
    b = [p.text for p in prompts(PromptConfig(seed=1), 0, 200)]
    assert sum(x != y for x, y in zip(a, b)) >= 195


def test_category_frequencies_follow_the_weights():
    cfg = PromptConfig()
    counts = collections.Counter(p.category for p in prompts(cfg, 0, 2000))
    total = sum(cfg.weights.values())
    for c in CATEGORIES:
        assert abs(counts[c] / 2000 - cfg.weights[c] / total) < 0.035, (c, counts)
    skewed = PromptConfig(weights={"math": 3, "knowledge": 1}, seed=11)
    counts = collections.Counter(p.category for p in prompts(skewed, 0, 2000))
    assert set(counts) == {"math", "knowledge"} and abs(counts["math"] / 2000 - 0.75) < 0.035


def test_config_rejects_bad_weights_and_unknown_keys():
    for bad in ({"poetry": 1.0}, {"math": -1.0}, {"math": 0.0}):
        with pytest.raises(ValidationError):
            PromptConfig(weights=bad)
    with pytest.raises(ValidationError):
        PromptConfig(sed=1)


def test_prompts_are_varied_and_well_formed():
    ps = list(prompts(EVERY, 0, 2000))
    assert len({p.text for p in ps}) >= 1990
    assert len({p.id for p in ps}) == 2000
    for p in ps:
        assert p.messages == [{"role": "user", "content": p.text}]
        assert p.kind in KINDS[p.category]
        if p.category == "knowledge":
            assert p.truth is None and "Answer:" not in p.text
        else:
            assert p.truth and "`Answer: " in p.text.split("\n\n")[-1]


# Independent recomputation of every kind's truth, mostly by parsing the prompt text.

def _eval_expr(node):
    if isinstance(node, ast.Expression):
        return _eval_expr(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_expr(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _eval_expr(node.left), _eval_expr(node.right)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
        return ops[type(node.op)]()
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def _question(p) -> str:
    return p.text.split("\n\n")[0]


def _truth_arithmetic(p):
    shown = p.meta["shown"]
    assert shown in p.text
    value = _eval_expr(ast.parse(shown.replace("×", "*").replace("÷", "/"), mode="eval"))
    assert value.denominator == 1 and "(" in shown
    return value


def _truth_gcd_lcm(p):
    q = _question(p)
    nums = [int(n) for n in re.findall(r"\d+", q)]
    assert len(nums) in (2, 3)
    is_gcd = bool(re.search(r"greatest|GCD|gcd|divides", q))
    assert is_gcd != bool(re.search(r"least|LCM|lcm|multiple", q))
    return Fraction(math.gcd(*nums) if is_gcd else math.lcm(*nums))


def _truth_linear(p):
    q = _question(p)
    m = re.search(r"(-?\d*)([a-z]) ([+-]) (\d+) = (-?\d+)", q)
    if m:
        a = {"": 1, "-": -1}.get(m.group(1)) or int(m.group(1))
        b = int(m.group(4)) * (1 if m.group(3) == "+" else -1)
        c = int(m.group(5))
    else:
        m = re.search(r"by (\d+)\D+?(add|subtract) (\d+)\D+?(-?\d+)", q)
        a, c = int(m.group(1)), int(m.group(4))
        b = int(m.group(3)) * (1 if m.group(2) == "add" else -1)
    x = Fraction(c - b, a)
    assert x.denominator == 1
    return x


def _truth_percent(p):
    q, m = _question(p), p.meta
    num = lambda pat: int(re.search(pat, q).group(1))  # noqa: E731
    if m["sub"] == "of":
        return Fraction(num(r"(\d+)(?:%| percent)") * num(r"of (\d+)"), 100)
    if m["sub"] == "discount":
        return num(r"\$(\d+)") * (1 - Fraction(num(r"(\d+)%"), 100))
    if m["sub"] == "increase":
        return num(r"(?:had|has) (\d+)") * (1 + Fraction(num(r"(\d+)%"), 100))
    if m["sub"] == "what_percent":
        a, b = (int(x) for x in re.findall(r"\d+", q)[:2])
        part, total = (a, b) if "out of" in q else (b, a)
        return Fraction(100 * part, total)
    assert m["sub"] == "original"
    return num(r"\$(\d+)") / (1 - Fraction(num(r"(\d+)%"), 100))


def _plural_of(word, terms):
    hits = [t for t in terms if word in (t, t + "s", t + "es")]
    assert len(hits) == 1, (word, terms)
    return terms.index(hits[0])


_SYL_STATEMENTS = [
    (r"All (\w+) are (\w+)\.", "all"), (r"Every (\w+) is a (\w+)\.", "all"),
    (r"No (\w+) are (\w+)\.", "no"), (r"No (\w+) is a (\w+)\.", "no"),
    (r"Some (\w+) are not (\w+)\.", "some_not"), (r"Some (\w+) are (\w+)\.", "some"),
    (r"At least one (\w+) is not a (\w+)\.", "some_not"), (r"At least one (\w+) is a (\w+)\.", "some"),
]
_SYL_QUESTIONS = [
    (r"Are all (\w+) (\w+)\?", "all"), (r"Is every (\w+) a (\w+)\?", "all"),
    (r"Is it true that no (\w+) are (\w+)\?", "no"), (r"Is it the case that no (\w+) is a (\w+)\?", "no"),
    (r"Are some (\w+) not (\w+)\?", "some_not"), (r"Are some (\w+) (\w+)\?", "some"),
    (r"Is at least one (\w+) a (\w+)\?", "some"), (r"Is there at least one (\w+) that is not a (\w+)\?", "some_not"),
]


def _holds(quant, x, y, inhabited):
    """inhabited: the non-empty Venn cells, each a tuple of memberships (in0, in1, in2)."""
    both = any(c[x] and c[y] for c in inhabited)
    x_not_y = any(c[x] and not c[y] for c in inhabited)
    return {"all": not x_not_y, "no": not both, "some": both, "some_not": x_not_y}[quant]


def _parse_syl(line, table, terms):
    for pat, quant in table:
        m = re.fullmatch(pat, line.strip())
        if m:
            return quant, _plural_of(m.group(1), terms), _plural_of(m.group(2), terms)
    raise AssertionError(f"unparsed: {line!r}")


def _truth_syllogism(p):
    terms = p.meta["terms"]
    lines = _question(p).split("\n")
    premises = [_parse_syl(re.sub(r"^\d+\. ", "", ln), _SYL_STATEMENTS, terms) for ln in lines[1:3]]
    qtext = re.search(r"statements: (.*\?)", lines[3]).group(1)
    question = _parse_syl(qtext, _SYL_QUESTIONS, terms)
    cells = [c for c in itertools.product((False, True), repeat=3) if any(c)]
    verdicts = set()
    for bits in itertools.product((False, True), repeat=len(cells)):
        inhabited = [c for c, b in zip(cells, bits) if b]
        if not all(any(c[s] for c in inhabited) for s in range(3)):
            continue  # every group is non-empty
        if all(_holds(q, x, y, inhabited) for q, x, y in premises):
            verdicts.add(_holds(*question, inhabited))
    assert verdicts, "contradictory premises"
    return "cannot tell" if len(verdicts) == 2 else ("yes" if verdicts == {True} else "no")


_SUPERLATIVES = {"tallest": "taller", "shortest": "shorter", "oldest": "older", "youngest": "younger",
                 "fastest": "faster", "slowest": "slower", "heaviest": "heavier", "lightest": "lighter",
                 "richest": "richer", "poorest": "poorer", "strongest": "stronger", "weakest": "weaker"}


def _truth_ordering(p):
    q = _question(p)
    names = set(p.meta["names"])
    above = collections.defaultdict(set)  # person -> people with more of the attribute
    for a, word, b in re.findall(r"(\w+) is (\w+) than (\w+)", q):
        assert {a, b} <= names
        hi, lo = (a, b) if word == p.meta["more"] else (b, a)
        assert word in (p.meta["more"], p.meta["less"])
        above[lo].add(hi)
    changed = True
    while changed:  # transitive closure
        changed = False
        for person in names:
            extra = set().union(*(above[x] for x in above[person])) - above[person]
            if extra:
                above[person] |= extra
                changed = True
    ranks = sorted(names, key=lambda n: len(above[n]))
    assert [len(above[n]) for n in ranks] == list(range(len(names))), "not a total order"
    m = re.search(r"[Ww]ho is the (second )?(\w+)\?", q)
    most = _SUPERLATIVES[m.group(2)] == p.meta["more"]
    pos = 1 if m.group(1) else 0
    return ranks[pos] if most else ranks[-1 - pos]


def _truth_shopping(p):
    q = _question(p)
    total = sum(int(n) * int(c) for n, c in re.findall(r"(?<![$\d])(\d+) [^$,\d]*? (?:at|costing) \$(\d+)", q))
    total += sum(int(c) for c in re.findall(r"\ban? [^$,\d]*? for \$(\d+)", q))
    coupon = re.search(r"takes \$(\d+) off", q)
    paid = int(re.search(r"(?:pays with a|hands the cashier|Paying with) \$(\d+)", q).group(1))
    assert total == sum(i["qty"] * i["price"] for i in p.meta["items"])
    return Fraction(paid - total + (int(coupon.group(1)) if coupon else 0))


_INVENTORY = re.compile(
    r"starts the day with (?P<start>\d+)|(?:It sells|Customers take) (?P<sell>\d+)|Then (?P<sell2>\d+) are sold"
    r"|(?:brings|receives) (?P<add>\d+) more|Then (?P<add2>\d+) \S+ arrive"
    r"|gets (?P<ib>\d+) \S+ holding (?P<isz>\d+)|ships out (?P<ob>\d+) full \S+ of (?P<osz>\d+)"
    r"|(?P<half>Half of what is left|donates half)")


def _truth_inventory(p):
    count, steps = None, 0
    for m in _INVENTORY.finditer(_question(p)):
        g = m.groupdict()
        if g["start"]:
            count = int(g["start"])
            continue
        steps += 1
        if g["sell"] or g["sell2"]:
            count -= int(g["sell"] or g["sell2"])
        elif g["add"] or g["add2"]:
            count += int(g["add"] or g["add2"])
        elif g["ib"]:
            count += int(g["ib"]) * int(g["isz"])
        elif g["ob"]:
            count -= int(g["ob"]) * int(g["osz"])
        else:
            assert count % 2 == 0
            count //= 2
        assert count >= 0
    assert steps == len(p.meta["steps"])
    return Fraction(count)


def _truth_travel(p):
    q = _question(p)
    dist = sum(int(v) * Fraction(int(t), 60 if unit.startswith("minute") else 1)
               for v, t, unit in re.findall(r"at (\d+) km/h for (\d+) (minutes|hours?)", q))
    journey = re.search(r"on a (\d+) km journey", q)
    assert dist.denominator == 1
    return int(journey.group(1)) - dist if journey else dist


_TIMES = {"twice": 2, "three times": 3, "four times": 4, "five times": 5, "six times": 6, "seven times": 7}


def _truth_ages(p):
    q = _question(p)
    parent = re.match(r"(\w+) is (\w+)'s", q)
    k, j = (_TIMES[t] for t in re.findall(r"(twice|\w+ times) as old as", q))
    years = int(re.search(r"In (\d+) years", q).group(1))
    sols = [c for c in range(1, 200) if k * c + years == j * (c + years)]
    assert len(sols) == 1
    asked = re.search(r"How old is (\w+) now\?", q).group(1)
    return Fraction(k * sols[0] if asked == parent.group(1) else sols[0])


_RECOMPUTE = {"arithmetic": _truth_arithmetic, "gcd_lcm": _truth_gcd_lcm, "linear": _truth_linear,
              "percent": _truth_percent, "syllogism": _truth_syllogism, "ordering": _truth_ordering,
              "shopping": _truth_shopping, "inventory": _truth_inventory, "travel": _truth_travel,
              "ages": _truth_ages}


def test_every_stated_truth_is_correct():
    seen = collections.Counter()
    for p in prompts(EVERY, 0, 3000):
        if p.kind == "open":
            continue
        seen[p.kind] += 1
        expected = _RECOMPUTE[p.kind](p)
        if isinstance(expected, Fraction):
            assert Fraction(p.truth) == expected, (p.text, p.truth, expected)
        else:
            assert p.truth == expected, (p.text, p.truth, expected)
    assert set(seen) == set(_RECOMPUTE) and min(seen.values()) >= 50, seen
    answers = collections.Counter(p.truth for p in prompts(EVERY, 0, 3000) if p.kind == "syllogism")
    assert set(answers) == {"yes", "no", "cannot tell"} and min(answers.values()) > 50


# ----------------------------------------------------------------------------------- verify

EXTRACTION = [
    ("Step 1: 12 * 3 = 36\nStep 2: 36 + 1,198 = 1,234\nAnswer: 1,234", "arithmetic", "1234"),
    ("The total comes to $1,234.00.\n\nAnswer: $1,234.00", "shopping", "1234"),
    ("Subtract 7 from both sides, then divide by 4.\nAnswer: -3", "linear", "-3"),
    ("Answer: x = -3", "linear", "-3"),
    ("So the result is −12.", "linear", "-12"),
    ("Answer: 12.50", "percent", "12.5"),
    ("Answer: 215.20 dollars", "percent", "215.2"),
    ("Answer: 25%", "percent", "25"),
    ("Answer: 10.0", "arithmetic", "10"),
    ("Answer: -0.5", "arithmetic", "-0.5"),
    ("Answer: 3/4", "arithmetic", "0.75"),
    ("Answer: 0.75", "arithmetic", "0.75"),
    ("Answer: 1/3", "arithmetic", "1/3"),
    ("Answer: 2,000,000", "arithmetic", "2000000"),
    ("The gcd is 42.\n#### 42", "gcd_lcm", "42"),
    ("Therefore the value is $\\boxed{7}$.", "arithmetic", "7"),
    ("$\\boxed{\\frac{3}{4}}$", "arithmetic", "0.75"),
    ("**Answer:** 18 km", "travel", "18"),
    ("**Answer: 18**", "travel", "18"),
    ("Final answer: 12", "arithmetic", "12"),
    ("Answer: 3 × 4 = 12", "arithmetic", "12"),
    ("Answer:\n56", "ages", "56"),
    ("Answer: 7 years old\n\nLet me know if anything is unclear; step 3 was the key.", "ages", "7"),
    ("Answer: 12\nWait, I made a slip.\nAnswer: 13", "arithmetic", "13"),
    ("First 3 apples, then 5 more, so 8 apples in total.", "inventory", "8"),
    ("<think>Answer: 5</think>\nRechecking gives 6.\nAnswer: 6", "arithmetic", "6"),
    ("<think>Answer: 5, but I should keep checking", "arithmetic", None),
    ("I'm not sure how to solve this.", "arithmetic", None),
    ("I tried 5 and 6.\nAnswer: it cannot be computed", "arithmetic", None),
    ("Answer: Yes", "syllogism", "yes"),
    ("Answer: **No.**", "syllogism", "no"),
    ("Answer: cannot tell", "syllogism", "cannot tell"),
    ("Answer: It cannot be determined from the statements.", "syllogism", "cannot tell"),
    ("Answer: Not enough information", "syllogism", "cannot tell"),
    ("Answer: not necessarily", "syllogism", "cannot tell"),
    ("Answer: True", "syllogism", "yes"),
    ("The answer is yes.", "syllogism", None),
    ("Answer: perhaps blue", "syllogism", None),
    ("Answer: Maria", "ordering", "maria"),
    ("Answer: **MARIA**", "ordering", "maria"),
    ("Answer: Maria is the tallest.", "ordering", "maria"),
    ("Answer: The tallest is Maria.", "ordering", "maria"),
]


@pytest.mark.parametrize("text,kind,expected", EXTRACTION, ids=[f"{i}" for i in range(len(EXTRACTION))])
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind) == expected


def test_extract_name_with_choices_needs_exactly_one_name():
    names = ["Maria", "Oskar"]
    assert extract_answer("Answer: oskar!", "ordering", names) == "oskar"
    assert extract_answer("Answer: Oskar, not Maria", "ordering", names) is None
    assert extract_answer("Answer: nobody", "ordering", names) is None


def _one_of_each_kind():
    found = {}
    for p in prompts(EVERY, 0, 400):
        found.setdefault(p.kind, p)
    assert set(found) == {k for ks in KINDS.values() for k in ks}
    return found


def _wrong(p):
    if p.kind == "syllogism":
        return next(a for a in ("yes", "no", "cannot tell") if a != p.truth)
    if p.kind == "ordering":
        return next(n for n in p.meta["names"] if n != p.truth)
    return str(Fraction(p.truth) + 1)


def test_check_accepts_right_answers_and_rejects_wrong_or_malformed_ones():
    for kind, p in _one_of_each_kind().items():
        if kind == "open":
            continue
        right = check(p, f"Let me work through it carefully.\n\nAnswer: {p.truth}")
        assert right.ok and right.verified and right.reason == "correct", (kind, right)
        wrong = check(p, f"Some reasoning.\nAnswer: {_wrong(p)}")
        assert not wrong.ok and wrong.reason.startswith("wrong answer"), (kind, wrong)
        for junk in ("I am not sure.", "", "   "):
            assert not check(p, junk).ok
        think = f"<think>hmm</think>\nAnswer: {p.truth}"
        assert not check(p, think).ok and check(p, strip_think(think)).ok
        assert not check(p, f"Answer: {p.truth}", finish_reason="length").ok
        lax = VerifyPolicy(**{p.category: CategoryPolicy(verify=False)})
        kept = check(p, f"Answer: {_wrong(p)}", lax)
        assert kept.ok and not kept.verified and kept.reason == "unverified"
    shop = next(p for p in prompts(EVERY, 0, 400) if p.kind == "shopping")
    assert check(shop, f"The change is ${int(shop.truth):,}.00\nAnswer: ${int(shop.truth):,}.00").ok
    order = next(p for p in prompts(EVERY, 0, 400) if p.kind == "ordering")
    assert check(order, f"Answer: {order.truth.upper()} is the one.").ok


GOOD_KNOWLEDGE = ("Photosynthesis is how plants, algae and some bacteria turn light into chemical energy. "
                  "Chlorophyll absorbs light, water is split to release oxygen, and the energy is used to "
                  "build sugars from carbon dioxide.")


@pytest.mark.parametrize("reply,ok", [
    (GOOD_KNOWLEDGE, True),
    ("Key ideas:\n- Plants capture light energy with chlorophyll\n- Water is split, releasing oxygen\n"
     "- Sugars are built from carbon dioxide", True),
    ("I'm sorry, but I can't help with that request. " + GOOD_KNOWLEDGE, False),
    ("I cannot provide an explanation of this topic because it is outside what I am able to discuss today.", False),
    ("As an AI language model, I do not have personal opinions, but here is an overview. " + GOOD_KNOWLEDGE, False),
    (GOOD_KNOWLEDGE + " The second stage, called the Calvin cycle, takes place in the", False),
    (GOOD_KNOWLEDGE + "\n```python\nprint('light')\n", False),
    ("<think>The user wants an overview.</think>\n" + GOOD_KNOWLEDGE, False),
    ("Plants use light.", False),
    ("", False),
])
def test_knowledge_format_checks(reply, ok):
    p = next(p for p in prompts(EVERY, 0, 100) if p.kind == "open")
    v = check(p, reply)
    assert v.ok is ok, v
    assert v.extracted is None


def test_knowledge_length_bounds_and_finish_reason():
    p = next(p for p in prompts(EVERY, 0, 100) if p.kind == "open")
    tight = VerifyPolicy(knowledge=CategoryPolicy(min_chars=10, max_chars=50))
    assert check(p, GOOD_KNOWLEDGE, tight).reason.startswith("too long")
    assert not check(p, GOOD_KNOWLEDGE, finish_reason="length").ok
    assert check(p, GOOD_KNOWLEDGE, finish_reason="stop").ok


# ------------------------------------------------------------------------------------- rows

def _row(i, prompt_text=None, reply="reply", **meta):
    return make_row(messages=[{"role": "user", "content": prompt_text or f"question {i}"}], reply=reply,
                    id=f"r{i}", category="math", teacher="teacher-x", verified=True, kind="arithmetic", **meta)


def _lines(path):
    return Path(path).read_bytes().split(b"\n")


def test_make_row_schema_and_prompt_hash():
    row = _row(1)
    assert [m["role"] for m in row["conversations"]] == ["user", "assistant"]
    assert {"category", "id", "teacher", "verified", "created_at", "prompt_hash", "kind"} <= set(row["meta"])
    assert row["meta"]["prompt_hash"] == prompt_hash([{"content": "question 1", "role": "user"}])
    assert prompt_hash([{"role": "user", "content": "a"}]) != prompt_hash([{"role": "user", "content": "b"}])


def test_torn_last_line_is_repaired_and_earlier_rows_survive(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowStore(path) as store:
        for i in range(3):
            assert store.append(_row(i))
    torn = json.dumps(_row(3)).encode()[:57]
    with open(path, "ab") as f:
        f.write(torn)
    assert len(list(iter_rows(path))) == 3  # a reader skips the torn tail
    with RowStore(path) as store:
        assert store.repaired_bytes == len(torn)
        assert store.count == 3 and all(f"r{i}" in store for i in range(3))
        assert path.read_bytes().endswith(b"\n")
        assert store.append(_row(3))
    assert [r["meta"]["id"] for r in iter_rows(path, strict=True)] == ["r0", "r1", "r2", "r3"]
    with RowStore(path) as store:
        assert store.repaired_bytes == 0 and store.count == 4


def test_torn_file_without_any_newline_is_emptied(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"conversations": [')
    with RowStore(path) as store:
        assert store.repaired_bytes == 19 and store.count == 0
    assert path.read_bytes() == b""


def test_reopened_store_skips_ids_already_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowStore(path) as store:
        for i in range(10):
            store.append(_row(i))
    appended = []
    with RowStore(path) as store:
        assert store.count == 10 and store.has("r9") and not store.has("r10")
        for i in range(15):  # a resumed run
            if f"r{i}" not in store:
                assert store.append(_row(i))
                appended.append(i)
    assert appended == list(range(10, 15))
    assert len(list(iter_rows(path))) == 15


def test_duplicates_by_id_or_prompt_hash_are_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowStore(path) as store:
        assert store.append(_row(1, "what is 2 + 2?"))
        assert not store.append(_row(1, "a different question"))  # same id
        assert not store.append(_row(2, "what is 2 + 2?", reply="another reply"))  # same prompt
        assert store.has_prompt([{"role": "user", "content": "what is 2 + 2?"}])
        assert store.append(_row(3, "what is 3 + 3?"))
        assert store.count == 2
    with RowStore(path) as store:  # and after a reopen
        assert not store.append(_row(9, "what is 3 + 3?"))
    assert len(list(iter_rows(path))) == 2


def test_a_second_writer_is_refused_while_a_store_is_open(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowStore(path):
        with pytest.raises(RowStoreLocked):
            RowStore(path)
    RowStore(path).close()


def test_a_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    store = RowStore(path)
    assert store.append(_row(0))
    real_write = os.write

    def half_then_fail(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rows_mod.os, "write", half_then_fail)
    with pytest.raises(OSError):
        store.append(_row(1))
    monkeypatch.setattr(rows_mod.os, "write", real_write)
    assert not store.has("r1")
    assert store.append(_row(1))
    store.close()
    assert [r["meta"]["id"] for r in iter_rows(path, strict=True)] == ["r0", "r1"]


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "rows.jsonl"
    store = RowStore(path, fsync_every=100)
    barrier = threading.Barrier(8)
    results = []

    def worker(t):
        barrier.wait()
        rng = random.Random(t)
        ok = [store.append(_row(f"{t}-{i}", reply=f"t{t} " * rng.randint(10, 3000))) for i in range(200)]
        results.append(all(ok))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    assert results == [True] * 8 and store.count == 1600
    lines = _lines(path)
    assert lines[-1] == b"" and len(lines) == 1601
    rows = [json.loads(line) for line in lines[:-1]]
    ids = [r["meta"]["id"] for r in rows]
    assert len(set(ids)) == 1600
    for r in rows:
        t = r["meta"]["id"][1:].split("-")[0]
        assert set(r["conversations"][1]["content"].split()) == {f"t{t}"}
    for t in range(8):  # each thread's rows in its own order
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"r{t}-")]
        assert mine == list(range(200))


_CHILD = """
import sys
from mlxcore.data.rows import RowStore, make_row
store = RowStore(sys.argv[1])
i = int(sys.argv[2])
while True:
    row = make_row(messages=[{"role": "user", "content": f"q{i}"}], reply="x" * (30000 + 97 * (i % 300)),
                   id=f"k{i}", category="math", teacher="t", verified=True)
    if store.append(row):
        print(f"k{i}", flush=True)
    i += 1
"""


def test_sigkill_mid_append_loses_no_reported_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    reported: list[str] = []
    for round_ in range(3):
        start = len(reported) + 1000 * round_
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(start)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.extend(line.strip() for line in child.stdout))
        reader.start()
        deadline = time.monotonic() + 20
        want = 40 + 37 * round_
        while len(got) < want and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        reader.join(timeout=10)
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        assert len(got) >= want
        reported += got
        with RowStore(path) as store:
            assert store.bad_lines == 0
            assert all(k in store for k in reported)
            assert store.count >= len(reported)
        assert all(json.loads(line) for line in _lines(path)[:-1])
    assert len(list(iter_rows(path, strict=True))) >= len(reported)


def test_read_new_returns_only_complete_lines_and_resumes(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowStore(path) as store:
        for i in range(3):
            store.append(_row(i))
    got, off = read_new(path, 0)
    assert [r["meta"]["id"] for r in got] == ["r0", "r1", "r2"] and off == path.stat().st_size
    line = (json.dumps(_row(3)) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line[:40])
    assert read_new(path, off) == ([], off)  # a writer mid-line
    with open(path, "ab") as f:
        f.write(line[40:])
    got, off2 = read_new(path, off)
    assert [r["meta"]["id"] for r in got] == ["r3"] and off2 == off + len(line)
    assert read_new(path, off2) == ([], off2)
    with pytest.raises(ValueError):
        read_new(path, off + 5)  # not at a line start
    with pytest.raises(ValueError):
        read_new(path, off2 + 1)  # past the end
    ids, o = [], 0
    while True:  # small reads still make progress one whole line at a time
        got, o = read_new(path, o, max_bytes=10)
        if not got:
            break
        ids += [r["meta"]["id"] for r in got]
    assert ids == ["r0", "r1", "r2", "r3"] and o == off2


def test_read_new_follows_a_growing_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    store = RowStore(path, fsync_every=0)

    def writer():
        for i in range(300):
            store.append(_row(i, reply="y" * (i * 37 % 5000)))
        store.close()

    th = threading.Thread(target=writer)
    th.start()
    seen, off = [], 0
    deadline = time.monotonic() + 20
    while len(seen) < 300 and time.monotonic() < deadline:
        got, off = read_new(path, off)
        seen += [r["meta"]["id"] for r in got]
    th.join()
    assert seen == [f"r{i}" for i in range(300)]
